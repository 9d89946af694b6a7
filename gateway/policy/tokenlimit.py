"""Token budgets and concurrent-request limits, the pure half: what a rule sets, whose budget a request
spends, what it reserves, and the arithmetic of a check.

A rule's ``token_limit`` entries and its ``max_concurrent`` compile into one
:class:`Budget`, held by the rule's :class:`~.compiled.Decision`. Asking Redis
or memory (reserve, settle, refund; acquire, release) is
:mod:`gateway.shared.budgets`'; reading usage from a response is
:mod:`gateway.usage`'. No I/O here, no clock: ``now`` is always given.

Two kinds of limit, each one number per subject:

* ``kind: rate`` is GCRA with a cost (:func:`gcra_cost`): the stored number
  is the theoretical arrival time (TAT) of the subject's next token; a request
  of ``cost`` tokens moves it ``cost * interval`` on, and is let through when
  that stays within ``tolerance`` (``burst * interval``) of now. ``tokens``
  per ``per`` is the steady rate; ``burst`` (default: ``tokens``) is what may
  be spent at once.
* ``kind: quota`` is a fixed window (:func:`quota_window`, aligned to the
  Unix epoch, so a ``1d`` quota is whole again at 00:00 UTC on every replica)
  and the tokens used in it (:func:`quota_check`).

Both are written unit-free: ``now``, ``tat``, ``interval`` and ``tolerance``
in any one unit. The Lua the store runs is the same arithmetic in
milliseconds (Redis's own clock), and its tests hold it to these functions.

Keys are ``<prefix>tl:{<rule>:<index>:<subject>}`` (a rate), ``<prefix>tq:{...}``
(a quota) and ``<prefix>cc:{<rule>:<subject>}``: hash-tagged, so each key is whole in one
Redis Cluster slot. Every part of a key is escaped (:func:`_part`), so a
model name from a request body can neither break the hash tag nor pass for
another subject, and a long one is replaced by its hash.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Literal

from ..clientip import ClientAddress
from ..geo import GeoFacts

# Who shares one budget: several make one composite subject ([country, model]: one budget per
# country per model).
TokenBy = Literal["ip", "api_key", "country", "subdivision", "asn", "model", "rule"]
Count = Literal["input", "output", "total"]
Kind = Literal["rate", "quota"]

DEFAULT_OUTPUT = 4096  # reserved for the output when the request names no max_tokens
DEFAULT_UNREADABLE = 8192  # reserved (and charged, without usage) for a body that cannot be read


@dataclass(frozen=True, slots=True)
class TokenLimit:
    """One ``token_limit`` entry of a rule: ``tokens`` per ``per`` seconds, counted as ``count``."""

    rule: str
    index: int  # its place in the rule's list: part of its key, so two entries never share a budget
    tokens: int
    per: float  # seconds
    by: tuple[TokenBy, ...]
    count: Count = "total"
    kind: Kind = "rate"  # rate: GCRA, refills steadily; quota: a window that empties, reset when it ends
    burst: int | None = None  # rate only: tokens that may be spent at once (default: tokens)

    @property
    def capacity(self) -> int:
        """The most one request may ever reserve here: the burst of a rate, the whole of a quota."""
        return self.burst if self.burst is not None and self.kind == "rate" else self.tokens

    @property
    def interval(self) -> float:
        """Seconds per token (a rate's GCRA step)."""
        return self.per / self.tokens

    @property
    def tolerance(self) -> float:
        """Seconds of tokens that may be spent ahead (a rate's GCRA tolerance)."""
        return self.capacity * self.interval


@dataclass(frozen=True, slots=True)
class Concurrency:
    """A rule's ``max_concurrent``: at most ``streams`` requests in flight per subject, across replicas."""

    rule: str
    streams: int
    by: tuple[TokenBy, ...]


@dataclass(frozen=True, slots=True)
class Budget:
    """Everything about tokens and concurrency that a deciding rule asks of a request it lets through."""

    rule: str
    tokens: tuple[TokenLimit, ...] = ()
    concurrency: Concurrency | None = None
    output_default: int = DEFAULT_OUTPUT  # reserved for the output when the request names no max_tokens
    unreadable: int = DEFAULT_UNREADABLE  # charged in full for a body that cannot be read (not JSON, too large)

    @property
    def needs_body(self) -> bool:
        """Whether the request path must hold the JSON body before admitting: to estimate its tokens,
        or to learn the model a subject is made of."""
        if self.tokens:
            return True
        return self.concurrency is not None and "model" in self.concurrency.by


# --- whose budget ---------------------------------------------------------------------------------

_UNKNOWN = "unknown"  # no country, subdivision, ASN or address: cannot collide with a real one
_NONE = "%none"  # no key, no model: '%' followed by no hex pair is never an escaped name
_LONGEST_PART = 128  # characters of an escaped part; a longer one (a model name) is kept as its hash
_ESCAPES = {"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D"}
# A part that needs no escaping: printable ASCII but space, '%', ':' and braces (0x21-0x7E less 0x25,
# 0x3A, 0x7B, 0x7D). One C-level match instead of a generator over its characters, which was the
# largest single item of a budgeted request in bench/calls.py (55 of 557 calls per request).
_PLAIN = re.compile(r"[!-$&-9;-z|~]*")


def _part(text: str) -> str:
    """One part of a subject or key, escaped: '%', ':', braces and anything unprintable or non-ASCII
    percent-encoded (UTF-8), so parts join unambiguously and never break the hash tag."""
    if _PLAIN.fullmatch(text) is not None:
        out = text
    else:
        out = "".join(
            _ESCAPES.get(c) or (c if c.isascii() and c.isprintable() and c != " " else _encoded(c)) for c in text
        )
    if len(out) > _LONGEST_PART:
        # 128 bits: two names share a budget only by a collision of SHA-256's first half.
        return "%h" + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return out


def _encoded(c: str) -> str:
    return "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogateescape"))


