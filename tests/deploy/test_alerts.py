"""Alert rules: valid for promtool, unit-tested both ways, and the same for the Prometheus Operator.

``promtool test rules`` runs deploy/prometheus/alerts.test.yml; this file
also makes sure that every alert there has a case that fires and one that
does not, so an alert added later without tests fails here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.processes import ROOT

PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
UNIT_TESTS = PROMETHEUS / "alerts.test.yml"
OPERATOR_RULE = ROOT / "deploy" / "kubernetes" / "overlays" / "production" / "prometheusrule.yaml"


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool missing (Debian package prometheus; scripts/test installs it)"
    return found


def alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_checks_the_rules() -> None:
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in out.stdout


def test_promtool_unit_tests_pass() -> None:
    out = subprocess.run([promtool(), "test", "rules", UNIT_TESTS.name], capture_output=True, text=True, cwd=PROMETHEUS)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The same unit tests against rules whose thresholds moved: promtool must notice."""
    text = RULES.read_text().replace("> 0.05", "> 0.5").replace("> 30 * 86400", "> 300 * 86400")
    (tmp_path / "alerts.yml").write_text(text)
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    out = subprocess.run([promtool(), "test", "rules", UNIT_TESTS.name], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0
    assert "RegiongateUpstreamErrors" in out.stdout + out.stderr
    assert "RegiongateGeoIPDatabaseTooOld" in out.stdout + out.stderr


def cases() -> dict[str, dict[str, int]]:
    """alertname -> how many evaluations expect it firing and how many expect it silent."""
    seen: dict[str, dict[str, int]] = {}
    for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            counts = seen.setdefault(case["alertname"], {"fires": 0, "silent": 0})
            counts["fires" if case["exp_alerts"] else "silent"] += 1
    return seen


@pytest.mark.parametrize("alert", alert_names())
def test_every_alert_is_tested_firing_and_silent(alert: str) -> None:
    counts = cases().get(alert, {"fires": 0, "silent": 0})
    assert counts["fires"] >= 1 and counts["silent"] >= 1, (alert, counts)


def test_every_alert_says_what_it_means() -> None:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_docs_explain_every_alert() -> None:
    page = (ROOT / "docs" / "monitoring.md").read_text()
    alerts = page.split("\n## Alerts\n", 1)[1].split("\n## ", 1)[0]
    for alert in alert_names():
        assert f"`{alert}`" in alerts, alert


def test_prometheus_loads_the_rules() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == [RULES.name]


def test_prometheus_operator_rule_is_generated_from_the_rules() -> None:
    out = subprocess.run(
        [sys.executable, str(PROMETHEUS / "prometheusrule.py"), "-o", "-"], capture_output=True, text=True, check=True
    )
    assert out.stdout == OPERATOR_RULE.read_text(), "run: python deploy/prometheus/prometheusrule.py"


def test_prometheus_operator_rule_has_the_same_groups() -> None:
    resource: dict[str, Any] = yaml.safe_load(OPERATOR_RULE.read_text())
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    kustomization = yaml.safe_load((OPERATOR_RULE.parent / "kustomization.yaml").read_text())
    assert OPERATOR_RULE.name in kustomization["resources"]
