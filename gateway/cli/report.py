"""``regiongate report``: a dated evidence pack (JSON, HTML, PDF) from the audit stream or an export.

The pack is a folder: ``report.json`` (the data), ``report.html`` (self-contained),
``report.pdf`` (the HTML printed by headless Chromium), the two maps as SVG,
every policy text in force (``policies/<sha256>.yaml``) and ``SHA256SUMS``
over all of them. The PDF is printed by Chromium rather than WeasyPrint: the
page is checked in the same engine that prints it (the tests load it in
Chromium with the network off and fail on a console error), and Chromium is
one Debian package where WeasyPrint would add Pango and its Python stack.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from .options import add_redis_options

if TYPE_CHECKING:
    from ..evidence.chain import Verification
    from ..evidence.report import Evidence

CHROMIUM_ENV = "REGIONGATE_CHROMIUM"
# Printing a report of a few hundred rows takes Chromium about 2 s here; a hung browser is cut off after this.
PDF_TIMEOUT = 120.0
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
)


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser(
        "report",
        help="a dated evidence pack (JSON, HTML, PDF) from the audit stream or an export file",
        description="Build an evidence pack over a period from the audit stream (--redis) or a file written by "
        "'regiongate audit export --format chain' (--from): the policy versions in force, refusals and "
        "allowed volume per country with world maps, GeoIP databases, overrides, evidence gaps, limitations, "
        "and the chain check (with the key in REGIONGATE_AUDIT_KEY or --key-file). Supporting evidence, "
        "not a certification.",
    )
    r.add_argument("--since", required=True, help="start of the period, a date or ISO time (UTC), included")
    r.add_argument("--until", help="end of the period, excluded (default: now)")
    r.add_argument(
        "--format",
        choices=["html", "pdf", "json"],
        default="html",
        help="what to build besides report.json and the maps: html, or pdf (with the html); default html",
    )
    r.add_argument("--out", metavar="DIR", help="the pack's folder (default: evidence-SINCE-UNTIL); made if missing")
    r.add_argument("--from", dest="from_file", metavar="FILE", help="an export file instead of Redis")
    r.add_argument(
        "--key-file",
        metavar="FILE",
        action="append",
        default=[],
        help="older audit keys, one kid:secret a line, for the chain check (repeatable; as audit verify)",
    )
    add_redis_options(r)
    r.set_defaults(func=run)


def _when(text: str, what: str) -> datetime:
    from ..evidence.report import parse_time

    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(f"--{what} {text!r}: give a date (2026-11-01) or an ISO time") from None


def run(args: argparse.Namespace) -> int:
    from ..evidence.chain import AuditKeyError
    from ..evidence.exportfile import ExportError
    from ..shared.redisconn import RedisConfigError, RedisUnavailable

    try:
        now = datetime.now(UTC)
        since = _when(args.since, "since")
        until = _when(args.until, "until") if args.until else now
        if until <= since:
            raise ValueError("--until must be after --since")
        evidence, source = _load(args, since, until)
        keys = _keys(args.key_file)
    except (ValueError, AuditKeyError, ExportError, OSError, RedisConfigError, RedisUnavailable) as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"evidence-{since:%Y%m%d}-{until:%Y%m%d}")
    try:
        written = write_pack(evidence, source, since, until, keys, args.format, out, now)
    except (OSError, PdfError) as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 2
    print(f"regiongate: evidence pack in {out}/ ({', '.join(written)})", file=sys.stderr)
    return 0


def _load(args: argparse.Namespace, since: datetime, until: datetime) -> tuple[Evidence, str]:
    """The evidence and where it came from: an export file, or Redis (the same reader as audit export)."""
    import asyncio

    from ..evidence.exportfile import load_export
    from ..shared.auditread import read_evidence

    if args.from_file:
        with open(args.from_file, "rb") as f:
            return load_export(f, args.from_file), args.from_file
    if not args.redis:
        raise ValueError("give --from FILE, or --redis (or REGIONGATE_REDIS_URL)")
    # A gap entry is written when Redis is back, after the minutes it covers: an hour's grace at the end.
    late = until + timedelta(hours=1)
    env = dict(os.environ)
    read = asyncio.run(
        read_evidence(args.redis, args.redis_prefix, env, since=since.timestamp(), until=late.timestamp())
    )
    return read, f"the audit stream {args.redis_prefix}audit in Redis"


def _keys(key_files: list[str]) -> dict[str, bytes] | None:
    """The audit keys by id (older ones from the files, the current one from the environment); None: none."""
    from ..evidence.chain import key_from_env, parse_key_file

    keys: dict[str, bytes] = {}
    for path in key_files:
        keys |= parse_key_file(Path(path).read_text(encoding="utf-8"), path)
    current = key_from_env(os.environ)
    if current is not None:
        keys[current.kid] = current.secret
    return keys or None


def write_pack(
    evidence: Evidence,
    source: str,
    since: datetime,
    until: datetime,
    keys: dict[str, bytes] | None,
    fmt: str,
    out: Path,
    now: datetime,
) -> list[str]:
    """Build the report and write the pack; the names written, SHA256SUMS last."""
    import orjson

    from ..evidence.chain import verify
    from ..evidence.report import build
    from ..evidence.report_html import maps, render_html
    from ..reports import dump

    checked: Verification | None = verify(evidence.items, keys) if keys is not None else None
    report = build(evidence, since, until, checked, now=now, source=source)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {"report.json": orjson.dumps(dump(report), option=orjson.OPT_INDENT_2) + b"\n"}
    for name, svg in maps(report).items():
        files[name] = svg.encode()
    for p in report.policies:
        if p.text is not None:
            files[f"policies/{p.sha256}.yaml"] = p.text.encode()
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    if fmt in ("html", "pdf"):
        html = render_html(report, sorted(sums.items()))
        (out / "report.html").write_text(html, encoding="utf-8")
        sums["report.html"] = hashlib.sha256(html.encode()).hexdigest()
    if fmt == "pdf":
        pdf = print_pdf(out / "report.html")
        (out / "report.pdf").write_bytes(pdf)
        sums["report.pdf"] = hashlib.sha256(pdf).hexdigest()
    (out / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for n, h in sorted(sums.items())), encoding="utf-8")
    return [*sorted(sums), "SHA256SUMS"]


class PdfError(Exception):
    """Chromium is missing, failed, or wrote no PDF."""


def chromium() -> str:
    found = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise PdfError(f"--format pdf needs Chromium (apt-get install chromium, or set {CHROMIUM_ENV})")
    return found


def print_pdf(html: Path) -> bytes:
    """``html`` printed to PDF by headless Chromium, in a fresh profile with the network off."""
    with tempfile.TemporaryDirectory(prefix="regiongate-pdf-") as tmp:
        target = Path(tmp) / "report.pdf"
        command = [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp}/profile",
            "--proxy-server=127.0.0.1:9",  # nothing to fetch; should the page try, it cannot reach anything
            "--no-pdf-header-footer",
            f"--print-to-pdf={target}",
            html.resolve().as_uri(),
        ]
        try:
            done = subprocess.run(command, capture_output=True, timeout=PDF_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise PdfError(f"Chromium did not print the PDF within {PDF_TIMEOUT:g} s") from None
        if not target.exists() or target.stat().st_size == 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise PdfError(f"Chromium wrote no PDF (exit {done.returncode}): {' | '.join(tail)}")
        return target.read_bytes()
