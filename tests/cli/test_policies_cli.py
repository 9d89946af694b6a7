"""``regiongate policies`` and ``regiongate check --max-age``, in process, with the clock set."""

from __future__ import annotations

import datetime
import json
import re

import pytest

from gateway.cli import main, policies
from support.processes import CITY, POLICIES


def test_policies_lists_every_shipped_file_with_its_provider_source_and_date(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(policies, "today", lambda: datetime.date(2027, 6, 1))
    assert main(["policies", "--json"]) == 0
    listed = {p["file"]: p for p in json.loads(capsys.readouterr().out)}
    on_disk = {p.name for p in POLICIES.glob("*.yaml")} | {f"examples/{p.name}" for p in POLICIES.glob("examples/*")}
    assert set(listed) == on_disk
    anthropic = listed["anthropic-supported.yaml"]
    assert anthropic["provider"] == "Anthropic" and anthropic["captured"] == "2026-12-03"
    assert anthropic["source"] == ["https://platform.claude.com/docs/en/api/supported-regions"]
    assert anthropic["age_days"] == 180 and anthropic["rules"] == 2
    assert listed["openai-supported.yaml"]["age_days"] == 191
    assert len(listed["sanctions-starter.yaml"]["source"]) == 7
    assert list(anthropic) == ["file", "path", "description", "provider", "source", "captured", "age_days", "rules"]

    assert main(["policies"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^  anthropic-supported.yaml +Anthropic +2026-12-03 +180d +2$", text, re.M), text
    assert "  source: https://www.sanctionsmap.eu/" in text


@pytest.mark.parametrize(
    ("today", "max_age", "code", "says"),
    [
        (datetime.date(2027, 5, 31), "180d", 0, None),  # 179 days old
        (datetime.date(2027, 6, 1), "180d", 0, None),  # exactly 180: not older than that
        (datetime.date(2027, 6, 2), "180d", 3, "captured 2026-12-03, 181 days ago, more than --max-age 180d"),
        (datetime.date(2026, 12, 1), "180d", 3, "2 days in the future"),
        (datetime.date(2030, 1, 1), None, 0, None),  # no --max-age: age is not looked at
    ],
)
def test_check_max_age_warns_and_exits_3_when_a_list_is_older(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    today: datetime.date,
    max_age: str | None,
    code: int,
    says: str | None,
) -> None:
    monkeypatch.setattr(policies, "today", lambda: today)
    path = str(POLICIES / "anthropic-supported-country-only.yaml")
    assert main(["check", "-q", path, *(["--max-age", max_age] if max_age else [])]) == code
    err = capsys.readouterr().err
    if says is None:
        assert "warning" not in err
    else:
        assert err.startswith(f"{path}: warning: ") and says in err, err


def test_a_broken_policy_outranks_a_stale_one_and_an_undated_policy_is_never_stale(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    from pathlib import Path

    monkeypatch.setattr(policies, "today", lambda: datetime.date(2030, 1, 1))
    undated = Path(str(tmp_path)) / "mine.yaml"
    undated.write_text("version: 1\nrules: [{countries: [US], action: allow}]\n")
    assert main(["check", "-q", "--max-age", "1d", str(undated)]) == 0
    broken = Path(str(tmp_path)) / "broken.yaml"
    broken.write_text("version: 1\ncaptured: 2026-12-03\n")
    stale = str(POLICIES / "anthropic-supported-country-only.yaml")
    assert main(["check", "-q", "--max-age", "1d", stale, str(broken)]) == 1
    assert "captured: needs source:" in capsys.readouterr().err
    assert main(["check", "--max-age", "soon", stale]) == 2


def test_explain_names_the_list_behind_the_deciding_rule(capsys: pytest.CaptureFixture[str]) -> None:
    policy = str(POLICIES / "sanctions-starter.yaml")
    assert main(["explain", "2a02:d2c0::1", "--policy", policy, "--geoip", CITY]) == 0
    card = capsys.readouterr().out.splitlines()
    (listed,) = [line for line in card if line.startswith("  list:")]
    assert listed.startswith("  list:      US Treasury (OFAC), EU, UK, captured 2026-12-03: https://ofac.treasury.gov/")
    assert card.index(listed) == 1 + next(i for i, line in enumerate(card) if line.startswith("  rule:"))
    assert main(["explain", "81.2.69.142", "--policy", policy, "--geoip", CITY]) == 0
    assert "  list:" not in capsys.readouterr().out  # a default cites no list
