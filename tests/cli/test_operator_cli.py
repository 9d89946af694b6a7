"""The command line as a newcomer meets it: --help, check's one pass, explain's output."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import _parser
from gateway.runtime import Settings
from support.processes import CITY, POLICIES, write


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if not isinstance(a, argparse._HelpAction)]


# --- --help ------------------------------------------------------------------------------


def test_every_argument_of_every_command_has_help() -> None:
    missing = [
        f"{name} {a.option_strings or a.dest}"
        for name, p in subcommands().items()
        for a in options(p)
        if not (a.help and a.help.strip())
    ]
    assert missing == []


def test_every_serve_option_shows_its_default_and_variable() -> None:
    serve = subcommands()["serve"]
    opts = options(serve)
    assert {a.dest for a in opts} == set(Settings.model_fields)  # every setting has a flag, and no more
    for a in opts:
        assert a.help and "default: " in a.help, a.option_strings
        variable = "REGIONGATE_REDIS_URL" if a.dest == "redis" else f"REGIONGATE_{a.dest.upper()}"
        assert f"(env {variable}" in a.help, a.option_strings


@pytest.mark.parametrize(
    ("dest", "shown"),
    [("port", "8080"), ("admin_port", "9090"), ("host", "127.0.0.1"), ("workers", "1"), ("log_level", "warning")],
)
def test_shown_defaults_are_the_real_ones(dest: str, shown: str) -> None:
    (action,) = (a for a in options(subcommands()["serve"]) if a.dest == dest)
    assert f"default: {shown})" in (action.help or "")
    assert str(Settings.model_fields[dest].default) == shown


@pytest.mark.e2e
def test_help_texts_render() -> None:
    serve = run("serve", "--help").stdout
    assert "default: 8080" in serve and "default: https://api.openai.com" in serve
    explain = run("explain", "--help").stdout
    assert "--path" in explain and "default: /v1/chat/completions" in explain
    assert "does not ask a running gateway" in " ".join(explain.split())
    assert "POLICY" in run("check", "--help").stdout
    stub = run("stub", "--help").stdout
    assert "default: 8000" in stub and "default: 127.0.0.1" in stub


@pytest.mark.e2e
def test_usage_errors_are_one_line() -> None:
    r = run("explain")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--help" in r.stderr


# --- check: one pass ---------------------------------------------------------------------


@pytest.mark.e2e
def test_check_reports_structural_and_semantic_problems_in_one_run(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "p.yaml",
        "version: 1\nrules:\n  - {name: a, contries: [GB], action: allow}\n"
        "  - {name: b, countries: [UK], action: allow}\n  - {name: c, paths: ['/v1/*/x*'], action: deny}\n",
    )
    r = run("check", p)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"{p}:3: rules[0]: unknown key 'contries'",
        f"{p}:4: rules[1].countries: 'UK' is not an ISO 3166-1 alpha-2 code; did you mean 'GB'?",
        f"{p}:5: rules[2].paths: '/v1/*/x*' has a '*' before its end: '*' is allowed only as the last "
        "character, where it makes the pattern a prefix ('/v1/*' matches every path under /v1/); "
        "there are no wildcards inside a path",
    ]


@pytest.mark.e2e
def test_check_yaml_error_points_at_the_unclosed_bracket(tmp_path: Path) -> None:
    p = write(tmp_path, "p.yaml", "version: 1\nrules:\n  - countries: [GB\n    action: allow\n")
    r = run("check", p)
    assert r.returncode == 1 and r.stderr.startswith(f"{p}:3: YAML syntax error: the '[' at column 16")


# --- explain -----------------------------------------------------------------------------

POLICY = "version: 1\nrules:\n  - {name: gb, countries: [GB], action: allow}\ndefaults:\n  action: deny\n"


@pytest.mark.e2e
def test_explain_default_gives_reason_once_and_the_line_of_the_default(tmp_path: Path) -> None:
    p = write(tmp_path, "p.yaml", POLICY)
    r = run("explain", "175.16.199.1", "--policy", p, "--geoip", CITY)
    assert r.returncode == 0
    assert "  rule:      defaults.action (line 5)" in r.stdout
    assert r.stdout.count("no rule matched") == 1 and "because:" not in r.stdout
    out = json.loads(run("explain", "175.16.199.1", "--policy", p, "--geoip", CITY, "--json").stdout)
    assert (out["rule"], out["rule_line"], out["why"]) == ("defaults.action", 5, [])


@pytest.mark.e2e
def test_explain_default_not_written_in_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "p.yaml", POLICY)
    r = run("explain", "10.1.2.3", "--policy", p, "--geoip", CITY)
    assert "  rule:      defaults.private (not in the file: the built-in default, allow)" in r.stdout
    assert json.loads(run("explain", "10.1.2.3", "--policy", p, "--json").stdout)["rule_line"] is None


@pytest.mark.e2e
def test_explain_names_policy_data_and_that_it_decides_locally(tmp_path: Path) -> None:
    p = write(tmp_path, "p.yaml", POLICY)
    r = run("explain", "81.2.69.160", "--policy", p, "--geoip", CITY)
    sha = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    assert f"  policy:    {p} (sha256:{sha[:12]}, mode enforce)" in r.stdout
    assert f"  geo:       GeoIP2-City {CITY}, built 20" in r.stdout
    assert "not asked of a running gateway" in r.stdout
    assert "because:   country GB is in countries" in r.stdout


@pytest.mark.e2e
def test_explain_names_the_embedded_data_and_its_date() -> None:
    r = run("explain", "81.2.69.160", "--policy", str(POLICIES / "openai-supported-country-only.yaml"))
    (geo,) = [line for line in r.stdout.splitlines() if line.startswith("  geo:")]
    assert "embedded-iptocc (iptocc " in geo and ", built 2" in geo


def test_docs_upstream_key_examples_are_valid_policies() -> None:
    import re

    from gateway.policy import parse_policy

    page = (POLICIES.parent / "docs" / "policy.md").read_text()
    section = page.split("\n## The upstream key\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        policy = parse_policy("version: 1\n" + block, "docs/policy.md", None)
        assert any(r.paths is not None for r in policy.rules)
