"""``regiongate check`` and ``explain``, as a compliance owner runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.processes import ANON, ASN, CITY, POLICIES, write


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.e2e
def test_check_passes_shipped_policies() -> None:
    r = run(
        "check",
        str(POLICIES / "openai-supported.yaml"),
        str(POLICIES / "openai-supported-country-only.yaml"),
        "--geoip",
        CITY,
    )
    assert r.returncode == 0, r.stderr
    assert "openai-supported.yaml: ok: 2 rules, 13/13 tests passed" in r.stdout


@pytest.mark.e2e
def test_check_fails_on_a_failing_test_with_its_line(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "p.yaml",
        "version: 1\nrules:\n  - {name: gb, countries: [GB], action: allow}\n"
        "tests:\n  - {ip: 81.2.69.142, expect: allow}\n  - {ip: 175.16.199.1, expect: allow}\n",
    )
    r = run("check", p)
    assert r.returncode == 1
    assert f"{p}:6: test 175.16.199.1 /v1/chat/completions: expected allow, got deny" in r.stderr


@pytest.mark.e2e
def test_check_fails_on_an_invalid_policy(tmp_path: Path) -> None:
    p = write(tmp_path, "p.yaml", "version: 1\nrules:\n  - {asns: [4837], action: deny}\n")
    r = run("check", p)  # no ASN database given
    assert r.returncode == 1 and f"{p}:3:" in r.stderr and "ASN" in r.stderr
    assert run("check", p, "--geoip", ASN).returncode == 0


@pytest.mark.e2e
def test_check_bad_database_is_a_usage_error() -> None:
    r = run("check", str(POLICIES / "openai-supported.yaml"), "--geoip", "/nonexistent.mmdb")
    assert r.returncode == 2 and "/nonexistent.mmdb" in r.stderr


@pytest.mark.e2e
def test_explain_text() -> None:
    r = run("explain", "2002:af10:c701::1")
    assert r.returncode == 0
    assert "DENY" in r.stdout and "is 175.16.199.1" in r.stdout and "country:   CN" in r.stdout


@pytest.mark.e2e
def test_explain_json_names_rule_line_and_facts(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "p.yaml",
        "version: 1\nrules:\n  - {name: vpn, anonymizer: [anonymous_vpn], action: deny}\n"
        "  - {name: gb, countries: [GB], action: allow}\n",
    )
    r = run("explain", "1.124.213.1", "--json", "--policy", p, "--geoip", CITY, "--geoip", ANON)
    out = json.loads(r.stdout)
    assert (out["decision"], out["rule"], out["rule_line"], out["status"]) == ("deny", "vpn", 3, 403)
    assert "anonymous_vpn" in out["facts"]["anonymizer"]
    assert out["why"] == ["anonymizer anonymous_vpn is in anonymizer"]
    assert [g["type"] for g in out["geo"]] == ["GeoIP2-City", "GeoIP2-Anonymous-IP"]


@pytest.mark.e2e
def test_explain_invalid_address() -> None:
    r = run("explain", "not-an-ip", "--json")
    out = json.loads(r.stdout)
    assert (out["kind"], out["decision"], out["rule"]) == ("invalid", "deny", "defaults.invalid")


@pytest.mark.e2e
def test_environment_variables_configure_serve_flags(tmp_path: Path) -> None:
    env = {"REGIONGATE_POLICY": str(tmp_path / "missing.yaml"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "gateway", "serve"], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 2 and "missing.yaml" in r.stderr


@pytest.mark.e2e
def test_check_refuses_a_per_key_limit_behind_an_injected_key(tmp_path: Path) -> None:
    """The report's policy: with the upstream's own key injected, 12 made-up keys passed a 3/min limit."""
    p = write(
        tmp_path,
        "p.yaml",
        "version: 1\nupstreams:\n  default: {url: 'http://127.0.0.1:1', api_key_env: UPSTREAM_KEY}\n"
        "rules:\n  - {name: eu, countries: [GB], action: allow,\n"
        "     rate_limit: {requests: 3, per: 1m, by: api_key}}\n",
    )
    r = run("check", p, "--geoip", CITY)
    assert r.returncode == 1
    assert f"{p}:6: rules[0] (eu): rate_limit by: api_key cannot limit these callers" in r.stderr, r.stderr
