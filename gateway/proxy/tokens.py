"""A forwarded request's tokens: what a token budget reserves for it, and what it is charged when it is over.

The request path's budget step (:meth:`.path.Gateway.budgeted`) reads the
held body (:func:`gateway.usage.request.read_request`), works out one cost
per ``token_limit`` entry (the input estimate plus the output cap, each
limit counting ``input``, ``output`` or ``total``) and one subject each
(:func:`gateway.policy.tokenlimit.subject`), and reserves them
(:func:`gateway.shared.budgets.admit`). The response then passes a
:class:`~gateway.usage.tap.UsageTap`; this module's :class:`Metered` settles
once, whichever way the request ends (:meth:`.exchange.Exchange.record` calls
it before the record is written):

- nothing went up, or the upstream failed before the first byte reached the
  client (failover included: only the attempt that answered is charged), or it
  answered with an error: **refund**, the reservation given back whole;
- the answer completed: **settle** on the provider's usage, or on an estimate
  from what was relayed (flagged ``source: estimate``) when it sent none;
- the client left, or the stream was cut or timed out after it started:
  **settle** on the estimate, flagged, whatever usage had been seen (a cut
  stream's usage, when any came, is a partial count: Anthropic's
  ``message_start`` carries the input and one output token);

and the concurrency slot is **released** in every case. A body that could
not be read (not JSON, larger than ``body.max_bytes``) reserved the budget's
``unreadable`` charge per limit and is settled on the provider's usage when
it reports one, else charged that in full.

No Redis here beyond calling :mod:`gateway.shared.budgets`, which batches
and never blocks: settling is fire and forget.

A request no budget limits, on a path whose usage shape is known, is metered
too (``--record-usage all``, the default) with an observing tap
(:meth:`~gateway.usage.tap.UsageTap.observing`): :class:`Metered` without a
budget, whose :meth:`Metered.over` records the provider's usage of a whole 2xx
answer and nothing else (no estimate: its body was not held, so there is no
input to estimate; an answer without usage records nothing). The tap never
changes a byte, so the relay keeps the upstream's ``content-length`` and the
zero-copy path. ``bench/calls.py`` (deterministic call counts, 2,000 requests,
one refused in four, an answer with a ``usage`` object): bench/policy.yaml
196.0 calls per request on main, 229.8 with ``--record-usage all``, 196.0 with
``budgeted``; bench/policy-route.yaml 240.3, 273.3 and 240.3. The 33 calls
(about 45 per forwarded request) are mostly reading the usage object and
tallying it. ``--record-usage budgeted`` meters only what budgets limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..clientip import ClientAddress
from ..dataplane.upstream import UpstreamGroup
from ..geo import GeoFacts
from ..policy.callerkey import bearer_token, hash_key
from ..policy.tokenlimit import Budget, cost, subject
from ..shared.budgets import refund, release, settle
from ..usage import Usage
from ..usage.tap import UsageTap

if TYPE_CHECKING:
    from .exchange import Exchange

# A slot is held at most this long past the longest a forwarded request may take (every URL of its
# chain at its total timeout): time for the relay's own ending to run before a crashed replica's
# slot expires by itself.
LEASE_MARGIN = 30.0


def lease(group: UpstreamGroup) -> float:
    """Seconds a concurrency slot is held at most: every URL the request may try, each to its total timeout."""
    return sum(u.timeouts.total for u in group.chain or group.members) + LEASE_MARGIN


def caller_of(ex: Exchange, store: Any) -> str | None:
    """Who the caller is for ``by: api_key``: the client key's name when client keys are in force
    (checked already), else the bearer token's keyed hash (under the overrides' key, as rate limits
    and overrides name it), None when there is no token or the key is not known yet."""
    if ex.caller is not None:
        return ex.caller
    token = bearer_token(ex.request.headers)
    key: bytes | None = store.key
    return None if token is None or key is None else hash_key(key, token)


def subjects(
    budget: Budget, client: ClientAddress, facts: GeoFacts, caller: str | None, model: str | None, address: str | None
) -> list[str]:
    """One subject per token limit of ``budget``, as it is stored (``address``: :func:`address_of`)."""
    return [subject(limit.by, client, facts, caller, model, budget.rule, address) for limit in budget.tokens]


def slot_of(
    budget: Budget,
    client: ClientAddress,
    facts: GeoFacts,
    caller: str | None,
    model: str | None,
    member: str,
    address: str | None,
) -> tuple[str, str] | None:
    """The concurrency slot to take (its subject and this request's own member id), if the rule limits it."""
    conc = budget.concurrency
    if conc is None:
        return None
    return subject(conc.by, client, facts, caller, model, budget.rule, address), member


def address_of(budget: Budget, client: ClientAddress, store: Any) -> str | None:
    """What stands in for the address in a ``by: ip`` subject when addresses are hashed (``--log-address
    hashed``/``truncated``): its keyed hash, 128 bits, as a rate limit's
    (:func:`~gateway.policy.ratelimit.budget_of`); worked out once per request, and only for a budget
    that has a ``by: ip`` subject."""
    if not store.hash_addresses or client.ip is None or store.key is None:
        return None
    conc = budget.concurrency
    if not any("ip" in limit.by for limit in budget.tokens) and (conc is None or "ip" not in conc.by):
        return None
    return "h:" + hash_key(store.key, str(client.ip))[:32]


def key_unknown(budget: Budget, store: Any, caller: str | None, has_token: bool) -> bool:
    """Whether a subject needs the overrides' key (which Redis holds) and it is not known yet: a token's
    hash for ``by: api_key`` without client keys, an address's for ``by: ip`` with addresses hashed.
    Then the budget cannot be asked, as if Redis were down (the rate limiter does the same)."""
    if store.key is not None:
        return False
    by = {b for limit in budget.tokens for b in limit.by}
    if budget.concurrency is not None:
        by.update(budget.concurrency.by)
    return ("api_key" in by and caller is None and has_token) or ("ip" in by and store.hash_addresses)


def costs(budget: Budget, input: int, output: int) -> list[int]:
    """One cost per token limit: what the request reserves, or is charged, under each."""
    return [cost(limit, input, output) for limit in budget.tokens]


class Metered:
    """One forwarded request's usage tap, and what settling it needs: made by the budget step (or for the
    metrics alone), settled once by :meth:`over`."""

    __slots__ = ("budget", "input", "reserved", "store", "tap")

    def __init__(
        self, store: Any, tap: UsageTap, budget: Budget | None, input: int | None, reserved: Sequence[int]
    ) -> None:
        self.store = store
        self.tap = tap
        self.budget = budget
        self.input = input  # the estimated input tokens; None: the body could not be read
        self.reserved = reserved  # what was reserved per limit (the unreadable charge, for such a body)

    def over(self, ex: Exchange) -> None:
        """The request is over, whichever way: its usage, then settle or refund, then release."""
        usage = self.usage(ex)
        ex.usage = usage
        held = ex.held
        if held is None:
            return
        ex.held = None
        store = self.store
        try:
            if not held.tokens:
                pass  # nothing reserved: no token limit, or Redis could not be asked (on_error: open)
            elif usage is None:
                refund(store, held)
            elif usage.source == "estimate" and self.input is None:
                settle(store, held, self.reserved)  # an unreadable body, no usage reported: its charge in full
            else:
                assert self.budget is not None
                settle(store, held, costs(self.budget, usage.input, usage.output))
        finally:
            release(store, held)

    def usage(self, ex: Exchange) -> Usage | None:
        """What this request is charged: None when nothing is (refunded); an estimate is flagged by its source."""
        if not ex.attempted or ex.attempts == 0:
            return None  # nothing went up: refused after admission, no upstream, the client left first
        tap = self.tap
        request = ex.request
        if self.budget is None:  # observed for the metrics alone: the provider's usage of a whole answer
            whole = not ex.client_gone and ex.error is None and 200 <= ex.status < 300
            return tap.usage() if whole else None
        if not ex.client_gone:
            if not getattr(request, "started", False) or not 200 <= ex.status < 300:
                return None  # the upstream failed before the first byte, or answered an error: not charged
            if ex.error is None:
                seen = tap.usage()
                if seen is not None:
                    return seen
        # Left, cut, or no usage reported: estimated from what was relayed.
        return tap.estimate(self.input or 0)
