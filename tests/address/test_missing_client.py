"""A trusted proxy that names no client: ``defaults.missing``, never "judged as the proxy itself"."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from gateway.cidrs import CidrSet
from gateway.clientip import MISSING, ClientIPConfig, resolve
from gateway.geo import NO_FACTS, Geo
from gateway.policy import decide, judge_ip, load_policy, parse_policy, run_tests
from support.processes import CITY, COUNTRY, POLICIES, GatewayFactory, Stub, write

GB, CN = "2.125.160.216", "175.16.199.1"
TRUST = ClientIPConfig(CidrSet(["127.0.0.0/8", "10.0.0.0/8"]))

POLICY = """\
version: 1
defaults: {action: deny, unknown: deny, private: allow, invalid: deny}
rules:
  - {name: supported, countries: [GB], action: allow}
"""
HEALTH_POLICY = """\
version: 1
defaults: {action: deny, unknown: deny, private: allow, invalid: deny, missing: deny}
rules:
  - {name: proxy-health, cidrs: [127.0.0.1/32], paths: [/v1/models], action: allow}
  - {name: supported, countries: [GB], action: allow}
"""


@pytest.mark.parametrize(
    "headers",
    [
        [],  # no header (or one the front proxy was tricked into dropping)
        [(b"x-forwarded-for", b"")],
        [(b"x-forwarded-for", b" \t")],
        [(b"x-forwarded-for", b""), (b"x-forwarded-for", b"")],
        [(b"x-forwarded-for", b"10.0.0.2, 127.0.0.1")],  # only our own proxies
        [(b"x-forwarded-for", b"::ffff:10.0.0.2")],
        [(b"x-real-ip", b"81.2.69.142")],  # not the configured header
    ],
)
def test_trusted_peer_without_a_client_is_missing(headers: list[tuple[bytes, bytes]]) -> None:
    c = resolve("127.0.0.1", headers, TRUST)
    assert c.kind == MISSING and c.problem and c.ip is not None and c.ip in TRUST.trusted


def test_single_value_header_missing_or_empty() -> None:
    cfg = ClientIPConfig(CidrSet(["127.0.0.1/32"]), "cf-connecting-ip")
    assert resolve("127.0.0.1", [], cfg).kind == MISSING
    assert resolve("127.0.0.1", [(b"cf-connecting-ip", b" ")], cfg).kind == MISSING


def test_untrusted_peer_is_never_missing() -> None:
    assert resolve("198.51.100.7", [], TRUST).kind != MISSING
    assert resolve("127.0.0.1", [], ClientIPConfig(CidrSet())).kind != MISSING


def test_missing_is_denied_by_default_and_never_judged_as_private() -> None:
    geo = Geo([CITY])
    p = parse_policy(POLICY, "p.yaml", geo.capabilities)
    assert p.spec.defaults.missing == "deny" and p.spec.defaults.private == "allow"
    client = resolve("127.0.0.1", [], TRUST)
    d = decide(p, client, NO_FACTS, "/v1/models")
    assert (d.verdict, d.rule) == ("deny", "defaults.missing")
    assert "no client address" in d.reason


def test_missing_can_be_set_and_follows_monitor_mode() -> None:
    client = resolve("127.0.0.1", [], TRUST)
    p = parse_policy(POLICY.replace("invalid: deny}", "invalid: deny, missing: allow}"), "p.yaml")
    assert decide(p, client, NO_FACTS, "/").verdict == "allow"
    p = parse_policy(POLICY + "mode: monitor\n", "p.yaml")
    d = decide(p, client, NO_FACTS, "/")
    assert (d.verdict, d.action, d.rule) == ("monitor", "deny", "defaults.missing")


def test_a_cidrs_rule_allows_a_proxys_own_health_checks_and_geo_rules_never_match() -> None:
    p = parse_policy(HEALTH_POLICY, "p.yaml")
    health = resolve("127.0.0.1", [], TRUST)
    assert decide(p, health, NO_FACTS, "/v1/models").rule == "proxy-health"
    assert decide(p, health, NO_FACTS, "/v1/chat/completions").rule == "defaults.missing"
    # From another trusted proxy (10.0.0.2 as the origin), the health rule does not apply.
    other = resolve("127.0.0.1", [(b"x-forwarded-for", b"10.0.0.2")], TRUST)
    assert decide(p, other, NO_FACTS, "/v1/models").rule == "defaults.missing"


@pytest.mark.e2e
def test_policy_tests_and_explain_can_judge_a_missing_client(tmp_path: Path) -> None:
    text = HEALTH_POLICY + textwrap.dedent("""\
        tests:
          - {ip: 127.0.0.1, missing: true, path: /v1/models, expect: allow, rule: proxy-health}
          - {ip: 127.0.0.1, missing: true, expect: deny, rule: defaults.missing}
          - {ip: 127.0.0.1, expect: allow, rule: defaults.private}
        """)
    geo = Geo([CITY])
    assert all(r.passed for r in run_tests(parse_policy(text, "p.yaml", geo.capabilities), geo))
    path = write(tmp_path, "p.yaml", HEALTH_POLICY)
    cmd = [sys.executable, "-m", "gateway", "explain", "127.0.0.1", "--missing", "--policy", path, "--geoip", CITY]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "client:    missing" in r.stdout and "rule:      defaults.missing" in r.stdout
    r = subprocess.run([*cmd, "--json", "--path", "/v1/models"], capture_output=True, text=True, timeout=60)
    report = json.loads(r.stdout)
    assert (report["kind"], report["rule"], report["decision"]) == ("missing", "proxy-health", "allow")


@pytest.mark.parametrize("name", ["openai-supported.yaml", "openai-supported-country-only.yaml"])
def test_shipped_policies_deny_a_missing_client(name: str) -> None:
    geo = Geo([CITY]) if name == "openai-supported.yaml" else Geo([COUNTRY])
    p = load_policy(str(POLICIES / name), geo.capabilities)
    _client, _facts, d = judge_ip(p, geo, "10.0.0.1", "/v1/chat/completions", missing=True)
    assert (d.verdict, d.rule) == ("deny", "defaults.missing")
    assert judge_ip(p, geo, "10.0.0.1", "/v1/chat/completions")[2].rule == "defaults.private"


# --- through a running gateway ---------------------------------------------------------------


def test_gateway_refuses_a_trusted_peer_without_a_client_and_says_why(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path
) -> None:
    policy = write(tmp_path, "p.yaml", HEALTH_POLICY)
    gw = gateway("--policy", policy, "--geoip", CITY, "--upstream", stub.url, "--trusted-proxy", "127.0.0.1/32")
    cases = [
        ({}, "/v1/chat/completions", 403, "defaults.missing"),
        ({"X-Forwarded-For": ""}, "/v1/chat/completions", 403, "defaults.missing"),
        ({"X-Forwarded-For": "127.0.0.1"}, "/v1/chat/completions", 403, "defaults.missing"),
        ({"Connection": "X-Forwarded-For"}, "/v1/chat/completions", 403, "defaults.missing"),
        ({}, "/v1/models", 200, "proxy-health"),  # the proxy's own health check
        ({"X-Forwarded-For": CN}, "/v1/models", 403, "defaults.action"),  # real callers are judged as themselves
        ({"X-Forwarded-For": GB}, "/v1/chat/completions", 200, "supported"),
    ]
    for headers, path, status, _rule in cases:
        if path == "/v1/models":
            r = httpx.get(gw.url + path, headers=headers)
        else:
            r = httpx.post(gw.url + path, json={"model": "m", "messages": []}, headers=headers)
        assert r.status_code == status, (headers, path)
    lines = gw.wait_log(len(cases))
    assert [line["rule"] for line in lines] == [c[3] for c in cases]
    missing = [line for line in lines if line["rule"] == "defaults.missing"]
    assert all(line["client_problem"] and line["country"] is None for line in missing)
    metrics = gw.metrics()
    assert (
        'regiongate_decisions_total{country="missing",decision="deny",rule="defaults.missing",'
        'upstream="",via="proxy"} 4.0'
        in metrics
    )
    assert (
        'regiongate_decisions_total{country="missing",decision="allow",rule="proxy-health",'
        'upstream="default",via="proxy"} 1.0'
        in metrics
    )


def test_gateway_with_forwarded_treats_an_absent_or_empty_field_as_missing(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path
) -> None:
    policy = write(tmp_path, "p.yaml", POLICY)
    gw = gateway(
        "--policy", policy, "--geoip", CITY, "--upstream", stub.url,
        "--trusted-proxy", "127.0.0.1/32", "--client-ip-header", "Forwarded",
    )  # fmt: skip
    for headers in ({}, {"Forwarded": ""}, {"Forwarded": ", ,"}, {"Forwarded": "for=127.0.0.1"}):
        assert httpx.get(gw.url + "/v1/models", headers=headers).status_code == 403, headers
    assert {line["rule"] for line in gw.wait_log(4)} == {"defaults.missing"}
    assert httpx.get(gw.url + "/v1/models", headers={"Forwarded": f"for={GB}"}).status_code == 200
