"""``explain --trace``: the walk agrees with ``decide()`` and says which key failed."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.clientip import INVALID, ClientAddress, classify, normalize
from gateway.geo import ANONYMIZER_FLAGS, Geo, GeoFacts
from gateway.policy import NEEDS_MODEL, decide, decide_model, parse_policy
from gateway.trace import trace
from support.processes import ANON, ASN, CITY, POLICIES, write

EVERY_KIND = """version: 1
mode: enforce
defaults: {action: deny, unknown: monitor, private: allow, invalid: deny}
rules:
  - {name: office, cidrs: [203.0.113.0/24, "2001:db8::/32"], action: allow}
  - {name: watch-hosting, anonymizer: [hosting_provider], action: deny, mode: monitor}
  - {name: anonymizers, anonymizer: [tor_exit_node, public_proxy, anonymous_vpn], action: deny}
  - {name: occupied, subdivisions: [UA-43, UA-40, GB-ENG], action: deny}
  - {name: embeddings-only, countries: [DE, CN], paths: ["/v1/embeddings"], action: allow}
  - {name: v1-us, countries: [US], paths: ["/v1/*"], action: allow}
  - {name: supported, countries: [GB, SE, UA], action: allow}
  - {name: bad-asn, asns: [4837, 15169], action: deny}
  - {name: cn-watch, countries: [CN], asns: [7018], action: monitor}
  - {name: everyone-models, paths: ["/v1/models"], action: allow}
"""

MODELS = """version: 1
defaults: {action: deny, unknown: deny}
upstreams:
  default: {url: "http://127.0.0.1:9"}
  eu: {url: "http://127.0.0.1:10"}
rules:
  - {name: no-reasoning, countries: [SE], models: ["o1*", "o3*"], action: deny}
  - {name: watch-gpt4, models: [gpt-4o], action: deny, mode: monitor}
  - {name: eu, countries: [DE], action: route, upstream: eu, allow_models: [gpt-4o, "gpt-4o-*"]}
  - {name: cheap-everywhere, countries: [CN, RU], models: [gpt-4o-mini], action: allow}
  - {name: supported, countries: [GB, SE, US], action: allow}
