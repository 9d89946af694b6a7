"""Token budgets and concurrent-request limits that hold across replicas: reserve, settle, refund, release.

The request path asks :func:`admit` once a request is decided: every
``token_limit`` entry of its rule reserves the request's estimated cost, and
``max_concurrent`` takes a slot, in one atomic step (one Lua script in Redis,
:mod:`.budgetredis`; one synchronous step in memory, :mod:`.budgetmemory`),
all or none. When the response ends :func:`settle` replaces each reservation
by what the provider reported (more than reserved pushes the subject into
debt, which is how an overshoot is paid back: its next requests wait for it
to refill), :func:`refund` gives all back when the upstream failed before the
first byte, and :func:`release` frees the slot. The three are fire and
forget: batched with other requests' in Redis, never awaited by the request.

The guarantee: with a budget B, the tokens admitted in a window exceed B by
at most what requests used beyond their reservations, since a reservation is
checked and taken atomically before anything reaches the upstream.

Refusals are OpenAI's 429s (:func:`refusal`). Redis slow, down or its circuit
open follows the policy's ``redis.on_error`` within ``--redis-timeout``: open
lets the request through with nothing reserved (``Held.fallback``), closed
answers the rate limiter's 503; either way it is counted
(``observer.budget_fallback(rule, "tokens" | "concurrency")``), as every
refusal is (``observer.budget_refused(rule, "rate" | "quota" | "concurrency")``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..errors import ErrorReply
from ..policy.ratelimit import OnError
from ..policy.tokenlimit import Budget, Concurrency, TokenCheck, TokenLimit, slot_key, token_key
from .budgetlua import Ask, Outcome, Reserved, SlotAsk, capacity
from .ratelimit import UNAVAILABLE, duration
from .store import StoreObserver


@dataclass(frozen=True, slots=True)
class Held:
    """What :func:`admit` reserved for one request: pass it to :func:`settle` or :func:`refund`, and :func:`release`."""

    rule: str
    tokens: tuple[Reserved, ...] = ()  # one per token_limit entry, in order (none after a fallback)
    slot: tuple[str, str] | None = None  # (key, member) of the concurrency slot held
    fallback: bool = False  # Redis could not answer and on_error let the request through: nothing reserved

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(r.key for r in self.tokens)

    @property
    def costs(self) -> tuple[int, ...]:
        return tuple(r.cost for r in self.tokens)


def admit(
    store: Any,
    budget: Budget,
    subjects: Sequence[str],
    costs: Sequence[int],
    slot: tuple[str, str] | None,
    lease: float,
    on_error: OnError,
    then: Callable[[Held | ErrorReply], None],
) -> None:
    """Reserve ``costs`` (one per ``budget.tokens`` entry, under the subject of the same place) and, when the
    budget has ``max_concurrent``, a slot for ``slot`` = (subject, unique member id) held at most ``lease``
    seconds; ``then`` gets the :class:`Held` or the reply to refuse with: at once in memory, when the batch's
    reply is read with Redis."""
    if len(subjects) != len(budget.tokens) or len(costs) != len(budget.tokens):
        raise ValueError(f"{len(budget.tokens)} token limits, {len(subjects)} subjects, {len(costs)} costs")
    for limit, cost in zip(budget.tokens, costs, strict=True):
        if cost < 0:  # a negative reservation would hand tokens out
            raise ValueError(f"a reservation of {cost} tokens under rule {budget.rule!r}")
        if cost > capacity(limit):  # no wait makes it fit: refused without asking the store
            store.observer.budget_refused(budget.rule, limit.kind)
            then(never_fits(limit, cost))
            return
    backend = store.budgets
    asks = tuple(
        Ask(limit, token_key(backend.prefix, limit, who), cost)
        for limit, who, cost in zip(budget.tokens, subjects, costs, strict=True)
    )
    concurrency = budget.concurrency
    if concurrency is not None and slot is None:
        raise ValueError(f"rule {budget.rule!r} has max_concurrent: admit needs a slot (subject, unique id)")
    ask_slot = None
    if concurrency is not None and slot is not None:
        ask_slot = SlotAsk(slot_key(backend.prefix, concurrency, slot[0]), slot[1], concurrency.streams, lease)
    if not asks and ask_slot is None:
        then(Held(budget.rule))
        return
    backend.reserve(asks, ask_slot, partial(_judged, store, budget, asks, ask_slot, on_error, then))


def _judged(
    store: Any,
    budget: Budget,
    asks: tuple[Ask, ...],
    slot: SlotAsk | None,
    on_error: OnError,
    then: Callable[[Held | ErrorReply], None],
    outcome: Outcome | None,
) -> None:
    observer: StoreObserver = store.observer
    if outcome is None:  # Redis unavailable (counted by the breaker too), or a bug: the policy says what then
        then(unavailable(store, budget, on_error))
        return
    if outcome.allowed:
        reserved = tuple(Reserved(a.limit, a.key, a.cost, w) for a, w in zip(asks, outcome.windows, strict=True))
        then(Held(budget.rule, reserved, None if slot is None else (slot.key, slot.member)))
        return
    refused = [(a, c) for a, c in zip(asks, outcome.checks, strict=True) if not c.allowed]
    quota = [(a, c) for a, c in refused if a.limit.kind == "quota"]
    if quota:  # the one that will not refill soon is the one to tell
        a, c = quota[0]
        observer.budget_refused(budget.rule, "quota")
        then(quota_exceeded(a.limit, a.cost, c))
    elif refused:
        a, c = max(refused, key=lambda r: r[1].retry_after)
        observer.budget_refused(budget.rule, "rate")
        then(rate_exceeded(a.limit, a.cost, c))
    else:
        assert budget.concurrency is not None
        observer.budget_refused(budget.rule, "concurrency")
        then(too_many_at_once(budget.concurrency, outcome.in_flight))


def unavailable(store: Any, budget: Budget, on_error: OnError) -> Held | ErrorReply:
    """The store could not be asked for ``budget``: ``on_error`` says what then (nothing reserved, or the 503),
    counted once per kind of limit the budget has."""
    observer: StoreObserver = store.observer
    if budget.tokens:
        observer.budget_fallback(budget.rule, "tokens")
    if budget.concurrency is not None:
        observer.budget_fallback(budget.rule, "concurrency")
    return Held(budget.rule, fallback=True) if on_error == "open" else UNAVAILABLE


def settle(store: Any, held: Held, actual: Sequence[int]) -> None:
    """Replace each reservation by what the request really cost (one per entry of the budget, in order; ignored
    when nothing was reserved). Fire and forget."""
    if not held.tokens:  # nothing reserved (no token limit, or a fallback): nothing to settle
        return
    if len(actual) != len(held.tokens):
        raise ValueError(f"{len(held.tokens)} reservations, {len(actual)} actual costs")
    changes = [(r, max(0, a)) for r, a in zip(held.tokens, actual, strict=True) if a != r.cost]
    if changes:
        store.budgets.adjust(held.rule, changes)


def refund(store: Any, held: Held) -> None:
    """Give every reservation back (the upstream failed before the first byte). Fire and forget."""
    changes = [(r, 0) for r in held.tokens if r.cost]
    if changes:
        store.budgets.adjust(held.rule, changes)


def release(store: Any, held: Held) -> None:
    """Free the concurrency slot (idempotent: releasing twice, or a slot already expired, changes nothing)."""
    if held.slot is not None:
        store.budgets.release(held.rule, *held.slot)


# --- the refusals: OpenAI's own 429s ------------------------------------------------------------------


def _by(by: tuple[str, ...]) -> str:
    return ", ".join(by)


def _token_headers(limit: TokenLimit, check: TokenCheck, retry: float | None) -> tuple[tuple[bytes, bytes], ...]:
    headers: list[tuple[bytes, bytes]] = []
    if retry is not None:
        retry_ms = max(1, math.ceil(retry * 1000))
        headers += (
            (b"retry-after", str(max(1, math.ceil(retry))).encode()),
            (b"retry-after-ms", str(retry_ms).encode()),
        )
    headers += (
        (b"x-ratelimit-limit-tokens", str(limit.tokens).encode()),
        (b"x-ratelimit-remaining-tokens", str(max(0, check.remaining)).encode()),
        (b"x-ratelimit-reset-tokens", duration(check.reset)),
    )
    return tuple(headers)


def rate_exceeded(limit: TokenLimit, cost: int, check: TokenCheck) -> ErrorReply:
    """A ``kind: rate`` limit has no room yet: 429 ``rate_limit_exceeded``, retried after ``retry-after``."""
    return ErrorReply(
        429,
        "tokens",
        "rate_limit_exceeded",
        f"Rate limit reached for tokens by {_by(limit.by)} on rule {limit.rule!r}: limit {limit.tokens} tokens per "
        f"{duration(limit.per).decode()}, remaining {max(0, check.remaining)}, requested {cost}. "
        f"Please try again in {max(0.001, check.retry_after):.3g}s.",
        retry=True,
        headers=_token_headers(limit, check, check.retry_after),
    )


def quota_exceeded(limit: TokenLimit, cost: int, check: TokenCheck) -> ErrorReply:
    """A ``kind: quota`` is spent: OpenAI's ``insufficient_quota`` (type and code), not retried by the SDKs."""
    return ErrorReply(
        429,
        "insufficient_quota",
        "insufficient_quota",
        f"You exceeded your token quota by {_by(limit.by)} on rule {limit.rule!r}: {limit.tokens} tokens per "
        f"{duration(limit.per).decode()} (windows from 00:00 UTC), remaining {max(0, check.remaining)}, requested "
        f"{cost}; it is whole again in {duration(check.reset).decode()}.",
        retry=False,
        headers=_token_headers(limit, check, check.reset),
    )


