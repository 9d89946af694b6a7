"""Rate limits that hold across replicas: GCRA, in Redis (one Lua script) or in memory.

GCRA (the generic cell rate algorithm) keeps one number per subject, the
theoretical arrival time (TAT) of its next request, so a check is one
atomic read-modify-write: in Redis one ``EVALSHA`` of one Lua script, which
judges a batch of checks in turn (:mod:`.ratebatch`; the script is loaded
again on ``NOSCRIPT``, e.g. after a restart or a failover). The script reads
Redis's own clock, so replicas whose clocks disagree still share one limit.

``requests`` per ``per`` is the steady rate; ``burst`` (default: ``requests``)
is how many may arrive at once. Keys are ``<prefix>rl:{<rule>:<by>:<subject>}``:
the braces are a hash tag, so each key has its own slot in a Redis Cluster,
where the script is sent one key at a time. With ``--log-address hashed`` or
``truncated`` the subject of a ``by: ip`` limit is the address's keyed hash
(HMAC-SHA256 under the overrides' key, which every replica sharing the Redis
shares, so they still count one budget), never the address itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from ..clientip import ClientAddress
from ..errors import GatewayError
from ..geo import GeoFacts

By = Literal["ip", "api_key", "country", "subdivision", "asn"]
OnError = Literal["open", "closed"]

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_period(value: str | float) -> float:
    """``1m``, ``10s``, ``1h``, ``500ms``, ``1d`` or plain seconds."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(value)
        if m is None:
            raise ValueError(f"{value!r} is not a duration (e.g. 1s, 1m, 1h, 1d)")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds <= 0:
        raise ValueError("must be more than zero")
    return seconds


@dataclass(frozen=True, slots=True)
class RateLimit:
    rule: str
    by: By
    requests: int
    per: float  # seconds
    burst: int

    @property
    def interval(self) -> float:
        return self.per / self.requests

    @property
    def tolerance(self) -> float:
        return self.burst * self.interval


@dataclass(frozen=True, slots=True)
class Outcome:
    allowed: bool
    remaining: int
    retry_after: float  # seconds until a request would be let through (0 when allowed)
    reset: float  # seconds until the subject is back to a full burst


def gcra(tat: float | None, now: float, interval: float, tolerance: float) -> tuple[Outcome, float]:
    """One check: the outcome, and the TAT to store. Pure; the Lua script is the same in milliseconds."""
    tat = now if tat is None or tat < now else tat
    new_tat = tat + interval
    if new_tat - now > tolerance + 1e-9:
        return Outcome(False, 0, new_tat - tolerance - now, tat - now), tat
    remaining = math.floor((tolerance - (new_tat - now)) / interval + 1e-9)
    return Outcome(True, remaining, 0.0, new_tat - now), new_tat


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


def outcomes_from_script(reply: list[Any]) -> list[Outcome]:
    """The script's flat reply, one :class:`Outcome` per key."""
    it = iter(reply)
    return [
        Outcome(allowed == 1, remaining, retry_after / 1e6, reset / 1e6)
        for allowed, remaining, retry_after, reset in zip(it, it, it, it, strict=True)
    ]


def script_args(limit: RateLimit) -> tuple[bytes, bytes]:
    """The script's ARGV for one check under ``limit``: its interval and tolerance in whole microseconds
    (an interval of at least one: a limit above a million requests a second per subject is a million)."""
    interval = max(1, round(limit.interval * 1e6))
    return str(interval).encode(), str(interval * limit.burst).encode()


def subject(limit: RateLimit, client: ClientAddress, facts: GeoFacts, key_hash: str | None) -> str:
    """Who shares one budget under this limit."""
    by = limit.by
    if by == "ip":
        return str(client.ip) if client.ip is not None else "unknown"
    if by == "api_key":
        return key_hash or "no-key"
    if by == "country":
        return facts.country or "unknown"
    if by == "subdivision":
        return facts.subdivisions[0] if facts.subdivisions else "unknown"
    return str(facts.asn) if facts.asn is not None else "unknown"


def key_start(prefix: str, limit: RateLimit) -> str:
    """A key under ``limit`` up to its subject: the same for every request under it, so worked out once."""
    rule = limit.rule.replace("{", "_").replace("}", "_")
    return f"{prefix}rl:{{{rule}:{limit.by}:"


def redis_key(start: str, who: str) -> str:
    return f"{start}{who}}}"


def _seconds(value: float) -> bytes:
    return f"{value:.3f}".rstrip("0").rstrip(".").encode() + b"s"


def exceeded(limit: RateLimit, outcome: Outcome) -> GatewayError:
    """OpenAI's own 429: the SDKs read ``retry-after``/``retry-after-ms`` and retry after that long."""
    retry_ms = max(1, math.ceil(outcome.retry_after * 1000))
    return GatewayError(
        429,
        "requests",
        "rate_limit_exceeded",
        f"Rate limit reached for {limit.by} on rule {limit.rule!r}: limit {limit.requests} requests per "
        f"{_seconds(limit.per).decode()}. Please try again in {retry_ms / 1000:g}s.",
        retry=True,
        headers=(
            (b"retry-after", str(max(1, math.ceil(outcome.retry_after))).encode()),
            (b"retry-after-ms", str(retry_ms).encode()),
            (b"x-ratelimit-limit-requests", str(limit.requests).encode()),
            (b"x-ratelimit-remaining-requests", b"0"),
            (b"x-ratelimit-reset-requests", _seconds(outcome.reset)),
        ),
    )


UNAVAILABLE = GatewayError(
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
    then: Callable[[GatewayError | None], None],
) -> None:
    """Call ``then`` with None to go on, or with the error to answer with: at once in memory, when the
    batch's reply is read with Redis. Redis unavailable (or a bug in asking it) follows ``on_error``."""
    key_hash = None
    if limit.by == "api_key":
        from .overrides import bearer_token, hash_key  # overrides -> policy -> this module

        token = bearer_token(headers)
        if token is not None and store.key is not None:
            key_hash = hash_key(store.key, token)
    who = subject(limit, client, facts, key_hash)
    if limit.by == "ip" and store.hash_addresses and client.ip is not None:
        if store.key is None:  # Redis, which holds the key, has not answered yet: as if it were down
            _judged(store, limit, on_error, then, None)
            return
        from .overrides import hash_key

        who = "h:" + hash_key(store.key, who)[:32]  # 128 bits: no two callers share a budget by chance
    # A partial, not a closure: one object fewer per waiting request for the garbage collector to count.
    store.rate(limit, who, partial(_judged, store, limit, on_error, then))


def _judged(
    store: Any,
    limit: RateLimit,
    on_error: OnError,
    then: Callable[[GatewayError | None], None],
    outcome: Outcome | None,
) -> None:
    if outcome is None:  # RedisUnavailable (counted by the breaker), or a bug: the policy says what then
        then(None if on_error == "open" else UNAVAILABLE)
    elif outcome.allowed:
        then(None)
    else:
        store.observer.rate_limited(limit.rule, limit.by)
        then(exceeded(limit, outcome))
