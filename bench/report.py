"""The report: the Markdown tables, the goal lines, the environment the figures depend on, and
the JSON document.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import REFUSED_SHARE, REPO_DIR
from .goals import Goal
from .processes import Tools
from .targets import GATEWAYS
from .wrk import THROUGHPUT_CONNECTIONS, TargetResult


def markdown_table(results: dict[str, TargetResult]) -> str:
    c = THROUGHPUT_CONNECTIONS
    rows = [
        f"| target | req/s @{c} | p50 @{c} | p99 @{c} | p50 @1 | p99 @1 "
        "| added p50 @1 vs bare upstream | non-2xx @64 / @1 | CPU µs / request @64 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        t, lat = r.throughput.latency_ms, r.latency.latency_ms
        added = "-" if r.key == "upstream" or r.added_p50_ms is None else f"{r.added_p50_ms:+.3f} ms"
        rows.append(
            f"| {r.label} | {r.throughput.rps:,.0f} | {t['p50']:.3f} ms | {t['p99']:.3f} ms "
            f"| {lat['p50']:.3f} ms | {lat['p99']:.3f} ms | {added} "
            f"| {r.throughput.non2xx_share:.1%} / {r.latency.non2xx_share:.1%} "
            f"| {'-' if r.cpu_us_per_request is None else r.cpu_us_per_request} |"
        )
    return "\n".join(rows)


def stream_table(streams: dict[str, Any]) -> list[str]:
    if not streams:
        return []
    rows = [
        "| data plane | streams | events relayed | gateway CPU µs / event | emitter CPU | client CPU "
        "| held streams | RSS delta | KiB / held stream | dropped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in streams.items():
        relay, held = r["relay"], r["held"] or {}
        label = GATEWAYS[key][0] if key in GATEWAYS else "bare byte pipe on uvloop (floor, no HTTP)"
        per_event = "-" if relay["cpu_us_per_event"] is None else f"{relay['cpu_us_per_event']:.1f}"
        per_stream = "-" if held.get("kib_per_stream") is None else f"{held['kib_per_stream']:.2f}"
        rss = f"{(held['rss_after_kib'] - held['rss_before_kib']) / 1024:,.1f} MiB" if held else "-"
        rows.append(
            f"| {label} | {relay['streams']:,} | {relay['events_in_window']:,} "
            f"(expected {relay['expected_events']:,.0f}) | {per_event} | {relay['emitter_cpu_share']:.0%} "
            f"| {relay['client_cpu_share']:.0%} | {held.get('streams', 0):,} | {rss} | {per_stream} "
            f"| {relay['dropped']} / {held.get('dropped', '-')} |"
        )
    return [*rows, ""]


def goal_lines(goals: list[Goal]) -> list[str]:
    lines = []
    for g in goals:
        verdict = "PASS" if g.passed else "MISS"
        pct = f", {g.margin / g.threshold:+.0%}" if g.threshold else ""
        value = f"{g.measured:,.0f}" if g.unit == "req/s" else f"{g.measured:.3f}"
        margin = f"{g.margin:+,.0f}" if g.unit == "req/s" else f"{g.margin:+.3f}"
        if g.unit == "x":
            value, margin = f"{g.measured:.2f}", f"{g.margin:+.2f}"
        lines.append(f"{verdict}  {g.name}: {value} {g.unit} (margin {margin} {g.unit}{pct})")
    return lines


def report_text(results: dict[str, TargetResult], goals: list[Goal], problems: list[str], meta: dict[str, Any]) -> str:
    env = meta.get("environment") or {}
    lines = [
        f"Regiongate benchmark: {meta['duration_s']}s per run, wrk -t1, {meta['pinning']['note']}",
        f"Interpreter: {interpreter_line(env.get('interpreter') or interpreter())}",
    ]
    if meta.get("rules"):
        r = meta["rules"]
        lines.append(
            f"--rules {r['generated']:,}: {r['rules']:,} rules ({r['file_bytes']:,} bytes) loaded in "
            f"{r['load_cpu_s']} s of CPU"
        )
    lines += [
        "",
        markdown_table(results),
        "",
        *stream_table(meta.get("streams") or {}),
        *goal_lines(goals),
    ]
    if problems:
        lines += ["", "SANITY CHECKS FAILED (the figures above do not measure what they claim):"]
        lines += [f"  - {p}" for p in problems]
    else:
        lines += ["", f"sanity: refusal share ~{REFUSED_SHARE:.0%} where expected, bodies checked"]
    return "\n".join(lines)


def interpreter() -> dict[str, Any]:
    """The Python running the gateway, and how it was built: a PGO/LTO build (Debian's, the
    official Docker images) runs the gateway with 0.8-0.9x the CPU of a plain -O3 one."""
    config_args = str(sysconfig.get_config_var("CONFIG_ARGS") or "")
    cflags = str(sysconfig.get_config_var("CFLAGS") or "")
    return {
        "implementation": platform.python_implementation(),
        "version": platform.python_version(),
        "compiler": platform.python_compiler(),
        "pgo": "--enable-optimizations" in config_args or "-fprofile-use" in cflags,
        "lto": "--with-lto" in config_args or "-flto" in cflags,
        "cflags": cflags,
        "config_args": config_args,
    }


def interpreter_line(i: dict[str, Any]) -> str:
    built = ", ".join(f for f, on in (("PGO", i["pgo"]), ("LTO", i["lto"])) if on) or "no PGO or LTO"
    return f"{i['implementation']} {i['version']} ({i['compiler']}; {built}; CFLAGS {i['cflags'] or '-'})"


def environment(tools: Tools) -> dict[str, Any]:
    """What the figures depend on, recorded next to them."""

    def first_line(cmd: Sequence[str], any_status: bool = False) -> str | None:
        """First line of a command's output; wrk -v prints its version but exits 1."""
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_DIR, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        text = (r.stdout or r.stderr).strip()
        return text.splitlines()[0] if (r.returncode == 0 or any_status) and text else None

    cpu = None
    with contextlib.suppress(OSError):
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
             if ln.startswith("model name")),
            None,
        )  # fmt: skip
    commit = first_line(["git", "rev-parse", "HEAD"])
    dirty = None
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                cwd=REPO_DIR, timeout=10, check=False)  # fmt: skip
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return {
        "python": sys.version.split()[0],
        "interpreter": interpreter(),
        "executable": sys.executable,
        "gateway_version": first_line([sys.executable, "-m", "gateway", "--version"]),
        "nginx": first_line([tools.nginx, "-v"]),
        "wrk": first_line([tools.wrk, "-v"], any_status=True),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_DIR))
    except ValueError:
        return str(path)
