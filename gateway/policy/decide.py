"""The decision: a pure function of (policy, client, facts, path, model).

:func:`decide` asks the policy's rule index (:mod:`.index`) for the rules the
request matches, in the policy's order, and stops at the first one that
enforces: no I/O, no clock, no globals, and a cost that does not grow with
the number of rules. :func:`decide_in_order` is the same decision by trying
each rule in turn, the definition the index is held to (a property test
compares them) and the walk ``explain --trace`` shows. :func:`model_refusal`
applies the deciding rule's ``allow_models`` once the model is known.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from ..clientip import INVALID, MISSING, PRIVATE, ClientAddress
from ..geo import GeoFacts
from ..requestpath import canonical
from .compiled import NEEDS_MODEL, UNREAD, Decision, Policy, Unread, make_decision
from .schema import DENY


def decide(
    policy: Policy, client: ClientAddress, facts: GeoFacts, path: str, model: str | Unread | None = UNREAD
) -> Decision:
    """The decision for one request. Pure: no I/O, no clock, no globals.

    ``model`` is the request body's model: :data:`UNREAD` until the body was
    read (a rule that looks at the model then returns :data:`NEEDS_MODEL`,
    so that only requests that reach such a rule pay for reading it), ``None``
    when it is unknown (``body.unknown_model`` says which way that goes).
    The deciding rule's ``allow_models`` is :func:`model_refusal`'s.
    """
    kind = client.kind
    if kind == INVALID:
        return policy.on_invalid
    country = facts.country if policy.field == "country" else facts.registered_country
    index = policy.index
    ip = client.ip
    first = index.first(ip, country, facts, path, model)
    if first is None:
        return _default(policy, kind, country)
    rule = policy.rules[first]
    if model is UNREAD and rule.models is not None:
        return NEEDS_MODEL
    if not rule.shadow:
        return rule.decision
    # A mode: monitor rule matched first: the rest of the matches, in order, until one enforces.
    return _decided(policy, index.matching(ip, country, facts, path, model), kind, country, model)


def decide_in_order(
    policy: Policy, client: ClientAddress, facts: GeoFacts, path: str, model: str | Unread | None = UNREAD
) -> Decision:
    """:func:`decide` by trying each rule in the policy's order: what the index must agree with."""
    kind = client.kind
    if kind == INVALID:
        return policy.on_invalid
    country = facts.country if policy.field == "country" else facts.registered_country
    ip = client.ip
    matching = (
        i
        for i, rule in enumerate(policy.rules)
        if rule.matches(ip, country, facts, path) and (model is UNREAD or rule.model_matches(model))
    )
    return _decided(policy, matching, kind, country, model)


def _decided(
    policy: Policy, matching: Iterable[int], kind: str, country: str | None, model: str | Unread | None
) -> Decision:
    """The decision, given the positions of the rules a request matches in order (``models``
    checked unless the model is unread): shadow rules are recorded until one enforces."""
    shadow: list[str] | None = None
    rules = policy.rules
    for i in matching:
        rule = rules[i]
        if model is UNREAD and rule.models is not None:
            return NEEDS_MODEL
        if not rule.shadow:
            decision = rule.decision
            break
        if shadow is None:
            shadow = []
        shadow.append(rule.name)
    else:
        decision = _default(policy, kind, country)
    if shadow:
        return dataclasses.replace(decision, shadow=tuple(shadow))
    return decision


def _default(policy: Policy, kind: str, country: str | None) -> Decision:
    """The default that applies when no enforcing rule matched."""
    if kind == MISSING:
        return policy.on_missing
    if kind == PRIVATE:
        return policy.on_private
    if country is None:
        return policy.on_unknown
    return policy.on_default


def model_refusal(policy: Policy, decision: Decision, model: str | None) -> Decision | None:
    """The refusal for a model outside the deciding rule's ``allow_models``, else None. Pure.

    Under ``mode: monitor`` the refusal is recorded and not enforced, like
    any other denial.
    """
    allowed = decision.allow_models
    if allowed is None:
        return None
    if model is None:
        if policy.unknown_model_allowed:
            return None
        reason = f"rule {decision.rule!r}: the request's model could not be read and allow_models needs it"
    elif model in allowed:
        return None
    else:
        reason = f"rule {decision.rule!r}: model {model[:200]!r} is not in allow_models"
    refusal = make_decision(DENY, decision.rule, reason, policy.spec.mode == "monitor", decision.upstream)
    return dataclasses.replace(refusal, model_refused=True, shadow=decision.shadow)


def decide_model(policy: Policy, client: ClientAddress, facts: GeoFacts, path: str, model: str | None) -> Decision:
    """The whole decision for a request whose model is known (or known to be unknown: None),
    ``allow_models`` included: what the proxy ends with once it has read the body."""
    decision = decide(policy, client, facts, path, model)
    return model_refusal(policy, decision, model) or decision


def request_path(path: str) -> str:
    """A path as rules see it: the canonical form the proxy judges and forwards.

    Raises :class:`requestpath.BadPath` for a path the proxy refuses with a
    400 before any policy is asked.
    """
    return canonical(path.encode("utf-8"))
