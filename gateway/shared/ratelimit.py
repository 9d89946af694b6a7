"""Rate limits that hold across replicas: GCRA asked of Redis (one Lua script) or of memory.

The limit, its period, the algorithm and the key a request counts under are
pure, in :mod:`gateway.policy.ratelimit`; this module asks. In Redis a check
is one ``EVALSHA`` of one Lua script, which judges a batch of checks in turn
(:mod:`.ratebatch`; the script is loaded again on ``NOSCRIPT``, e.g. after a
restart or a failover). The script reads Redis's own clock, so replicas
whose clocks disagree still share one limit. A ``by: ip`` subject that must be
hashed (``--log-address hashed`` or ``truncated``) waits for the overrides' key,
which Redis holds: until it is known, the limiter is treated as unavailable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from ..clientip import ClientAddress
from ..errors import ErrorReply
from ..geo import GeoFacts
from ..policy.ratelimit import OnError, RateCheck, RateLimit, budget_of

# KEYS[i]: one subject's key; ARGV[2i-1], ARGV[2i]: its interval and tolerance. Returns, for each key in
# turn, allowed, remaining, retry_after, reset. The keys are judged in order, so one subject twice in a batch
# is two checks, as two EVALSHAs would be. Times are whole microseconds (TIME's resolution): integers that
# a Lua number holds exactly, so a batch judged within one TIME counts its burst to the request, where
# milliseconds in floating point (and TATs stored through tostring's 14 digits) drift by a request.
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if tat == nil or tat < now then tat = now end
  local new_tat = tat + interval
  local n = #out
  if new_tat - now > tolerance then
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = 0, 0, new_tat - tolerance - now, tat - now
  else
    redis.call('SET', KEYS[i], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
    local remaining = math.floor((tolerance - (new_tat - now)) / interval)
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = 1, remaining, 0, new_tat - now
  end
end
return out
"""


def outcomes_from_script(reply: list[Any]) -> list[RateCheck]:
    """The script's flat reply, one :class:`RateCheck` per key."""
    it = iter(reply)
    return [
        RateCheck(allowed == 1, remaining, retry_after / 1e6, reset / 1e6)
        for allowed, remaining, retry_after, reset in zip(it, it, it, it, strict=True)
    ]


def script_args(limit: RateLimit) -> tuple[bytes, bytes]:
    """The script's ARGV for one check under ``limit``: its interval and tolerance in whole microseconds
    (an interval of at least one: a limit above a million requests a second per subject is a million)."""
    interval = max(1, round(limit.interval * 1e6))
    return str(interval).encode(), str(interval * limit.burst).encode()


def duration(value: float) -> bytes:
    return f"{value:.3f}".rstrip("0").rstrip(".").encode() + b"s"


def exceeded(limit: RateLimit, outcome: RateCheck) -> ErrorReply:
    """OpenAI's own 429: the SDKs read ``retry-after``/``retry-after-ms`` and retry after that long."""
    retry_ms = max(1, math.ceil(outcome.retry_after * 1000))
    return ErrorReply(
        429,
        "requests",
        "rate_limit_exceeded",
        f"Rate limit reached for {limit.by} on rule {limit.rule!r}: limit {limit.requests} requests per "
        f"{duration(limit.per).decode()}. Please try again in {retry_ms / 1000:g}s.",
        retry=True,
        headers=(
            (b"retry-after", str(max(1, math.ceil(outcome.retry_after))).encode()),
            (b"retry-after-ms", str(retry_ms).encode()),
            (b"x-ratelimit-limit-requests", str(limit.requests).encode()),
            (b"x-ratelimit-remaining-requests", b"0"),
            (b"x-ratelimit-reset-requests", duration(outcome.reset)),
        ),
    )


UNAVAILABLE = ErrorReply(
    503,
    "server_error",
    "rate_limiter_unavailable",
    "The rate limiter is unavailable and this policy fails closed (redis.on_error: closed).",
    retry=True,
    headers=((b"retry-after", b"1"),),
)


def check(
    store: Any,
    limit: RateLimit,
    client: ClientAddress,
    facts: GeoFacts,
    headers: Iterable[tuple[bytes, bytes]],
    on_error: OnError,
    then: Callable[[ErrorReply | None], None],
    caller: str | None = None,
) -> None:
    """Call ``then`` with None to go on, or with the error to answer with: at once in memory, when the
    batch's reply is read with Redis. Redis unavailable (or a bug in asking it) follows ``on_error``.
    ``caller``: the client key's name, when client keys are in force: a ``by: api_key`` budget is then
    the name's (prefixed, so that no name can be a token's hash), whatever token the upstream gets."""
    if caller is not None and limit.by == "api_key":
        who: str | None = "name:" + caller
    else:
        who = budget_of(limit, client, facts, headers, store.key, store.hash_addresses)
    if who is None:  # Redis, which holds the key, has not answered yet: as if it were down
        _judged(store, limit, on_error, then, None)
        return
    # A partial, not a closure: one object fewer per waiting request for the garbage collector to count.
    store.rate(limit, who, partial(_judged, store, limit, on_error, then))


def _judged(
    store: Any,
    limit: RateLimit,
    on_error: OnError,
    then: Callable[[ErrorReply | None], None],
    outcome: RateCheck | None,
) -> None:
    if outcome is None:  # RedisUnavailable (counted by the breaker), or a bug: the policy says what then
        then(None if on_error == "open" else UNAVAILABLE)
    elif outcome.allowed:
        then(None)
    else:
        store.observer.rate_limited(limit.rule, limit.by)
        then(exceeded(limit, outcome))
