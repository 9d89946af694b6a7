"""What SREs and compliance owners see of token usage: metrics, access-log and audit fields (issue 19).

Each request's usage (``Exchange.usage``) is tallied per loop like the other
request counts and folded into ``regiongate_tokens_total`` with a model label
bounded by the policy; its access-log line and audit entry carry ``usage`` and
``caller`` only when they are known (lines without them are pinned byte for
byte by ``test_record_compat.py``). No caller, key or address ever becomes a
label.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway.accesslog import AccessLog, AddressRedactor
from gateway.clientip import ClientAddress, parse_address
from gateway.evidence.chain import Sealer, make_key, verify
from gateway.evidence.entries import EntryError, RequestEntry, parse_entry
from gateway.geo import GeoFacts
from gateway.live.active import PolicyVersion
from gateway.metrics import OTHER_MODEL, Metrics, ModelLabels
from gateway.policy import Decision, parse_policy
from gateway.policy.tokenlimit import Budget, TokenLimit
from gateway.proxy.record import Record
from gateway.shared.audit import Audit
from gateway.usage import Usage

POLICY = """\
version: 1
upstreams:
  eu: {url: "https://eu.example.com", models: {gpt-4o-mini: eu-mini}}
defaults: {action: deny, unknown: deny, private: allow, invalid: deny}
rules:
  - {name: minis, countries: [DE], models: ["gpt-4o-mini", "o3*"], action: allow}
  - {name: routed, countries: [FR], action: route, upstream: eu, allow_models: ["gpt-4o-mini", "gpt-4.1"]}
  - {name: gb, countries: [GB], action: allow}
