"""The evidence report's data (report.json): figures from a sealed month of entries, the chain check, bad input."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.cli import main
from gateway.evidence.chain import verify
from gateway.evidence.exportfile import Export, load_export
from gateway.evidence.report import build
from gateway.evidence.report_html import render_html
from gateway.reports import dump

from .evidence_run import KEY, SHA1, SHA2, V1, V2, _envelope, entries, export_lines, sealed

SINCE, UNTIL = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
NOW = datetime(2026, 12, 2, tzinfo=UTC)
KEYS = {KEY.kid: KEY.secret}


def report_of(items: list[tuple[str, dict[str, Any]]], keys: dict[str, bytes] | None = KEYS) -> dict[str, Any]:
    evidence = load_export(export_lines(items), "export.jsonl")
    checked = verify(evidence.items, keys) if keys is not None else None
    return dump(build(evidence, SINCE, UNTIL, checked, now=NOW, source="export.jsonl"))


def test_figures_versions_gap_and_countries() -> None:
    r = report_of(sealed())
    s = r["summary"]
    assert s == {
        "gateways": 1,
        "judged": 2120,
        "allowed": 2055,
        "refused": 56,
        "monitored": 9,
        "refused_by_rule": [{"key": "defaults.action", "n": 53}, {"key": "defaults.unknown", "n": 3}],
        "counts_from": "chain",
        "sampled": 2,
    }
    countries = {c["country"]: (c["allowed"], c["refused"], c["monitored"]) for c in r["countries"]}
    assert countries == {"US": (2000, 0, 0), "FR": (55, 0, 0), "CN": (0, 42, 0), "RU": (0, 11, 0),
                         "unknown": (0, 3, 0), "BR": (0, 0, 9)}  # fmt: skip
    v1, v2 = r["policies"]
    assert (v1["sha256"], v1["version"], v1["text"], v1["on_error"]) == (SHA1, "1", V1, "open")
    assert (v2["sha256"], v2["version"], v2["text"], v2["on_error"]) == (SHA2, "2", V2, "closed")
    assert v1["replaced_at"] == v2["first_loaded"] == "2026-11-15T10:00:00.000+00:00" and v2["replaced_at"] is None
    assert v1["refused_by"] == v2["refused_by"] == [{"key": "defaults.action", "n": 1}]
    assert v1["sources"] == [] and v2["sources"] == [
        {"rule": "supported", "provider": "Example AI", "urls": ["https://example.com/supported-countries"],
         "captured": "2026-11-14"}
    ]  # fmt: skip
    gap = {"from": "2026-11-20T14:02:00.000+00:00", "to": "2026-11-20T14:07:00.000+00:00", "lost": 42}
    assert r["gaps"] == [{"chain": sealed()[0][1]["chain"], **gap, "reasons": {"redis": 42}}]
    (fail,) = r["fail_modes"]
    assert fail["from"] == "2026-11-20T14:02:00.000+00:00" and "42 audit entries" in fail["what"]
    assert r["clients"] == {"unknown": 3, "invalid": 0, "missing": 0}
    assert r["refusals_by_asn"] == [{"key": "AS4134", "n": 1}, {"key": "AS4837", "n": 1}]
    assert r["refusals_by_subdivision"] == [{"key": "CN-BJ", "n": 1}]
    (geo,) = r["geoip"]
    assert geo["type"] == "GeoLite2-City" and geo["age_days"] == 34.0
    (ov,) = r["overrides"]
    assert (ov["id"], ov["by"], ov["value"], ov["ttl"]) == ("ov1", "alice", "198.51.100.0/24", 3600)
    assert r["verification"]["checked"] and r["verification"]["ok"]
    assert any("No anonymizer database" in x for x in r["limitations"])
    assert any("Anthropic" in x for x in r["limitations"])
    assert r["statement"].startswith("Supporting evidence, not a certification")


def test_a_shorter_period_counts_only_its_hours() -> None:
    evidence = load_export(export_lines(sealed()), "e")
    r = dump(build(evidence, SINCE, datetime(2026, 11, 10, tzinfo=UTC), None, now=NOW, source="e"))
    assert r["summary"]["judged"] == 1248 and [p["version"] for p in r["policies"]] == ["1"]
    assert r["gaps"] == [] and r["verification"] == {
        "checked": False, "ok": False, "chains": [], "unchained": 0, "malformed": 0
    }  # fmt: skip


def test_an_altered_entry_fails_the_chain_check_and_says_which() -> None:
    items = sealed()
    sid, altered = items[5]
    items[5] = (sid, {**altered, "by": "mallory"})
    v = report_of(items)["verification"]
    assert not v["ok"]
    (chain,) = v["chains"]
    assert chain["problems"] and chain["problems"][0].startswith("altered at seq 6")
    evidence = load_export(export_lines(items), "e")
    html = render_html(build(evidence, SINCE, UNTIL, verify(evidence.items, KEYS), now=NOW, source="e"))
    assert "FAILED" in html


def test_hourly_hashes_when_the_chain_has_no_counts() -> None:
    items = [(sid, e) for sid, e in sealed() if e["kind"] != "counts"]
    row = {
        "hour": "2026-11-03T01",
        "country": "DE",
        "subdivision": "",
        "decision": "allow",
        "rule": "supported",
        "n": 7,
    }
    r = dump(build(Export({}, items, {}, [row]), SINCE, UNTIL, None, now=NOW, source="x"))
    assert r["summary"]["counts_from"] == "hashes" and r["summary"]["judged"] == 7
    assert r["policies"][0]["text"] is None


def test_html_is_escaped_and_self_contained() -> None:
    items = sealed()
    sid, e = items[5]
    items[5] = (sid, {**e, "reason": "<script>alert(1)</script>"})
    html = render_html(build(load_export(export_lines(items), "e"), SINCE, UNTIL, None, now=NOW, source="e"))
    assert "<script" not in html and "&lt;script&gt;" in html
    assert "src=" not in html and "href=" not in html and "url(" not in html
    assert "not checked: no key was given" in html


def test_cli_json_pack_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    export = tmp_path / "export.jsonl"
    export.write_bytes(b"\n".join(export_lines(sealed())) + b"\n")
    monkeypatch.setenv("REGIONGATE_AUDIT_KEY", "0123456789abcdef0123456789abcdef")
    monkeypatch.setenv("REGIONGATE_AUDIT_KEY_ID", "k1")
    out = tmp_path / "pack"
    args = ["report", "--since", "2026-11-01", "--until", "2026-12-01", "--from", str(export), "--out", str(out)]
    assert main([*args, "--format", "json"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["SHA256SUMS", "map-allowed.svg", "map-refusals.svg",
                                                     "policies", "report.json"]  # fmt: skip
    data = orjson.loads((out / "report.json").read_bytes())
    assert data["summary"]["refused"] == 56 and data["verification"]["ok"]
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert any(line.endswith(f"  policies/{SHA2}.yaml") for line in sums)
    assert main([*args, "--until", "2026-10-01"]) == 2
    assert "--until must be after --since" in capsys.readouterr().err
    assert main(["report", "--since", "yesterday", "--from", str(export)]) == 2
    assert "--since 'yesterday': give a date" in capsys.readouterr().err
    assert main(["report", "--since", "2026-11-01", "--from", str(tmp_path / "missing.jsonl")]) == 2
    assert "No such file" in capsys.readouterr().err
    monkeypatch.setenv("REGIONGATE_AUDIT_KEY", "short")
    assert main([*args, "--format", "json"]) == 2
    assert "at least 16" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"x": 1}\n')
    assert main(["report", "--since", "2026-11-01", "--from", str(bad)]) == 2
    assert f"{bad}:1: not a regiongate audit export" in capsys.readouterr().err


def test_would_be_refusals_of_monitor_rules_and_of_the_shadow_policy() -> None:
    """Let through, but refused by a monitor rule or by the shadow policy: both are would-be refusals."""
    request: dict[str, Any] = {
        "subdivisions": [],
        "asn": None,
        "path": "/v1/models",
        "model": None,
        "policy": SHA2,
        "client": "h:1",
    }
    shadowed = _envelope(
        "request", "2026-11-21T10:00:00.000+00:00", request_id="r3", decision="allow", rule="supported",
        country="FR", shadow_decision="deny", shadow_rule="tighter", **request,
    )  # fmt: skip
    monitored = _envelope(
        "request", "2026-11-21T10:00:01.000+00:00", request_id="r4", decision="monitor", rule="watch-br",
        country="BR", **request,
    )  # fmt: skip
    both = [*entries()[:-1], shadowed, monitored, entries()[-1]]
    r = report_of(sealed(both))
    assert r["verification"]["ok"]
    assert r["would_refuse_by_rule"] == [{"key": "shadow: tighter", "n": 1}, {"key": "watch-br", "n": 1}]
    assert r["summary"]["refused"] == 56  # a would-be refusal is not a refusal


def test_tokens_by_country_from_the_requests_stored_with_their_usage() -> None:
    """With --audit all, forwarded requests carry their usage: the report adds it up by country."""
    request: dict[str, Any] = {
        "subdivisions": [], "asn": None, "path": "/v1/chat/completions", "model": "gpt-4o-mini", "policy": SHA2,
        "client": "h:1", "decision": "allow", "rule": "supported", "caller": "team-a",
    }  # fmt: skip
    used = [
        _envelope("request", f"2026-11-21T10:00:0{i}.000+00:00", request_id=f"t{i}", country=cc, usage=usage, **request)
        for i, (cc, usage) in enumerate(
            [
                ("FR", {"input": 800, "output": 64, "cached": 512, "source": "usage"}),
                ("FR", {"input": 100, "output": 36, "source": "estimate"}),
                ("US", {"input": 5, "output": 1, "source": "usage"}),
            ]
        )
    ]
    plain = report_of(sealed())
    assert plain["tokens_by_country"] == [] and "Tokens by country" not in render_html(build(
        load_export(export_lines(sealed()), "e"), SINCE, UNTIL, None, now=NOW, source="e"))  # fmt: skip
    items = sealed([*entries()[:-1], *used, entries()[-1]])
    r = report_of(items)
    assert r["verification"]["ok"]
    assert r["tokens_by_country"] == [{"key": "FR", "n": 1000}, {"key": "US", "n": 6}]
    assert r["summary"] == plain["summary"]  # usage adds a breakdown, it changes no count
    html = render_html(build(load_export(export_lines(items), "e"), SINCE, UNTIL, None, now=NOW, source="e"))
    assert "<h2>Tokens by country</h2>" in html and ">1000<" in html.replace(",", "")
