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
from typing import TYPE_CHECKING, Any

from .options import add_redis_options

if TYPE_CHECKING:
    from ..evidence.chain import Verification
    from ..evidence.report import Evidence

KEY_ENV, KEY_ID_ENV = "REGIONGATE_AUDIT_KEY", "REGIONGATE_AUDIT_KEY_ID"
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
    r.add_argument("--key-file", metavar="FILE", help="older audit keys, one kid:secret a line, for the chain check")
    add_redis_options(r)
    r.set_defaults(func=run)


def _when(text: str, what: str) -> datetime:
    from ..evidence.report import parse_time

    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(f"--{what} {text!r}: give a date (2026-11-01) or an ISO time") from None


def run(args: argparse.Namespace) -> int:
    from ..evidence.chain import KeyError_
    from ..evidence.report import ExportError

    try:
        now = datetime.now(UTC)
        since = _when(args.since, "since")
        until = _when(args.until, "until") if args.until else now
        if until <= since:
            raise ValueError("--until must be after --since")
        evidence = _load(args, since, until)
        keys = _keys(args.key_file)
    except (ValueError, KeyError_, ExportError, OSError) as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"evidence-{since:%Y%m%d}-{until:%Y%m%d}")
    try:
        written = write_pack(evidence, since, until, keys, args.format, out, now)
    except (OSError, PdfError) as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 2
    print(f"regiongate: evidence pack in {out}/ ({', '.join(written)})", file=sys.stderr)
    return 0


def _load(args: argparse.Namespace, since: datetime, until: datetime) -> Evidence:
    from ..evidence.report import read_export

    if args.from_file:
        with open(args.from_file, "rb") as f:
            return read_export(f, args.from_file)
    if not args.redis:
        raise ValueError("give --from FILE, or --redis (or REGIONGATE_REDIS_URL)")
    import asyncio

    from ..shared.redisconn import RedisConfigError, RedisUnavailable

    try:
        return asyncio.run(read_redis(args.redis, args.redis_prefix, dict(os.environ), since, until))
    except (RedisConfigError, RedisUnavailable) as e:
        raise ValueError(str(e)) from None


async def read_redis(url: str, prefix: str, env: dict[str, str], since: datetime, until: datetime) -> Evidence:
    """The stream's entries of the period, the policy texts they name, and the hourly counts, from Redis."""
    import orjson

    from ..evidence.report import Evidence
    from ..shared.redisconn import PASSWORD_ENV, RedisUnavailable, connect, describe_error, parse_url

    client = connect(parse_url(url), env.get(PASSWORD_ENV) or None, 5.0)
    key = f"{prefix}audit"
    items: list[tuple[str, Any]] = []
    try:
        # Entries are stamped when written; a gap entry written after Redis came back can be late by its outage.
        start, end = f"{int(since.timestamp() * 1000)}-0", f"{int((until + timedelta(hours=1)).timestamp() * 1000)}-0"
        while True:  # in pages, so a month's stream is not loaded in one reply
            page = await client.xrange(key, min=start, max=end, count=1000)
            for sid, fields in page:
                raw = fields.get(b"e")
                try:
                    items.append((sid.decode(), orjson.loads(raw) if raw is not None else _legacy(fields)))
                except orjson.JSONDecodeError:
                    items.append((sid.decode(), None))  # verify counts it as malformed
                start = "(" + sid.decode()
            if len(page) < 1000:
                break
        shas = sorted({e["sha256"] for _, e in items if isinstance(e, dict) and e.get("kind") == "policy"})
        texts = {}
        if shas:
            got = await client.hmget(f"{prefix}{{evidence}}:policies", shas)
            texts = {sha: t.decode() for sha, t in zip(shas, got, strict=True) if t is not None}
        hourly = []
        hour = since.replace(minute=0, second=0, microsecond=0)
        while hour < until:
            label = f"{hour:%Y-%m-%dT%H}"
            for field, n in (await client.hgetall(f"{prefix}{{evidence}}:counts:{label}")).items():
                try:
                    cc, sub, decision, rule = orjson.loads(field)
                    hourly.append((label, str(cc), str(sub), str(decision), str(rule), int(n)))
                except (ValueError, TypeError, orjson.JSONDecodeError):
                    continue
            hour += timedelta(hours=1)
    except Exception as e:
        raise RedisUnavailable(f"reading the audit stream: {describe_error(e)}") from e
    finally:
        await client.aclose()
    return Evidence(items, texts, hourly, f"Redis {parse_url(url).url}, stream {key}")


def _legacy(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """An entry from before the chain (one stream field per key) as a request entry."""
    from ..shared.audit import decode

    return decode(fields)


def _keys(key_file: str | None) -> dict[str, bytes] | None:
    """The audit keys by id (env's current one and the file's older ones); None when there is none."""
    from ..evidence.chain import make_key, parse_key_file

    keys: dict[str, bytes] = {}
    if key_file:
        keys.update(parse_key_file(Path(key_file).read_text(encoding="utf-8"), key_file))
    secret = os.environ.get(KEY_ENV)
    if secret:
        key = make_key(os.environ.get(KEY_ID_ENV) or "default", secret)
        keys[key.kid] = key.secret
    return keys or None


def write_pack(
    evidence: Evidence,
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
    report = build(evidence, since, until, checked, now=now)
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
