"""The decision: a pure function of (policy, client, facts, path, model).

:func:`decide` is a short loop over compiled rules: no I/O, no clock, no
globals, and no allocation unless a shadow rule fires. :func:`model_refusal`
applies the deciding rule's ``allow_models`` once the model is known.
"""

from __future__ import annotations

import dataclasses

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
    shadow: list[str] | None = None
    ip = client.ip
    for rule in policy.rules:
        if rule.matches(ip, country, facts, path):
            if rule.models is not None:
                if model is UNREAD:
                    return NEEDS_MODEL
                if not rule.model_matches(model):
                    continue
            if not rule.shadow:
                decision = rule.decision
                break
            if shadow is None:
                shadow = []
            shadow.append(rule.name)
    else:
        if kind == MISSING:
            decision = policy.on_missing
        elif kind == PRIVATE:
            decision = policy.on_private
        elif country is None:
            decision = policy.on_unknown
        else:
            decision = policy.on_default
    if shadow:
        return dataclasses.replace(decision, shadow=tuple(shadow))
    return decision


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
