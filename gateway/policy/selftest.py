"""The policy's own ``tests:``: addresses with the decision they must get.

A test is judged as ``explain`` judges an address given as text
(:func:`judge_ip`), through the same :func:`~.decide.decide_model` the proxy
ends with, so a passing test is a promise about real requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import geo as geofacts
from ..clientip import INVALID, MISSING, PRIVATE, AddressError, ClientAddress, classify, parse_address
from ..geo import GeoFacts
from .compiled import Decision, Policy
from .decide import decide_model
from .schema import PolicyTest


@dataclass(frozen=True, slots=True)
class TestResult:
    index: int
    line: int | None
    test: PolicyTest
    decision: Decision
    facts: GeoFacts
    passed: bool
    problem: str | None


def judge_ip(
    policy: Policy, geo: geofacts.Geo, ip_text: str, path: str, missing: bool = False, model: str | None = None
) -> tuple[ClientAddress, GeoFacts, Decision]:
    """Decide for an address given as text, as ``explain`` and policy tests do.

    ``missing``: the address is a trusted proxy's that sent no client address.
    ``model``: the request body's model; None judges it as unknown.
    """
    try:
        ip = parse_address(ip_text)
    except AddressError as e:
        client = ClientAddress(None, INVALID, "argument", ip_text, str(e))
    else:
        if missing:
            client = ClientAddress(ip, MISSING, "argument", ip_text, "a trusted proxy that named no client")
        else:
            client = ClientAddress(ip, classify(ip), "argument", ip_text)
    judged = client.ip if client.kind not in (PRIVATE, MISSING) else None  # only a public address has facts
    facts = geo.lookup(judged) if judged is not None else geofacts.NO_FACTS
    return client, facts, decide_model(policy, client, facts, path, model)


def run_tests(policy: Policy, geo: geofacts.Geo) -> list[TestResult]:
    results = []
    for i, t in enumerate(policy.spec.tests):
        _client, facts, decision = judge_ip(policy, geo, t.ip, t.path, t.missing, t.model)
        problem = None
        if decision.verdict != t.expect:
            problem = f"expected {t.expect}, got {decision.verdict} ({decision.reason})"
        elif t.rule is not None and decision.rule != t.rule:
            problem = f"expected rule {t.rule!r}, got {decision.rule!r}"
        elif t.upstream is not None and decision.upstream != t.upstream:
            problem = f"expected upstream {t.upstream!r}, got {decision.upstream!r}"
        results.append(TestResult(i, policy.test_lines[i], t, decision, facts, problem is None, problem))
    return results