"""
MODELS_PERMISSIVE = MODELS.replace("defaults:", "body: {unknown_model: allow}\ndefaults:")

SHIPPED = sorted(POLICIES.glob("*.yaml"))
POLICY_TEXTS = {p.name: p.read_text() for p in SHIPPED} | {
    "every-kind.yaml": EVERY_KIND,
    "every-kind-any-case.yaml": EVERY_KIND.replace("mode: enforce\n", "mode: enforce\npaths_case: insensitive\n"),
    "models.yaml": MODELS,
    "models-permissive.yaml": MODELS_PERMISSIVE,
}
POLICIES_COMPILED = {name: parse_policy(text, name) for name, text in POLICY_TEXTS.items()}
PATHS = ["/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/", "/other", "/v1/embeddings/x"]
PATHS += ["/V1/Embeddings", "/v1/models/", "/V1/MODELS/", "/V1/"]  # case and a trailing slash
model_names = st.one_of(st.none(), st.sampled_from(["gpt-4o", "gpt-4o-mini", "o1-preview", "o3", "o", "qwen-plus"]))

addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
    st.sampled_from(["203.0.113.7", "2001:db8::1", "10.1.2.3", "::ffff:203.0.113.9", "fe80::1"]).map(
        ipaddress.ip_address
    ),
)
facts_strategy = st.builds(
    GeoFacts,
    country=st.sampled_from([None, "GB", "US", "CN", "DE", "UA", "SE", "RU"]),
    registered_country=st.sampled_from([None, "GB", "US", "CN"]),
    subdivisions=st.lists(st.sampled_from(["UA-43", "UA-40", "GB-ENG", "CN-22", "UA-30"]), max_size=2).map(tuple),
    asn=st.sampled_from([None, 4837, 15169, 7018, 1221]),
    anonymizer=st.frozensets(st.sampled_from(sorted(ANONYMIZER_FLAGS)), max_size=3),
)


# One request to judge: a policy, an address (or none: unreadable), its facts, a path and a model (or unknown).
REQUESTS = {
    "name": st.sampled_from(sorted(POLICIES_COMPILED)),
    "ip": st.one_of(st.none(), addresses),
    "facts": facts_strategy,
    "path": st.sampled_from(PATHS),
    "model": model_names,
}


def client_for(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> ClientAddress:
    if ip is None:
        return ClientAddress(None, INVALID, "argument", "x", "not an address")
    n = normalize(ip)
    return ClientAddress(n, classify(n), "argument", str(ip))


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(**REQUESTS)
def test_trace_decides_as_decide_does(
    name: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, facts: GeoFacts, path: str, model: str | None
) -> None:
    policy = POLICIES_COMPILED[name]
    client = client_for(ip)
    walk = trace(policy, client, facts, path, model)
    assert walk.decision == decide_model(policy, client, facts, path, model)
    if client.kind == INVALID:
        assert not walk.consulted and walk.steps == ()
        return
    assert [s.name for s in walk.steps] == [r.name for r in policy.rules]  # every rule, in order
    for step, rule in zip(walk.steps, policy.rules, strict=True):
        country = facts.country if policy.field == "country" else facts.registered_country
        assert step.matched == (rule.matches(client.ip, country, facts, path) and rule.model_matches(model))
        assert step.matched == all(c.matched for c in step.checks)  # a rule matches iff each of its keys does
    if walk.default is None:
        assert walk.decision.rule == next(s.name for s in walk.steps if s.matched and not s.shadow)
    else:
        assert walk.decision.rule == walk.default
        assert not any(s.matched and not s.shadow for s in walk.steps)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(**REQUESTS)
def test_a_decision_made_before_the_body_is_read_is_the_one_the_model_would_give(
    name: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, facts: GeoFacts, path: str, model: str | None
) -> None:
    """The proxy reads a body only when decide() asks for the model: so deciding without it must never
    give an answer that knowing the model would change (apart from allow_models, checked afterwards)."""
    policy = POLICIES_COMPILED[name]
    client = client_for(ip)
    early = decide(policy, client, facts, path)
    late = decide(policy, client, facts, path, model)
    if early is NEEDS_MODEL:
        assert any(r.models is not None for r in policy.rules)
    else:
        assert early == late


_GEO = Geo([CITY, ASN, ANON])


@settings(max_examples=300, deadline=None)
@given(ip=addresses, path=st.sampled_from(PATHS))
def test_trace_agrees_with_decide_on_real_geo_data(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, path: str
) -> None:
    client = client_for(ip)
    facts = _GEO.lookup(client.ip) if client.kind == "public" and client.ip is not None else GeoFacts()
    for policy in POLICIES_COMPILED.values():
        assert trace(policy, client, facts, path).decision == decide_model(policy, client, facts, path, None)


def test_failed_keys_are_named() -> None:
    policy = POLICIES_COMPILED["every-kind.yaml"]
    facts = GeoFacts(country="CN", subdivisions=("CN-22",), asn=7018)
    walk = trace(policy, client_for(ipaddress.ip_address("175.16.199.1")), facts, "/v1/chat/completions")
    by_name = {s.name: s for s in walk.steps}
    assert [c.detail for c in by_name["office"].failed] == [
        "cidrs: 175.16.199.1 not in [203.0.113.0/24, 2001:db8::/32]"
    ]
    assert [c.detail for c in by_name["supported"].failed] == ["countries: CN not in [GB, SE, UA]"]
    assert [c.detail for c in by_name["embeddings-only"].failed] == [
        "paths: /v1/chat/completions not in [/v1/embeddings]"
    ]
    emb = by_name["embeddings-only"].checks
    assert (emb[0].key, emb[0].matched) == ("countries", True)
    assert [c.detail for c in by_name["bad-asn"].failed] == ["asns: AS7018 not in [AS4837, AS15169]"]
    assert [c.detail for c in by_name["anonymizers"].failed] == [
        "anonymizer: not flagged not in [anonymous_vpn, public_proxy, tor_exit_node]"
    ]
    assert [c.detail for c in by_name["occupied"].failed] == ["subdivisions: CN-22 not in [GB-ENG, UA-40, UA-43]"]
    assert by_name["cn-watch"].matched and walk.decision.rule == "cn-watch"
    assert walk.decision.verdict == "monitor" and walk.default is None
    assert not by_name["everyone-models"].reached


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.e2e
def test_explain_trace_text_on_the_full_shipped_policy() -> None:
    r = run("explain", "175.16.199.1", "--trace", "--policy", str(POLICIES / "openai-supported.yaml"), "--geoip", CITY)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    lines = (POLICIES / "openai-supported.yaml").read_text().splitlines()
    occupied, supported = (lines.index(f"  - name: {name}") + 1 for name in ("occupied-regions", "supported"))
    assert f"1. occupied-regions (line {occupied}) [deny]: no match" in out
    assert "FAIL subdivisions: CN-22 not in [UA-09, UA-14, UA-40, UA-43]" in out
    assert f"2. supported (line {supported}) [allow]: no match" in out
    assert "FAIL countries: CN not in [AD, AE, AG, AL, AM, AO, AR, AT, … (164 in all)]" in out
    assert "default: defaults.action -> deny (no rule matched)" in out
    # what MaxMind says, in words, through geoip2's models
    assert "country: China (CN)" in out and "subdivisions: Jilin Sheng (CN-22)" in out and "city: Changchun" in out


@pytest.mark.e2e
def test_explain_trace_json_on_the_country_only_policy() -> None:
    r = run("explain", "2a02:d300::1", "--trace", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    t = out["trace"]
    assert [(s["name"], s["matched"], s["reached"]) for s in t["rules"]] == [
        ("ukraine-unverified", True, True),
        ("supported", False, False),
    ]
    assert t["rules"][1]["checks"][0]["detail"].startswith("countries: UA not in [")
    assert t["default"] is None
    assert t["decision"]["verdict"] == out["decision"] == "monitor"
    assert out["records"] == []  # embedded data: no MaxMind record to show


@pytest.mark.e2e
def test_explain_trace_of_an_invalid_address_consults_no_rule() -> None:
    out = json.loads(run("explain", "999.1.1.1", "--trace", "--json").stdout)
    assert out["trace"]["rules_consulted"] is False and out["trace"]["rules"] == []
    assert out["trace"]["default"] == "defaults.invalid" and out["decision"] == "deny"


@pytest.mark.e2e
def test_explain_shows_every_database_record(tmp_path: Path) -> None:
    p = write(tmp_path, "p.yaml", "version: 1\nrules:\n  - {name: gb, countries: [GB], action: allow}\n")
    r = run("explain", "202.196.224.1", "--json", "--policy", p, "--geoip", CITY, "--geoip", ANON)
    out = json.loads(r.stdout)
    city, anon = out["records"]
    assert city["database_type"] == "GeoIP2-City" and city["network"] == "202.196.224.0/20"
    assert city["fields"]["represented_country"] == "United States (US), military"
    assert city["fields"]["registered_country"] == "Philippines (PH)"
    assert city["fields"]["accuracy_radius_km"] == 121
    assert anon["database_type"] == "GeoIP2-Anonymous-IP" and anon["network"] == "202.0.0.0/8"
    assert anon["fields"] == {"anonymizer": []}  # a record with no flag set
    r = run("explain", "1.0.0.1", "--json", "--policy", p, "--geoip", CITY, "--geoip", ASN)
    asn = json.loads(r.stdout)["records"][1]
    assert asn["fields"] == {"autonomous_system_number": 15169, "autonomous_system_organization": "Google Inc."}


@pytest.mark.parametrize("ip", ["81.2.69.1", "1.124.213.1"])
@pytest.mark.e2e
def test_explain_shows_anonymizer_flags_in_words(ip: str, tmp_path: Path) -> None:
    p = write(tmp_path, "p.yaml", "version: 1\nrules:\n  - {name: gb, countries: [GB], action: allow}\n")
    out = json.loads(run("explain", ip, "--json", "--policy", p, "--geoip", CITY, "--geoip", ANON).stdout)
    flags = out["records"][1]["fields"]["anonymizer"]
    assert "anonymous_vpn" in flags and flags == out["facts"]["anonymizer"]
