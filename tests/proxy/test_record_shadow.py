"""A refusal the shadow policy would have made is audit evidence too: a would-be refusal.

Issue 18's report counts would-be refusals of ``action: monitor`` rules and of the shadow policy.
The first are requests judged ``monitor``; the second are requests the enforced policy let through
and the shadow policy would have refused, so ``Record.write`` writes them to the audit stream
(with ``--audit refusals``, under the same per-network budget as refusals) with the shadow's
verdict and rule beside the enforced ones.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.accesslog import AccessLog, AddressRedactor
from gateway.clientip import ClientAddress, parse_address
from gateway.geo import GeoFacts
from gateway.metrics import Metrics
from gateway.policy import Decision
from gateway.proxy.record import Record
from gateway.shared.audit import Audit

ALLOW = Decision(verdict="allow", action="allow", rule="supported", reason="")
DENY = Decision(verdict="deny", action="deny", rule="tighter", reason="", upstream=None)
OTHER_ALLOW = Decision(verdict="route", action="route", rule="eu", reason="", upstream="eu")


def exchange(decision: Decision, shadow: Decision | None) -> Any:
    ip = parse_address("89.160.20.112")
    return SimpleNamespace(
        request=SimpleNamespace(method="GET", raw_path=b"/v1/models"),
        request_id="rg-1",
        started=0.0,
        active=SimpleNamespace(
            tag="sha256:aa", shadow_tag="sha256:bb", shadow=object(), policy=SimpleNamespace(sha256="a" * 64)
        ),
        path="/v1/models",
        client=ClientAddress(ip, "public", "x-forwarded-for", "89.160.20.112", None),
        facts=GeoFacts(country="SE"),
        decision=decision,
        shadow=shadow,
        model=None,
        attempts=0,
        target=None,
        failovers=None,
        refused=None,
        client_gone=False,
        status=200 if decision.verdict != "deny" else 403,
        sent=0,
        error=None,
        ttfb=None,
        via="proxy",
        usage=None,
        caller=None,
    )


def written(decision: Decision, shadow: Decision | None, mode: str = "refusals") -> list[dict[str, Any]]:
    audit = Audit(mode, 1000)  # type: ignore[arg-type]
    audit.queue = asyncio.Queue()  # what start() makes once the gateway runs; read here instead of written
    runtime = SimpleNamespace(access_log=AccessLog("off", AddressRedactor("full", b"k" * 16)), audit=audit)
    Record(runtime, Metrics(CollectorRegistry())).write(exchange(decision, shadow))  # type: ignore[arg-type]
    out = []
    while not audit.queue.empty():
        out.append(audit.queue.get_nowait())
    return out


def test_a_request_the_shadow_policy_would_refuse_is_written_with_its_verdict_and_rule() -> None:
    (entry,) = written(ALLOW, DENY)
    assert (entry["decision"], entry["rule"]) == ("allow", "supported")
    assert (entry["shadow_decision"], entry["shadow_rule"]) == ("deny", "tighter")


def test_other_disagreements_and_agreements_are_not_refusals() -> None:
    assert written(ALLOW, OTHER_ALLOW) == []  # the shadow would route: not a would-be refusal
    assert written(ALLOW, None) == [] and written(ALLOW, ALLOW) == []
    (refusal,) = written(DENY, ALLOW)  # a refusal is written as ever; the shadow's verdict beside it
    assert (refusal["decision"], refusal["shadow_decision"]) == ("deny", "allow")
    (plain,) = written(DENY, None)
    assert "shadow_decision" not in plain and "shadow_rule" not in plain  # entries as they were


def test_with_audit_all_every_decision_is_written_and_the_shadow_named_where_it_differs() -> None:
    (allowed,) = written(ALLOW, None, "all")
    assert "shadow_decision" not in allowed
    (routed,) = written(ALLOW, OTHER_ALLOW, "all")
    assert (routed["shadow_decision"], routed["shadow_rule"]) == ("route", "eu")
