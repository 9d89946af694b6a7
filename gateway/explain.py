"""The answer to "what would the gateway do with this address, and why?".

One report (:class:`gateway.reports.ExplainOut`) for ``regiongate explain`` and ``GET /admin/explain``, so the
command line and the running gateway can never tell an operator two
different stories. The decision comes from ``decide()`` (via ``judge_ip``),
the walk from :mod:`gateway.trace`, the words from :mod:`gateway.georecords`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import georecords
from .clientip import PUBLIC
from .geo import Geo
from .modelfield import read_model
from .policy import Decision, Policy, judge_ip, request_path
from .policy.overrides import Compiled, judge
from .policy.tokenlimit import reservation
from .reports import ExplainOut, dump
from .trace import Trace, trace
from .usage.estimate import input_tokens
from .usage.request import RequestTokens, read_request


@dataclass(frozen=True, slots=True)
class Explanation:
    model: ExplainOut  # what --json prints and /admin/explain returns
    trace: Trace | None
    records: tuple[georecords.Record, ...]

    @property
    def report(self) -> dict[str, Any]:
        """The report as JSON: only the keys that apply, in the model's order."""
        return dump(self.model)


def explain(
    policy: Policy,
    geo: Geo,
    ip_text: str,
    path: str,
    *,
    with_trace: bool = False,
    missing: bool = False,
    overrides: Compiled | None = None,
    model: str | None = None,
    body: bytes | None = None,
    max_tokens: int | None = None,
) -> Explanation:
    """The report for one address and path (and model, body, max_tokens when given).

    A ``body`` is read as the gateway reads a held one: its model (when
    ``model`` is not given; :class:`~gateway.modelfield.BadBody` when it cannot
    be told) and its token fields (:class:`~gateway.usage.request.BadTokens` for
    a max_tokens that is not a positive integer), both answered with a 400 there.
    ``max_tokens`` stands for the body's own.
    """
    path = request_path(path)
    if body is not None and model is None and len(body) <= policy.spec.body.max_bytes and _is_object(body):
        model = read_model(body).model
    client, facts, decision = judge_ip(policy, geo, ip_text, path, missing, model)
    override = judge(overrides, client, facts, None) if overrides else None
    rule = next((r for r in policy.rules if r.name == decision.rule), None)
    country = facts.country if policy.field == "country" else facts.registered_country
    # A default's reason says it all; only a rule has conditions to explain.
    why = rule.why(client.ip, country, facts, path) if rule else []
    rule_line = rule.line if rule else policy.default_lines.get(decision.rule)
    records: list[georecords.Record] = []
    if client.ip is not None and client.kind == PUBLIC:
        records = georecords.lookup_all([s.path for s in geo.sources if s.path], client.ip)
    out: dict[str, Any] = {
        "ip": ip_text,
        "normalized": str(client.ip) if client.ip is not None else None,
        "kind": client.kind,
        "problem": client.problem,
        "path": path,
        "model": model,
        "decision": decision.verdict,
        "action": decision.action,
        "rule": decision.rule,
        "rule_line": rule_line,
        "rule_conditions": rule.conditions() if rule else None,
        "reason": decision.reason,
        "why": why,
        "shadow": list(decision.shadow),
        "upstream": decision.upstream,
        "status": (403 if decision.model_refused else policy.spec.block.status) if decision.verdict == "deny" else None,
        "facts": facts.as_dict(),
        "records": [r.as_dict() for r in records],
        "policy": {"path": policy.source, "sha256": policy.sha256, "mode": policy.spec.mode, "geo_field": policy.field},
        "geo": [s.as_dict() for s in geo.sources],
    }
    if override is not None:  # it decides before any rule; the trace below stays the policy's own walk
        o = next(o for o in overrides.overrides if f"override:{o.id}" == override.rule)  # type: ignore[union-attr]
        out |= {
            "decision": override.verdict,
            "action": override.action,
            "rule": override.rule,
            "rule_line": None,
            "rule_conditions": None,
            "reason": override.reason,
            "why": [f"runtime override {o.id}: {o.action} {o.kind} {o.public()['value']}, before the policy's rules"],
            "status": policy.spec.block.status if override.verdict == "deny" else None,
            "override": o.public(),
        }
    lim = decision.limit
    if lim is not None and override is None:  # only when the deciding rule has one, so older reports stay as they were
        out["rate_limit"] = {"requests": lim.requests, "per": lim.per, "by": lim.by, "burst": lim.burst}
    if decision.allow_models is not None and override is None:
        out["allow_models"] = decision.allow_models.listed()
    if override is None:
        out |= _budget(decision, policy, path, model, body, max_tokens)
    walk = trace(policy, client, facts, path, model) if with_trace else None
    if walk is not None:
        out["trace"] = walk.report()
    return Explanation(ExplainOut.model_validate(out), walk, tuple(records))


def _is_object(body: bytes) -> bool:
    return body.lstrip()[:1] == b"{"


def _budget(
    decision: Decision, policy: Policy, path: str, model: str | None, body: bytes | None, max_tokens: int | None
) -> dict[str, Any]:
    """The deciding rule's client keys, token limits, concurrency and reserve, and, given a body or a
    max_tokens, what the request would reserve under each limit (as the gateway reserves it)."""
    out: dict[str, Any] = {}
    if decision.client_keys:
        out["client_keys"] = "required"
    if decision.limit is not None:
        out["redis_on_error"] = policy.spec.redis.on_error
    budget = decision.budget
    if budget is None:
        return out
    costs: tuple[int, ...] | None = None
    if budget.tokens and (body is not None or max_tokens is not None):
        asked = (
            read_request(body, path)
            if body is not None and len(body) <= policy.spec.body.max_bytes
            else RequestTokens(None, False, False, readable=body is None)
        )
        cap = max_tokens if max_tokens is not None else asked.output_cap
        if not asked.readable:
            costs = reservation(budget, None, cap)
            reserved = {"readable": False, "input": None, "output": budget.unreadable, "output_from": "unreadable"}
        else:
            given = input_tokens(body, model) if body is not None else None
            costs = reservation(budget, given or 0, cap)
            reserved = {
                "readable": True,
                "input": given,
                "output": cap if cap is not None else budget.output_default,
                "output_from": "max_tokens" if cap is not None else "token_reserve.output",
            }
            if body is not None:
                reserved["estimate_model"] = model
        out["reservation"] = reserved
    if budget.tokens:
        out["token_limit"] = [
            {
                "index": t.index,
                "tokens": t.tokens,
                "per": t.per,
                "by": list(t.by),
                "count": t.count,
                "kind": t.kind,
                **({"burst": t.capacity} if t.kind == "rate" else {}),
                **({"reserves": costs[j], "fits": costs[j] <= t.capacity} if costs is not None else {}),
            }
            for j, t in enumerate(budget.tokens)
        ]
    if budget.concurrency is not None:
        out["max_concurrent"] = {"streams": budget.concurrency.streams, "by": list(budget.concurrency.by)}
    if budget.tokens:
        out["token_reserve"] = {"output": budget.output_default, "unreadable": budget.unreadable}
    out["redis_on_error"] = policy.spec.redis.on_error
    return out