def subject(
    by: tuple[TokenBy, ...],
    client: ClientAddress,
    facts: GeoFacts,
    caller: str | None,
    model: str | None,
    rule: str,
    address: str | None = None,
) -> str:
    """Who shares one budget: the request's value of each key in ``by``, escaped and joined by ':'.

    ``caller`` is the client key's name when client keys are in force, else the
    bearer token's keyed hash, None when there is none. ``address`` replaces the
    client address in an ``ip`` subject where it must not be stored (its keyed
    hash, with ``--log-address hashed``): the caller hashes it, as
    :func:`~.ratelimit.budget_of` does for a rate limit.
    """
    parts = []
    for key in by:
        value: str | None  # None: not known, its marker is written as is
        if key == "ip":
            value = address if address is not None else str(client.ip) if client.ip is not None else None
        elif key == "api_key":
            value = caller
        elif key == "country":
            value = facts.country
        elif key == "subdivision":
            value = facts.subdivisions[0] if facts.subdivisions else None
        elif key == "asn":
            value = str(facts.asn) if facts.asn is not None else None
        elif key == "model":
            value = model
        else:
            value = rule
        if value is None:
            parts.append(_NONE if key in ("api_key", "model") else _UNKNOWN)
        else:
            parts.append(_part(value))
    return ":".join(parts)


def token_key(prefix: str, limit: TokenLimit, subject: str) -> str:
    """``<prefix>tl:{<rule>:<index>:<subject>}`` (``tq:`` for a quota): one limit's budget for one subject
    (from :func:`subject`). The kind is in the key because a rate is kept as a string and a quota as a
    hash: a reload that turns one into the other must start afresh, not meet the other's key (WRONGTYPE,
    and every request under it following ``on_error`` until the old key expired)."""
    kind = "tq" if limit.kind == "quota" else "tl"
    return f"{prefix}{kind}:{{{_part(limit.rule)}:{limit.index}:{subject}}}"


def slot_key(prefix: str, concurrency: Concurrency, subject: str) -> str:
    """``<prefix>cc:{<rule>:<subject>}``: the requests one subject has in flight under a rule."""
    return f"{prefix}cc:{{{_part(concurrency.rule)}:{subject}}}"


# --- what a request costs -------------------------------------------------------------------------


def cost(limit: TokenLimit, input: int, output: int) -> int:
    """The tokens a request spends under ``limit``, by its ``count``."""
    if limit.count == "input":
        return input
    if limit.count == "output":
        return output
    return input + output


