"""Rate limits, the pure half: the limit a rule sets, its period, GCRA, and whose budget a request spends.

GCRA (the generic cell rate algorithm) keeps one number per subject, the
theoretical arrival time (TAT) of its next request, so a check is one
read-modify-write of that number: :func:`gcra` here, and the same in
milliseconds in the Lua script that :mod:`gateway.shared.ratelimit` runs in
Redis. ``requests`` per ``per`` is the steady rate; ``burst`` (default:
``requests``) is how many may arrive at once.

Keys are ``<prefix>rl:{<rule>:<by>:<subject>}``: the braces are a hash tag,
so each key has its own slot in a Redis Cluster, where the script is sent
one key at a time. With ``--log-address hashed`` or ``truncated`` the
subject of a ``by: ip`` limit is the address's keyed hash (:func:`budget_of`:
HMAC-SHA256 under the overrides' key, which every replica sharing the Redis
shares, so they still count one budget), never the address itself.

No I/O here: asking Redis or the in-memory store is :mod:`gateway.shared`'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..clientip import ClientAddress
from ..geo import GeoFacts
from .callerkey import bearer_token, hash_key

By = Literal["ip", "api_key", "country", "subdivision", "asn"]
OnError = Literal["open", "closed"]

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
DURATION_PATTERN = _DURATION.pattern  # the same, for a JSON Schema (ECMAScript reads it alike)


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
class RateCheck:
    """The answer of one GCRA check, from :func:`gcra` or from Redis's script."""

    allowed: bool
    remaining: int
    retry_after: float  # seconds until a request would be let through (0 when allowed)
    reset: float  # seconds until the subject is back to a full burst


def gcra(tat: float | None, now: float, interval: float, tolerance: float) -> tuple[RateCheck, float]:
    """One check: the outcome, and the TAT to store. Pure; the Lua script is the same in milliseconds."""
    tat = now if tat is None or tat < now else tat
    new_tat = tat + interval
    if new_tat - now > tolerance + 1e-9:
        return RateCheck(False, 0, new_tat - tolerance - now, tat - now), tat
    remaining = math.floor((tolerance - (new_tat - now)) / interval + 1e-9)
    return RateCheck(True, remaining, 0.0, new_tat - now), new_tat


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


def budget_of(
    limit: RateLimit,
    client: ClientAddress,
    facts: GeoFacts,
    headers: Iterable[tuple[bytes, bytes]],
    key: bytes | None,
    hash_addresses: bool,
) -> str | None:
    """The subject whose budget this request spends, as it is stored (:func:`subject`, an API key or,
    with ``hash_addresses``, an address as its keyed hash), or None when that needs ``key`` (the
    overrides' key, kept in Redis) and it is not known yet."""
    key_hash = None
    if limit.by == "api_key":
        token = bearer_token(headers)
        if token is not None and key is not None:
            key_hash = hash_key(key, token)
    who = subject(limit, client, facts, key_hash)
    if limit.by == "ip" and hash_addresses and client.ip is not None:
        if key is None:
            return None
        who = "h:" + hash_key(key, who)[:32]  # 128 bits: no two callers share a budget by chance
    return who


def key_start(prefix: str, limit: RateLimit) -> str:
    """A key under ``limit`` up to its subject: the same for every request under it, so worked out once."""
    rule = limit.rule.replace("{", "_").replace("}", "_")
    return f"{prefix}rl:{{{rule}:{limit.by}:"


def redis_key(start: str, who: str) -> str:
    return f"{start}{who}}}"
