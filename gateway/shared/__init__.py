"""State shared by every replica, kept in Redis or, without it, in this process's memory.

Owns runtime overrides (:mod:`.overrides`, pure judgement, and :mod:`.store`),
distributed rate limits (:mod:`.ratelimit`, GCRA), the audit stream
(:mod:`.audit`), the Redis connection with its circuit breaker
(:mod:`.redisconn`) and the command-line clients (:mod:`.client`). The
request path reads only the last compiled copy of the overrides; Redis is
asked on the request path only for a rule with a ``rate_limit``, bounded by a
short timeout and skipped while the breaker is open, so a slow or dead
Redis never stalls a request.
"""
