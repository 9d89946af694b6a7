"""``regiongate diff``: decision changes between two policies, judged by ``decide()``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.diff import diff, read_line, replay
from gateway.geo import Geo
from gateway.policy import load_policy, parse_policy
from support.processes import CITY, POLICIES, GatewayFactory, Stub, write

FULL = str(POLICIES / "openai-supported.yaml")
COUNTRY_ONLY = str(POLICIES / "openai-supported-country-only.yaml")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120)


def rows(d: dict[str, Any], key: str = "changes") -> list[tuple[str, ...]]:
    return [
        (c["kind"], c["subject"], c["from"]["decision"], c["from"]["rule"], c["to"]["decision"], c["to"]["rule"])
        for c in d[key]
    ]


def test_the_two_shipped_openai_policies_differ_exactly_on_ukraine() -> None:
    d = diff(load_policy(FULL), load_policy(COUNTRY_ONLY)).as_dict()
    assert d["changed"] is True
    assert rows(d) == [
        ("country", "UA", "allow", "supported", "monitor", "ukraine-unverified"),
        ("subdivision", "UA-09", "deny", "occupied-regions", "monitor", "ukraine-unverified"),
        ("subdivision", "UA-14", "deny", "occupied-regions", "monitor", "ukraine-unverified"),
        ("subdivision", "UA-40", "deny", "occupied-regions", "monitor", "ukraine-unverified"),
        ("subdivision", "UA-43", "deny", "occupied-regions", "monitor", "ukraine-unverified"),
    ]
    assert d["summary"] == {"changes": 5, "transitions": {"allow -> monitor": 1, "deny -> monitor": 4}}


@pytest.mark.e2e
def test_cli_exit_codes_and_json_shape(tmp_path: Path) -> None:
    same = run("diff", COUNTRY_ONLY, COUNTRY_ONLY)
    assert same.returncode == 0, same.stderr
    assert "no caller is treated differently" in same.stdout

    r = run("diff", FULL, COUNTRY_ONLY, "--json")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"old", "new", "changed", "probes", "changes", "rule_changes", "settings", "summary"}
    assert out["old"]["path"] == FULL and len(out["new"]["sha256"]) == 64
    assert out["probes"] > 250  # every ISO 3166-1 country at least
    assert set(out["changes"][0]) == {"kind", "subject", "from", "to", "countries", "addresses", "paths"}

    text = run("diff", FULL, COUNTRY_ONLY)
    assert text.returncode == 1
    assert "country      UA Ukraine  allow (supported)        monitor (ukraine-unverified)" in text.stdout

    bad = write(tmp_path, "bad.yaml", "version: 1\nrules:\n  - {countries: [UK], action: allow}\n")
    r = run("diff", COUNTRY_ONLY, bad)
    assert r.returncode == 2 and f"{bad}:3: rules[0].countries: 'UK' is not an ISO 3166-1 alpha-2 code" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("diff", str(tmp_path / "missing.yaml"), COUNTRY_ONLY)
    assert r.returncode == 2 and "missing.yaml" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.e2e
def test_an_edited_copy_shows_exactly_the_edit(tmp_path: Path) -> None:
    text = Path(COUNTRY_ONLY).read_text()
    assert ", SE, " in text
    edited = write(tmp_path, "edited.yaml", text.replace(", SE, ", ", "))
    r = run("diff", COUNTRY_ONLY, edited, "--json")
    assert r.returncode == 1
    assert rows(json.loads(r.stdout)) == [("country", "SE", "allow", "supported", "deny", "defaults.action")]


def test_rule_order_matters_even_with_the_same_lines() -> None:
    gb = "  - {name: gb, countries: [GB], action: allow}\n"
    tor = "  - {name: tor, anonymizer: [tor_exit_node], action: deny}\n"
    a = parse_policy("version: 1\nrules:\n" + gb + tor, "a.yaml")
    b = parse_policy("version: 1\nrules:\n" + tor + gb, "b.yaml")
    d = diff(a, b).as_dict()
    assert rows(d) == [("anonymizer", "tor_exit_node", "allow", "gb", "deny", "tor")]
    assert d["changes"][0]["countries"] == ["GB"]  # only where the two rules overlap


def test_cidrs_asns_paths_and_client_kinds() -> None:
    base = "version: 1\ndefaults: {action: deny, unknown: deny, private: allow, invalid: deny}\nrules:\n"
    a = parse_policy(base + "  - {name: gb, countries: [GB], action: allow}\n", "a.yaml")
    b = parse_policy(
        "version: 1\ndefaults: {action: deny, unknown: deny, private: deny, invalid: monitor}\nrules:\n"
        "  - {name: office, cidrs: [203.0.113.0/24], action: allow}\n"
        "  - {name: bad-asn, asns: [4837], action: deny}\n"
        "  - {name: gb, countries: [GB], action: allow}\n"
        "  - {name: emb, countries: [DE], paths: ['/v1/embeddings'], action: allow}\n",
        "b.yaml",
    )
    d = diff(a, b).as_dict()
    got = {(c["kind"], c["subject"], c["to"]["rule"]): c for c in d["changes"]}
    office = got[("cidr", "203.0.113.0/24", "office")]
    assert office["addresses"] is None  # first, inside and last address alike
    assert office["from"]["decision"] == "deny" and office["to"]["decision"] == "allow"
    assert got[("asn", "AS4837", "bad-asn")]["countries"] == ["GB"]  # it only matters where GB was allowed
    assert got[("country", "DE", "emb")]["paths"] == ["/v1/embeddings"]
    assert got[("client", "private", "defaults.private")]["to"]["decision"] == "deny"
    assert got[("client", "invalid", "defaults.invalid")]["to"]["decision"] == "monitor"
    # a CIDR change shown once for the CIDR, not again for every country combined with it
    assert not any(c["kind"] == "country" and c["subject"] == "GB" for c in d["changes"])


def test_monitor_mode_and_block_settings_are_changes(tmp_path: Path) -> None:
    a = parse_policy("version: 1\nrules:\n  - {name: gb, countries: [GB], action: allow}\n", "a.yaml")
    b = parse_policy("version: 1\nmode: monitor\nrules:\n  - {name: gb, countries: [GB], action: allow}\n", "b.yaml")
    d = diff(a, b).as_dict()
    assert d["summary"]["transitions"] == {"deny -> monitor": d["summary"]["changes"]}
    c = parse_policy("version: 1\nblock: {status: 451}\nrules:\n  - {name: gb, countries: [GB], action: allow}\n", "c")
    d = diff(a, c).as_dict()
    assert d["changes"] == [] and d["settings"] == [{"key": "block.status", "from": 403, "to": 451}]
    assert d["changed"] is True


def test_paths_case_is_a_setting_change() -> None:
    """Its effect is on spellings no probe tries, so the diff names the setting itself."""
    rules = "rules:\n  - {name: no-files, paths: [/v1/files], action: deny}\n"
    a = parse_policy("version: 1\n" + rules, "a.yaml")
    b = parse_policy("version: 1\npaths_case: insensitive\n" + rules, "b.yaml")
    d = diff(a, b).as_dict()
    assert d["settings"] == [{"key": "paths_case", "from": "sensitive", "to": "insensitive"}]
    assert d["changed"] is True


@pytest.mark.e2e
def test_renaming_a_rule_changes_no_decision(tmp_path: Path) -> None:
    old = write(tmp_path, "a.yaml", "version: 1\nrules:\n  - {name: gb, countries: [GB], action: allow}\n")
    new = write(tmp_path, "b.yaml", "version: 1\nrules:\n  - {name: uk, countries: [GB], action: allow}\n")
    r = run("diff", old, new, "--json")
    assert r.returncode == 0
    out = json.loads(r.stdout)
    assert out["changes"] == [] and rows(out, "rule_changes") == [("country", "GB", "allow", "gb", "allow", "uk")]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("81.2.69.142", ("81.2.69.142", "/v1/chat/completions")),
        ("::ffff:175.16.199.1 /v1/embeddings", ("175.16.199.1", "/v1/embeddings")),
        ('{"client": "81.2.69.142", "path": "/v1/models"}', ("81.2.69.142", "/v1/models")),
        ('{"client": "h:0123456789abcdef", "path": "/v1/models"}', "redacted"),
        ('{"client": "81.2.69.0/24", "path": "/v1/models"}', "redacted"),
        ('{"client": null, "client_problem": "bad header"}', ("invalid", "/v1/chat/completions")),
        ("not an address", "unreadable"),
        ("{broken json", "unreadable"),
        ("# a comment", None),
        ("", None),
    ],
)
def test_replay_input_lines(line: str, expected: object) -> None:
    got = read_line(line)
    if isinstance(got, tuple):
        client, path = got
        assert (str(client.ip) if client.ip is not None else client.kind, path) == expected
    else:
        assert got == expected


def test_replay_of_a_real_gateways_access_log(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    """A gateway serves real requests; its access log is replayed through the running
    policy and an edited one, with the same geo data the gateway used."""
    callers = {
        "81.2.69.142": 3,  # GB: allowed by both
        "89.160.20.112": 2,  # SE: the edit refuses it
        "175.16.199.1": 4,  # CN: refused by both
        "2a02:d300::1": 1,  # UA: monitor in both
        "10.0.0.7": 1,  # private
    }
    gw = gateway("--upstream", stub.url, "--trusted-proxy", "127.0.0.1/32", "--policy", COUNTRY_ONLY, "--geoip", CITY)
    with httpx.Client() as client:
        for ip, n in callers.items():
            for _ in range(n):
                client.get(gw.url + "/v1/models", headers={"X-Forwarded-For": ip})
    records = gw.wait_log(sum(callers.values()))
    assert len(records) == sum(callers.values())
    log = gw.access_log
    edited = write(tmp_path, "edited.yaml", Path(COUNTRY_ONLY).read_text().replace(", SE, ", ", "))

    same = run("diff", COUNTRY_ONLY, COUNTRY_ONLY, "--replay", str(log), "--geoip", CITY, "--json")
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout)["replay"]["flipped"] == 0

    r = run("diff", COUNTRY_ONLY, edited, "--replay", str(log), "--geoip", CITY, "--json")
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)["replay"]
    assert rep["replayed"] == 11 and rep["skipped"] == {"redacted": 0, "unreadable": 0}
    assert rep["flipped"] == 2 and rep["transitions"] == {"allow -> deny": 2}
    assert rep["top_countries"] == [{"country": "SE", "flips": 2}]
    assert rep["top_rules"] == [{"rules": "supported -> defaults.action", "flips": 2}]
    assert {e["path"] for e in rep["examples"]} == {"/v1/models"}

    text = run("diff", COUNTRY_ONLY, edited, "--replay", str(log), "--geoip", CITY)
    assert "11 requests replayed, 0 skipped" in text.stdout and "2 decisions flip" in text.stdout
    assert "top countries: SE 2" in text.stdout


def test_replay_skips_and_counts_redacted_clients(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = gateway("--upstream", stub.url, "--trusted-proxy", "127.0.0.1/32", "--geoip", CITY, "--log-address", "hashed")
    for ip in ("81.2.69.142", "175.16.199.1"):
        httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": ip})
    assert len(gw.wait_log(2)) == 2
    mixed = tmp_path / "mixed.log"
    mixed.write_text(gw.access_log.read_text() + "89.160.20.112\nnonsense\n")
    edited = write(tmp_path, "edited.yaml", Path(COUNTRY_ONLY).read_text().replace(", SE, ", ", "))
    r = run("diff", COUNTRY_ONLY, edited, "--replay", str(mixed), "--geoip", CITY, "--json")
    rep = json.loads(r.stdout)["replay"]
    assert rep["skipped"] == {"redacted": 2, "unreadable": 1}
    assert (rep["replayed"], rep["flipped"]) == (1, 1)


@pytest.mark.e2e
def test_replay_with_unreadable_file_is_a_usage_error() -> None:
    r = run("diff", COUNTRY_ONLY, COUNTRY_ONLY, "--replay", "/nonexistent/access.log")
    assert r.returncode == 2 and "/nonexistent/access.log" in r.stderr and "Traceback" not in r.stderr


def test_replay_uses_real_geo_data_in_process() -> None:
    old, new = load_policy(FULL), load_policy(COUNTRY_ONLY)
    rep = replay(old, new, Geo([CITY]), ["2a02:d300::1", "81.2.69.142", "175.16.199.1"])
    assert (rep.replayed, rep.flipped, rep.top_countries) == (3, 1, (("UA", 1),))
