"""The policies the project ships, and the schema editors use."""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.geo import Geo
from gateway.policy import json_schema, judge_ip, load_policy, run_tests
from support.processes import CITY, COUNTRY, POLICIES, ROOT, UA_CITY_ADDRESSES, GatewayFactory, Stub

FULL = str(POLICIES / "openai-supported.yaml")
COUNTRY_ONLY = str(POLICIES / "openai-supported-country-only.yaml")


def reference() -> set[str]:
    text = (POLICIES / "reference" / "openai-supported-countries.txt").read_text()
    return {c for line in text.splitlines() if not line.startswith("#") for c in line.split()}


@pytest.mark.e2e
def test_generated_files_are_up_to_date() -> None:
    r = subprocess.run([sys.executable, str(POLICIES / "generate.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_reference_list_matches_the_copy_in_shared_when_present() -> None:
    shared = ROOT.parent / "shared" / "reference" / "openai-supported-countries.txt"
    if not shared.exists():
        pytest.skip("no ../shared beside this checkout")
    assert shared.read_text() == (POLICIES / "reference" / "openai-supported-countries.txt").read_text()


def test_full_policy_allows_exactly_the_reference_countries() -> None:
    p = load_policy(FULL, Geo([CITY]).capabilities)
    supported = next(r for r in p.rules if r.name == "supported")
    assert supported.countries == frozenset(reference())
    assert len(reference()) == 164
    assert p.spec.captured == datetime.date(2026, 11, 22) and p.spec.source  # dated, with its source


def test_country_only_policy_covers_the_same_countries() -> None:
    p = load_policy(COUNTRY_ONLY, Geo([]).capabilities)
    allowed = set().union(*(r.countries or set() for r in p.rules))
    assert allowed == reference()


@pytest.mark.parametrize("dbs", [[CITY], [COUNTRY], []], ids=["city", "country", "embedded"])
def test_country_only_policy_tests_pass_on_every_source(dbs: list[str]) -> None:
    geo = Geo(dbs)
    results = run_tests(load_policy(COUNTRY_ONLY, geo.capabilities), geo)
    assert results and all(r.passed for r in results), [r.problem for r in results if not r.passed]


def test_full_policy_tests_pass_on_the_city_database() -> None:
    geo = Geo([CITY])
    results = run_tests(load_policy(FULL, geo.capabilities), geo)
    assert results and all(r.passed for r in results), [r.problem for r in results if not r.passed]


def test_full_policy_needs_subdivision_data() -> None:
    from gateway.yamlfile import FileError

    with pytest.raises(FileError, match="needs a City or Enterprise database"):
        load_policy(FULL, Geo([]).capabilities)


@pytest.mark.parametrize(("code", "ip"), sorted(UA_CITY_ADDRESSES.items()))
def test_ukraine_exceptions(ua_city_db: str, code: str, ip: str) -> None:
    geo = Geo([ua_city_db])
    policy = load_policy(FULL, geo.capabilities)
    for form in (ip, f"::ffff:{ip}"):
        d = judge_ip(policy, geo, form, "/v1/chat/completions")[2]
        if code == "UA-30":
            assert (d.verdict, d.rule) == ("allow", "supported")
        else:
            assert (d.verdict, d.rule) == ("deny", "occupied-regions")


def test_schema_file_is_up_to_date() -> None:
    assert json.loads((POLICIES / "policy.schema.json").read_text()) == json_schema()


def test_schema_accepts_the_shipped_policies_and_rejects_typos() -> None:
    import jsonschema

    from gateway.yamlfile import load

    schema = json_schema()
    for path in (FULL, COUNTRY_ONLY):
        with open(path) as f:
            jsonschema.validate(load(f.read(), path).data, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"version": 1, "rules": [{"countries": ["US"], "action": "allow", "colour": 1}]}, schema)


SHIPPED = sorted(POLICIES.glob("*.yaml"))


def test_the_monitor_only_starter_is_shipped() -> None:
    assert POLICIES / "monitor-only-starter.yaml" in SHIPPED


@pytest.mark.e2e
def test_every_shipped_policy_passes_regiongate_check() -> None:
    # One process for every file (each start costs about a second): check reports each file apart.
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check", *map(str, SHIPPED), "--geoip", CITY],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(SHIPPED) >= 6 and "FAILED" not in r.stdout
    for path in SHIPPED:
        assert f"\n{path}: ok: " in "\n" + r.stdout, path


def test_monitor_only_starter_refuses_nothing_and_records_what_it_would_refuse() -> None:
    geo = Geo([CITY])
    starter = load_policy(str(POLICIES / "monitor-only-starter.yaml"), geo.capabilities)
    enforcing = load_policy(COUNTRY_ONLY, geo.capabilities)
    assert starter.spec.mode == "monitor" and starter.spec.tests
    from gateway.diff import diff

    d = diff(starter, enforcing)
    # the only difference from the enforcing policy: what it refuses is "monitor" in the starter
    assert d.changes and all((c.old_verdict, c.new_verdict) == ("monitor", "deny") for c in d.changes)
    assert all(c.old_rule == c.new_rule for c in d.changes) and not d.settings
    for ip in ("175.16.199.1", "2a02:d0c0::1", "81.2.69.142", "2a02:d300::1", "10.0.0.1"):
        decision = judge_ip(starter, geo, ip, "/v1/chat/completions")[2]
        assert decision.allowed


def test_monitor_only_starter_forwards_a_refused_country_through_a_real_gateway(
    gateway: GatewayFactory, stub: Stub
) -> None:
    import httpx

    gw = gateway(
        "--upstream",
        stub.url,
        "--trusted-proxy",
        "127.0.0.1/32",
        "--policy",
        str(POLICIES / "monitor-only-starter.yaml"),
    )
    r = httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": "175.16.199.1"})
    assert r.status_code == 200
    (record,) = gw.wait_log(1)
    assert (record["decision"], record["action"], record["rule"]) == ("monitor", "deny", "defaults.action")


# A policy test's comment that starts with a country code ("# NO: EEA, not EU", "# CN over IPv6").
_COMMENTED = re.compile(r'^\s*- \{ip: "?([^",}]+)"?,.*\}\s+# ([A-Z]{2})\b')
SHIPPED_AND_EXAMPLES = sorted(POLICIES.glob("*.yaml")) + sorted((POLICIES / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_AND_EXAMPLES, ids=lambda p: p.name)
def test_each_test_address_is_where_its_comment_says_in_every_data_source(path: Path) -> None:
    """eu-residency's "CH" and "NO" addresses were GB and DK in the embedded data: the tests
    passed for the wrong country. Each commented address must be in that country everywhere."""
    rows = [m.groups() for line in path.read_text().splitlines() if (m := _COMMENTED.match(line))]
    assert rows, "no commented test addresses found: has the file's test format changed?"
    policy = load_policy(str(path), None)
    for dbs in ([CITY], [COUNTRY], []):
        geo = Geo(dbs)
        if not geo.capabilities >= {"country"}:
            continue
        placed = {ip: judge_ip(policy, geo, ip, "/v1/models")[1].country for ip, _ in rows}
        assert placed == {ip: code for ip, code in rows}, dbs
