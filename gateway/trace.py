"""Every rule's verdict on one request, for ``explain --trace``.

``decide()`` stops at the first enforcing match and keeps nothing; an
operator asking "why not rule X?" needs the whole walk. The walk here asks
each compiled :class:`~gateway.policy.Rule` the same question ``decide()``
asks (``Rule.matches``), and asks it again one key at a time (the rule with
every other key cleared), so the per-key verdicts are the gateway's own and
cannot drift from it. Not on the request path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .clientip import INVALID, PRIVATE, ClientAddress
from .geo import GeoFacts
from .policy import Decision, Policy, Rule, model_refusal
from .reports import DecisionOut, KeyCheckOut, RuleStepOut, TraceOut

KEYS = ("countries", "subdivisions", "asns", "anonymizer", "cidrs", "paths")  # what Rule.matches looks at
_SHOWN = 8  # values listed before "…"


@dataclass(frozen=True, slots=True)
class KeyCheck:
    """One key of one rule: whether the request satisfied it, in words."""

    key: str
    matched: bool
    detail: str


@dataclass(frozen=True, slots=True)
class RuleStep:
    index: int
    name: str
    line: int | None
    action: str
    shadow: bool
    matched: bool
    reached: bool  # False after the deciding rule: shown for completeness, not consulted by decide()
    checks: tuple[KeyCheck, ...]

    @property
    def failed(self) -> tuple[KeyCheck, ...]:
        return tuple(c for c in self.checks if not c.matched)


@dataclass(frozen=True, slots=True)
class Trace:
    """The walk: rules in order (all of them unless the client was invalid),
    then which default applied if no enforcing rule matched."""

    client_kind: str
    address: str | None
    path: str
    geo_field: str
    country: str | None
    consulted: bool
    steps: tuple[RuleStep, ...]
    default: str | None
    decision: Decision

    def report(self) -> TraceOut:
        """The walk as its report model: what ``explain --trace --json`` and ``/admin/explain`` show."""
        d = self.decision
        return TraceOut(
            client_kind=self.client_kind,
            address=self.address,
            path=self.path,
            geo_field=self.geo_field,
            country=self.country,
            rules_consulted=self.consulted,
            rules=[
                RuleStepOut(
                    index=s.index,
                    name=s.name,
                    line=s.line,
                    action=s.action,
                    mode="monitor" if s.shadow else "enforce",
                    matched=s.matched,
                    reached=s.reached,
                    checks=[KeyCheckOut(key=c.key, matched=c.matched, detail=c.detail) for c in s.checks],
                )
                for s in self.steps
            ],
            default=self.default,
            decision=DecisionOut(
                verdict=d.verdict, action=d.action, rule=d.rule, reason=d.reason, shadow=list(d.shadow)
            ),
        )

    def lines(self) -> list[str]:
        """The walk in words, one line per rule and one per key."""
        out = []
        if not self.consulted:
            out.append("rules not consulted: the client address could not be read")
        for s in self.steps:
            where = f" (line {s.line})" if s.line else ""
            mode = ", mode monitor" if s.shadow else ""
            if s.matched:
                what = "matched, recorded as shadow, not enforced" if s.shadow else f"MATCHED -> {s.action}"
            else:
                what = "no match"
            later = "" if s.reached else " (after the deciding rule)"
            out.append(f"{s.index + 1}. {s.name}{where} [{s.action}{mode}]: {what}{later}")
            for c in s.checks:
                out.append(f"     {'ok  ' if c.matched else 'FAIL'} {c.detail}")
        if self.default is not None:
            out.append(f"default: {self.default} -> {self.decision.action} ({self.decision.reason})")
        return out


def _only(rule: Rule, key: str) -> Rule:
    """The rule with every key but ``key`` cleared: its ``matches`` judges that key alone."""
    cleared: dict[str, Any] = {k: None for k in KEYS if k != key}
    return dataclasses.replace(rule, **cleared)


def _listing(values: list[str]) -> str:
    shown = ", ".join(values[:_SHOWN])
    more = f", … ({len(values)} in all)" if len(values) > _SHOWN else ""
    return f"[{shown}{more}]"


def _failure(rule: Rule, key: str, client: ClientAddress, country: str | None, facts: GeoFacts, path: str) -> str:
    listed = rule.conditions()[key]
    values = _listing([str(v) if key != "asns" else f"AS{v}" for v in listed])
    if key == "countries":
        return f"countries: {country or 'no country'} not in {values}"
    if key == "subdivisions":
        have = ", ".join(facts.subdivisions) or "no subdivision"
        return f"subdivisions: {have} not in {values}"
    if key == "asns":
        have = f"AS{facts.asn}" if facts.asn is not None else "no ASN"
        return f"asns: {have} not in {values}"
    if key == "anonymizer":
        have = ", ".join(sorted(facts.anonymizer)) or "not flagged"
        return f"anonymizer: {have} not in {values}"
    if key == "cidrs":
        return f"cidrs: {client.ip if client.ip is not None else 'no address'} not in {values}"
    return f"paths: {path} not in {values}"


def _checks(
    rule: Rule, client: ClientAddress, country: str | None, facts: GeoFacts, path: str, model: str | None
) -> tuple[KeyCheck, ...]:
    out = []
    for key in KEYS:
        if getattr(rule, key) is None:
            continue
        single = _only(rule, key)
        if single.matches(client.ip, country, facts, path):
            detail = single.why(client.ip, country, facts, path)[0]
            out.append(KeyCheck(key, True, detail))
        else:
            out.append(KeyCheck(key, False, _failure(rule, key, client, country, facts, path)))
    if rule.models is not None:
        listed = _listing(rule.models.listed())
        if model is None:
            taken = "taken as matching" if rule.unknown_matches else "taken as not matching"
            out.append(
                KeyCheck("models", rule.unknown_matches, f"models: the model is unknown, {taken} (body.unknown_model)")
            )
        elif rule.model_matches(model):
            out.append(KeyCheck("models", True, f"model {model} is in models"))
        else:
            out.append(KeyCheck("models", False, f"models: {model} not in {listed}"))
    if not out:
        out.append(KeyCheck("(none)", True, "the rule has no conditions: it matches everything"))
    return tuple(out)


def trace(policy: Policy, client: ClientAddress, facts: GeoFacts, path: str, model: str | None = None) -> Trace:
    """Walk every rule for one request. The resulting decision is what
    ``decide_model()`` returns for the same arguments (a property test holds it to that);
    ``model`` None is a request whose model is unknown."""
    country = facts.country if policy.field == "country" else facts.registered_country
    address = str(client.ip) if client.ip is not None else None
    if client.kind == INVALID:
        invalid = policy.on_invalid
        return Trace(client.kind, address, path, policy.field, country, False, (), "defaults.invalid", invalid)
    steps = []
    decided: Decision | None = None
    shadow: list[str] = []
    for i, rule in enumerate(policy.rules):
        matched = rule.matches(client.ip, country, facts, path) and rule.model_matches(model)
        checks = _checks(rule, client, country, facts, path, model)
        steps.append(RuleStep(i, rule.name, rule.line, rule.action, rule.shadow, matched, decided is None, checks))
        if matched and decided is None:
            if rule.shadow:
                shadow.append(rule.name)
            else:
                decided = rule.decision
    default = None
    if decided is None:
        if client.kind == PRIVATE:
            decided, default = policy.on_private, "defaults.private"
        elif country is None:
            decided, default = policy.on_unknown, "defaults.unknown"
        else:
            decided, default = policy.on_default, "defaults.action"
    if shadow:
        decided = dataclasses.replace(decided, shadow=tuple(shadow))
    decided = model_refusal(policy, decided, model) or decided
    return Trace(client.kind, address, path, policy.field, country, True, tuple(steps), default, decided)
