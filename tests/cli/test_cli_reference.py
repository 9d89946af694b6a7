"""docs/reference/cli.md is generated from the parsers and gateway/cli/options.py, and committed as generated."""

from __future__ import annotations

from pathlib import Path

from gateway.cli.options import SERVE_OPTIONS
from gateway.cli.reference import REGENERATE, markdown


def _root() -> Path:
    here = Path(__file__).resolve()
    return next(p for p in here.parents if (p / "pyproject.toml").exists())


def test_the_committed_cli_reference_is_the_generated_one() -> None:
    committed = (_root() / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    assert committed == markdown(), f"docs/reference/cli.md is stale: regenerate it with {REGENERATE}"


def test_the_reference_names_every_serve_option_with_its_variable_and_default() -> None:
    page = markdown()
    for o in SERVE_OPTIONS:
        row = next(line for line in page.splitlines() if line.startswith(f"| `{o.flag}"))
        assert f"`{o.variable}`" in row and o.default.replace("<", "&lt;") in row, o.flag
