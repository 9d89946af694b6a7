"""State shared by every replica: runtime overrides, kept in Redis or in memory.

Owns the override model and its pure judgement (:mod:`.overrides`), where
overrides are kept (:mod:`.store`: one process in memory, or Redis shared by
many), and the Redis connection with its circuit breaker (:mod:`.redisconn`).
The request path only ever reads the last compiled copy; Redis is talked to
by a background task, so a slow or dead Redis never stalls a request.
"""