def never_fits(limit: TokenLimit, cost: int) -> ErrorReply:
    """A request that reserves more than the limit's whole capacity: no wait helps (``x-should-retry: false``)."""
    whole = capacity(limit)
    check = TokenCheck(False, whole, 0.0, 0.0, never=True)
    return ErrorReply(
        429,
        "insufficient_quota" if limit.kind == "quota" else "tokens",
        "insufficient_quota" if limit.kind == "quota" else "rate_limit_exceeded",
        f"Request too large for the token limit by {_by(limit.by)} on rule {limit.rule!r}: it reserves {cost} "
        f"tokens, more than the {whole} the limit ever allows at once ({limit.tokens} per "
        f"{duration(limit.per).decode()}), so it can never fit. Reduce the input or max_tokens.",
        retry=False,
        headers=_token_headers(limit, check, None),
    )


# A slot frees when any request in flight ends, which cannot be foreseen: the SDKs retry after a second.
CONCURRENCY_RETRY = 1


def too_many_at_once(concurrency: Concurrency, in_flight: int) -> ErrorReply:
    """``max_concurrent`` is full: 429 ``rate_limit_exceeded``, retried after ``retry-after``."""
    return ErrorReply(
        429,
        "requests",
        "rate_limit_exceeded",
        f"Too many concurrent requests by {_by(concurrency.by)} on rule {concurrency.rule!r}: limit "
        f"{concurrency.streams} at once, {in_flight} in flight. Please try again in {CONCURRENCY_RETRY}s.",
        retry=True,
        headers=(
            (b"retry-after", str(CONCURRENCY_RETRY).encode()),
            (b"retry-after-ms", str(CONCURRENCY_RETRY * 1000).encode()),
        ),
    )