def reservation(budget: Budget, input: int | None, output_cap: int | None) -> tuple[int, ...]:
    """What a request reserves under each of ``budget``'s token limits, in order.

    ``input`` is the estimated input (None: the body could not be read, which
    reserves ``budget.unreadable`` under every limit); ``output_cap`` is the
    request's own max_tokens, else ``budget.output_default`` is reserved.
    """
    if input is None:
        return tuple(budget.unreadable for _ in budget.tokens)
    output = budget.output_default if output_cap is None else output_cap
    return tuple(cost(limit, input, output) for limit in budget.tokens)


# --- the arithmetic of a check (mirrored in the store's Lua) --------------------------------------

# Float slack: a request that fits exactly must not be refused by a rounding of cost * interval.
# Times are doubles, so a token is resolved to about ulp(now) / interval: with Redis's clock in
# milliseconds (ulp 2.4e-4 ms today), a few tokens at 10^9 tokens a minute, far less below that.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class TokenCheck:
    """The answer of one token-limit check, from :func:`gcra_cost` or :func:`quota_check` (or the Lua)."""

    allowed: bool
    remaining: int  # tokens left: after this request when allowed, as things stand when refused
    retry_after: float  # until this request would fit (0 when allowed, or when it never can)
    reset: float  # until the subject's budget is whole again
    never: bool = False  # the cost is more than the limit's whole capacity: no wait makes it fit


def gcra_cost(tat: float | None, now: float, interval: float, tolerance: float, cost: int) -> tuple[TokenCheck, float]:
    """One GCRA check of ``cost`` tokens: the outcome, and the TAT to store (unchanged when refused).

    ``interval`` is the time one token takes to refill (``per / tokens``),
    ``tolerance`` how far ahead the subject may spend (``burst * interval``).
    A cost of 0 is always let through and changes nothing. A cost beyond the
    tolerance can never fit and is refused as such (``never``).
    """
    tat = now if tat is None or tat < now else tat
    spent = tat - now  # time's worth of tokens already spent ahead
    left = max(0, math.floor((tolerance - spent) / interval + _EPSILON))
    if cost * interval > tolerance + _EPSILON:
        return TokenCheck(False, left, 0.0, spent, never=True), tat
    new_tat = tat + cost * interval
    if new_tat - now > tolerance + _EPSILON:
        return TokenCheck(False, left, new_tat - tolerance - now, spent), tat
    remaining = max(0, math.floor((tolerance - (new_tat - now)) / interval + _EPSILON))
    return TokenCheck(True, remaining, 0.0, new_tat - now), new_tat


def gcra_settle(tat: float | None, now: float, interval: float, delta: int) -> float | None:
    """The TAT after a reservation is replaced by what was used (``delta`` = used - reserved).

    More used than reserved is charged as spent now (from ``max(tat, now)``),
    so a long request cannot hide its overshoot in the time it took; less is
    given back (a TAT in the past is a full burst: nothing is banked beyond it).
    """
    if delta == 0 or (tat is None and delta < 0):
        return tat
    if delta > 0:
        return max(now if tat is None else tat, now) + delta * interval
    assert tat is not None
    return tat + delta * interval


def quota_window(now: float, per: float) -> tuple[int, float]:
    """The window ``now`` falls in (windows of ``per`` from the Unix epoch) and the time until it ends."""
    index = math.floor(now / per)
    return index, (index + 1) * per - now


def quota_check(used: int, tokens: int, cost: int, reset: float) -> tuple[TokenCheck, int]:
    """One quota check of ``cost`` tokens against ``used`` of ``tokens`` in the current window (which
    ends in ``reset``): the outcome, and the tokens used to store (unchanged when refused)."""
    if cost > tokens:
        return TokenCheck(False, max(0, tokens - used), 0.0, reset, never=True), used
    if used + cost > tokens:
        return TokenCheck(False, max(0, tokens - used), reset, reset), used
    return TokenCheck(True, tokens - used - cost, 0.0, reset), used + cost


def quota_settle(used: int, delta: int) -> int:
    """Tokens used in a window after a reservation in it is replaced by what was used (never below 0)."""
    return max(0, used + delta)