"""
ALLOW = Decision("allow", "allow", "gb", "country GB", "default")
CALLER = "team-a"
SECRET = "sk-rg-never-in-a-label"


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_model_labels_are_the_policys_names_else_other() -> None:
    labels = ModelLabels.of(parse_policy(POLICY, "p.yaml"))
    # Rules' models and allow_models, both sides of an upstream's map; a pattern is its own label.
    assert labels.exact == {"gpt-4o-mini", "gpt-4.1", "eu-mini"}
    assert [labels(m) for m in ("gpt-4o-mini", "eu-mini", "o3-mini", "o3", "gpt-4o", None, "x" * 5000)] == [
        "gpt-4o-mini", "eu-mini", "o3*", "o3*", OTHER_MODEL, OTHER_MODEL, OTHER_MODEL,
    ]  # fmt: skip
    longest = ModelLabels(["o*", "o3*", "o3-pro"])
    assert (longest("o3-pro"), longest("o3-pro-2"), longest("o1")) == ("o3-pro", "o3*", "o*")


def test_tokens_are_tallied_then_folded_by_country_model_kind_and_source() -> None:
    m = Metrics(CollectorRegistry())
    m.budgets_in_force(parse_policy(POLICY, "p.yaml"))
    m.tokens("DE", "gpt-4o-mini", Usage(100, 20, cached=64, reasoning=0))
    m.tokens("DE", "gpt-4o-mini", Usage(50, 5, cached=0, reasoning=3))
    m.tokens("DE", "made-up-model-1", Usage(7, 1, source="estimate"))
    m.tokens("DE", "made-up-model-2", Usage(3, 2, source="estimate"))
    assert value(m, "regiongate_tokens_total", country="DE", model="gpt-4o-mini", kind="input", source="usage") is None
    m.fold()  # in prometheus-client only now, and all at once
    de = {"country": "DE", "model": "gpt-4o-mini", "source": "usage"}
    assert [value(m, "regiongate_tokens_total", kind=k, **de) for k in ("input", "output", "cached", "reasoning")] == [
        150, 25, 64, 3,
    ]  # fmt: skip
    other = {"country": "DE", "model": OTHER_MODEL, "source": "estimate"}
    assert value(m, "regiongate_tokens_total", kind="input", **other) == 10
    # A kind is a series from its first token: no cached or reasoning series at 0 for an estimate.
    assert value(m, "regiongate_tokens_total", kind="cached", **other) is None
    text = generate_latest(m.registry).decode()
    assert "made-up-model" not in text


def test_a_reload_recomputes_the_model_labels_and_keeps_the_series_of_names_dropped() -> None:
    m = Metrics(CollectorRegistry())
    first = parse_policy(POLICY, "p.yaml")
    m.policy_swapped(None, PolicyVersion(first, POLICY, 0.0))
    m.tokens("DE", "gpt-4.1", Usage(10, 1))
    m.fold()
    later = POLICY.replace(', "gpt-4.1"', "")
    m.policy_swapped(PolicyVersion(first, POLICY, 0.0), PolicyVersion(parse_policy(later, "p.yaml"), later, 1.0))
    m.tokens("DE", "gpt-4.1", Usage(5, 1))
    m.fold()
    labels = {"country": "DE", "kind": "input", "source": "usage"}
    assert value(m, "regiongate_tokens_total", model="gpt-4.1", **labels) == 10  # kept, no longer growing
    assert value(m, "regiongate_tokens_total", model=OTHER_MODEL, **labels) == 5


BUDGETED = POLICY.replace(
    "  - {name: gb, countries: [GB], action: allow}\n",
    "  - name: gb\n    countries: [GB]\n    action: allow\n    token_limit:\n"
    "      - {tokens: 120000, per: 1m, by: [ip], count: total}\n"
    "      - {tokens: 8640000, per: 1d, by: [country, model], count: output, kind: quota}\n",
)


def test_the_limits_in_force_are_gauges_replaced_on_reload() -> None:
    m = Metrics(CollectorRegistry())
    plain = PolicyVersion(parse_policy(POLICY, "p.yaml"), POLICY, 0.0)
    budgeted = PolicyVersion(parse_policy(BUDGETED, "p.yaml"), BUDGETED, 1.0)
    m.policy_swapped(None, budgeted)
    limit = "regiongate_budget_limit_tokens_per_second"
    assert value(m, limit, rule="gb", limit="0", kind="rate") == 2000  # 120,000 a minute
    assert value(m, limit, rule="gb", limit="1", kind="quota") == 100  # 8,640,000 a day
    m.policy_swapped(budgeted, plain)  # the limits are gone with the policy that set them
    assert value(m, limit, rule="gb", limit="0", kind="rate") is None
    assert limit + "{" not in generate_latest(m.registry).decode()


def test_budget_charges_refusals_and_fallbacks() -> None:
    m = Metrics(CollectorRegistry())
    budget = Budget(
        "eu-api",
        (
            TokenLimit("eu-api", 0, 200_000, 60.0, ("api_key",), "total"),
            TokenLimit("eu-api", 1, 5_000_000, 86_400.0, ("country", "model"), "output", "quota"),
            TokenLimit("eu-api", 2, 1_000, 1.0, ("rule",), "input"),
        ),
    )
    m.budget_spent(budget, Usage(100, 30))
    m.budget_spent(budget, Usage(10, 3, source="estimate"))
    m.fold()
    charged = [value(m, "regiongate_budget_tokens_total", rule="eu-api", limit=str(i), kind=k) for i, k in
               ((0, "rate"), (1, "quota"), (2, "rate"))]  # fmt: skip
    assert charged == [143, 33, 110]
    m.budget_refused("eu-api", "quota")
    m.budget_refused("eu-api", "quota")
    m.budget_refused("eu-api", "concurrency")
    m.budget_fallback("eu-api", "tokens")
    assert value(m, "regiongate_budget_refusals_total", rule="eu-api", kind="quota") == 2
    assert value(m, "regiongate_budget_refusals_total", rule="eu-api", kind="concurrency") == 1
    assert value(m, "regiongate_budget_fallbacks_total", rule="eu-api", what="tokens") == 1


def exchange(usage: Usage | None, caller: str | None, decision: Decision = ALLOW) -> Any:
    """A finished exchange as the record reads it (the fields of gateway.proxy.exchange.Exchange)."""
    ip = parse_address("2.125.160.216")
    return SimpleNamespace(
        request=SimpleNamespace(method="POST", raw_path=b"/v1/chat/completions"),
        request_id="rg-1",
        started=0.0,
        active=SimpleNamespace(tag="aa" * 6, shadow_tag=None, shadow=None, policy=SimpleNamespace(sha256="a" * 64)),
        path="/v1/chat/completions",
        client=ClientAddress(ip, "public", "x-forwarded-for", "2.125.160.216", None),
        facts=GeoFacts(country="GB"),
        decision=decision,
        shadow=None,
        model="gpt-4o-mini",
        attempts=1,
        target=None,
        failovers=None,
        refused=None,
        client_gone=False,
        status=200,
        sent=812,
        error=None,
        ttfb=0.01,
        via="proxy",
        usage=usage,
        caller=caller,
    )


def recorded(tmp_path: Path, ex: Any, audit_mode: str = "all") -> tuple[dict[str, Any], list[dict[str, Any]], Metrics]:
    """The access-log line (decoded), the audit entries and the metrics of one written exchange."""
    audit = Audit(audit_mode, 1000)  # type: ignore[arg-type]
    audit.queue = asyncio.Queue()  # what start() makes once the gateway runs; read here instead of written
    log = AccessLog(str(tmp_path / "access.log"), AddressRedactor("hashed", b"k" * 16))
    metrics = Metrics(CollectorRegistry())
    Record(SimpleNamespace(access_log=log, audit=audit), metrics).write(ex)  # type: ignore[arg-type]
    log.close()
    (line,) = (tmp_path / "access.log").read_bytes().splitlines()
    entries = []
    while not audit.queue.empty():
        entries.append(audit.queue.get_nowait())
    metrics.fold()
    return orjson.loads(line), entries, metrics


def test_usage_and_caller_reach_the_log_the_audit_entry_and_the_metrics(tmp_path: Path) -> None:
    usage = Usage(812, 64, cached=512, reasoning=16, source="usage")
    line, (entry,), metrics = recorded(tmp_path, exchange(usage, CALLER))
    want = {"input": 812, "output": 64, "cached": 512, "reasoning": 16, "source": "usage"}
    assert line["usage"] == want and line["caller"] == CALLER
    assert list(line)[-2:] == ["caller", "usage"]  # last: the keys before them keep their places
    assert entry["usage"] == want and entry["caller"] == CALLER
    assert value(metrics, "regiongate_tokens_total", country="GB", model=OTHER_MODEL, kind="cached", source="usage")
    # The caller is in the log and the audit stream, never in a label; no address either (hashed mode).
    text = generate_latest(metrics.registry).decode()
    assert CALLER not in text and "2.125.160.216" not in text and "2.125.160.216" not in str(line)


def test_without_usage_or_caller_neither_field_is_written(tmp_path: Path) -> None:
    line, (entry,), metrics = recorded(tmp_path, exchange(None, None))
    assert "usage" not in line and "caller" not in line
    assert "usage" not in entry and "caller" not in entry
    assert b"regiongate_tokens_total{" not in generate_latest(metrics.registry)


def test_an_estimate_is_flagged_in_the_log_the_audit_entry_and_the_metrics(tmp_path: Path) -> None:
    line, (entry,), metrics = recorded(tmp_path, exchange(Usage(9, 4, source="estimate"), None))
    # cached and reasoning only when there are some
    assert line["usage"] == entry["usage"] == {"input": 9, "output": 4, "source": "estimate"}
    labels = {"country": "GB", "model": OTHER_MODEL, "kind": "output"}
    assert value(metrics, "regiongate_tokens_total", source="estimate", **labels) == 4
    assert value(metrics, "regiongate_tokens_total", source="usage", **labels) is None


def test_a_charged_rule_counts_what_its_decision_budget_says(tmp_path: Path) -> None:
    """With Decision.budget (issue 19), the record charges each token limit of the deciding rule."""
    budget = Budget("gb", (TokenLimit("gb", 0, 1000, 60.0, ("ip",), "output", "quota"),))
    decision = Decision("allow", "allow", "gb", "country GB", "default", budget=budget)
    _, _, metrics = recorded(tmp_path, exchange(Usage(100, 40), CALLER, decision))
    assert value(metrics, "regiongate_budget_tokens_total", rule="gb", limit="0", kind="quota") == 40


def test_usage_in_an_audit_entry_is_sealed_parsed_and_checked() -> None:
    usage = {"input": 812, "output": 64, "cached": 3, "reasoning": 1, "source": "estimate"}
    body: dict[str, Any] = {
        "kind": "request", "time": "2026-12-01T00:00:00.000+00:00", "request_id": "rg-1", "decision": "allow",
        "rule": "gb", "country": "GB", "subdivisions": [], "asn": None, "path": "/v1/chat/completions",
        "model": None, "policy": "p", "client": None, "caller": CALLER, "usage": usage,
    }  # fmt: skip
    key = make_key("k1", "s" * 32)
    sealer = Sealer("host/1/1", key)
    ends = {"kind": "start", "time": "t"}, {"kind": "stop", "time": "t"}
    written = [orjson.loads(sealer.seal(e)) for e in (ends[0], body, ends[1])]
    items = [(f"{i}-0", e) for i, e in enumerate(written)]
    assert verify(items, {key.kid: key.secret}).ok
    tampered = [*items[:1], ("1-0", written[1] | {"usage": usage | {"output": 6}}), *items[2:]]
    assert not verify(tampered, {key.kid: key.secret}).ok
    parsed = parse_entry(written[1])
    assert isinstance(parsed, RequestEntry) and parsed.usage == usage and parsed.caller == CALLER
    old = parse_entry({k: v for k, v in written[1].items() if k not in ("usage", "caller")})
    assert isinstance(old, RequestEntry) and old.usage is None and old.caller is None
    plain = {"input": 1, "output": 2, "source": "usage"}  # no cached or reasoning tokens: not written
    assert parse_entry(written[1] | {"usage": plain}).usage == plain  # type: ignore[attr-defined]
    for bad, why in (
        (usage | {"output": -1}, "usage.output"),
        (usage | {"input": True}, "usage.input"),
        (usage | {"source": "guess"}, "usage.source"),
        ({"input": 1, "source": "usage"}, "'usage' has"),
        (usage | {"tokens": 1}, "'usage' has"),
    ):
        with pytest.raises(EntryError, match=why):
            parse_entry(written[1] | {"usage": bad})
    with pytest.raises(EntryError, match="'usage' is list"):
        parse_entry(written[1] | {"usage": [1]})
