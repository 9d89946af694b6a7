"""The evidence pack as an auditor opens it: the HTML in headless Chromium (no network, no console
error, a screenshot), the PDF as PNG pages (pdftoppm) and as text (pdftotext), figures asserted there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from gateway.cli import main
from gateway.cli.report import CHROMIUM_FLAGS, chromium

from .evidence_run import SHA1, SHA2, export_lines, sealed

pytestmark = pytest.mark.e2e
CONSOLE = re.compile(r":CONSOLE[:(]")


def open_in_chromium(page: Path, profile: Path, *extra: str) -> tuple[str, str]:
    """(stdout, stderr) of headless Chromium loading ``page`` with console messages logged to stderr,
    a fresh profile, and every connection sent to a closed port."""
    done = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--proxy-server=127.0.0.1:9", *extra, page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return done.stdout, done.stderr


def text_of(pdf: Path, *args: str) -> str:
    return subprocess.run(["pdftotext", *args, str(pdf), "-"], capture_output=True, text=True, check=True).stdout


def test_the_console_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><p>x</p><script>console.error("planted-error")</script>')
    _, err = open_in_chromium(bad, tmp_path / "profile", "--dump-dom")
    assert any(CONSOLE.search(line) and "planted-error" in line for line in err.splitlines()), err[-2000:]


def test_pack_opens_prints_and_says_the_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export = tmp_path / "export.jsonl"
    export.write_bytes(b"\n".join(export_lines(sealed())) + b"\n")
    monkeypatch.setenv("REGIONGATE_AUDIT_KEY", "0123456789abcdef0123456789abcdef")
    monkeypatch.setenv("REGIONGATE_AUDIT_KEY_ID", "k1")
    out = tmp_path / "pack"
    argv = ["report", "--since", "2026-11-01", "--until", "2026-12-01", "--from", str(export), "--format", "pdf"]
    assert main([*argv, "--out", str(out)]) == 0

    # The HTML in Chromium: it loads, nothing logged to the console, the DOM has the figures.
    dom, err = open_in_chromium(out / "report.html", tmp_path / "p1", "--dump-dom")
    assert not [line for line in err.splitlines() if CONSOLE.search(line)], err[-2000:]
    assert "Regiongate evidence report, 2026-11-01 to 2026-12-01" in dom and "2,120" in dom
    assert dom.count('class="rg-map"') == 2
    shot = tmp_path / "page.png"
    open_in_chromium(out / "report.html", tmp_path / "p2", f"--screenshot={shot}", "--window-size=1100,2400")
    with Image.open(shot) as im:
        assert im.size == (1100, 2400)
        assert len(im.convert("RGB").getcolors(1 << 20) or []) > 50  # text and maps, not a blank page

    # The PDF: pages as PNG, and its text carries the figures, both versions, the gap, the chain check.
    pdf = out / "report.pdf"
    pages = int(re.search(r"Pages:\s+(\d+)", subprocess.run(["pdfinfo", str(pdf)], capture_output=True,
                                                               text=True, check=True).stdout)[1])  # type: ignore[index]  # fmt: skip
    assert pages >= 4
    subprocess.run(["pdftoppm", "-r", "40", "-png", str(pdf), str(tmp_path / "pg")], check=True)
    assert len(list(tmp_path.glob("pg-*.png"))) == pages
    text = text_of(pdf, "-layout")
    flat = " ".join(text.split())
    for figure in ("Requests judged 2,120", "Allowed 2,055", "Refused 56",
                   "Monitored (would be refused) 9", "Evidence gaps 1", "Chain check OK",
                   "US United States 2,000 0 0", "CN China 0 42 0", "RU Russian Federation 0 11 0",
                   "BR Brazil 0 0 9", "unknown unknown 0 3 0"):  # fmt: skip
        assert figure in flat, figure
    assert f"sha256 {SHA1}" in flat and f"sha256 {SHA2}" in flat
    assert "2026-11-20T14:02:00.000+00:00 2026-11-20T14:07:00.000+00:00" in flat and "redis: 42" in flat
    assert "Supporting evidence, not a certification" in flat
    assert "supported Example AI https://example.com/supported-countries 2026-11-14" in flat
    sums = {name: h for h, name in (line.split("  ", 1) for line in (out / "SHA256SUMS").read_text().splitlines())}
    assert set(sums) >= {"report.html", "report.pdf", "report.json", "map-refusals.svg", "map-allowed.svg"}
    for name in ("report.json", "map-refusals.svg", "map-allowed.svg"):
        assert f"{sums[name]} {name}" in flat, name  # the pages list the hashes of the data they show
    assert sums[f"policies/{SHA2}.yaml"] in flat
