"""docs/limits.md shows `regiongate explain` on the shipped token-budget example: each command on the page,
run here in this process, prints exactly what the page says it prints."""

from __future__ import annotations

import io
import re
import shlex
import shutil
from pathlib import Path
from unittest import mock

import pytest

from gateway.cli import main
from support.processes import POLICIES, ROOT

PAGE = ROOT / "docs" / "limits.md"
EXAMPLE = POLICIES / "examples" / "token-budgets.yaml"


def sessions() -> list[tuple[str, str]]:
    """Every ``$ command`` in the page's text blocks, with the output shown under it."""
    out = []
    for block in re.findall(r"```text\n(.*?)```", PAGE.read_text(), re.S):
        for m in re.finditer(r"^\$ (.*)\n((?:(?!\$ ).*\n)*)", block, re.M):
            out.append((m.group(1), m.group(2).rstrip("\n")))
    return out


def run(command: str, files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> str:
    """One of the page's shell lines: ``[echo '...' |] regiongate explain ... [| grep -E '...']`` or ``cat FILE``."""
    stdin = ""
    if m := re.fullmatch(r"echo '([^']*)' \| (.*)", command):
        stdin, command = m.group(1) + "\n", m.group(2)
    pattern = None
    if m := re.fullmatch(r"(.*) \| grep -E '([^']*)'", command):
        command, pattern = m.group(1), m.group(2)
    args = shlex.split(command)
    if args[0] == "cat":
        return files[args[1]]
    assert args[:2] == ["regiongate", "explain"], command
    with mock.patch("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin.encode()))):
        assert main(args[1:]) == 0, command
    printed = capsys.readouterr().out.rstrip("\n")
    if pattern is None:
        return printed
    return "\n".join(line for line in printed.splitlines() if re.search(pattern, line))


def test_every_explain_on_the_page_prints_what_the_page_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shown = sessions()
    assert len(shown) >= 8, shown  # one for each idea the page explains, at least
    monkeypatch.chdir(tmp_path)
    shutil.copy(EXAMPLE, tmp_path / "token-budgets.yaml")
    files: dict[str, str] = {}
    for command, output in shown:
        if command.startswith("cat "):  # the body the next commands read: written as the page shows it
            name = command.split()[1]
            files[name] = output
            (tmp_path / name).write_text(output + "\n")
        assert run(command, files, capsys) == output, command
