"""wrk: one run read from the JSON line bench/xff.lua prints, a target's measurements (warm-up,
64 connections, 1 connection, its process's CPU), and the sanity checks on each run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

from . import streams as stream_bench
from .common import MAX_SOCKET_ERROR_SHARE, REFUSED_SHARE, REPO_DIR, ROTATION, SHARE_TOLERANCE, XFF_LUA, BenchError, log
from .processes import Pinning, Tools
from .targets import Target

THROUGHPUT_CONNECTIONS = 64


@dataclass(frozen=True)
class WrkRun:
    """One wrk run, in the units the table uses."""

    connections: int
    duration_s: float
    requests: int
    rps: float
    non2xx: int
    non2xx_share: float
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]


def run_wrk(tools: Tools, pin: Pinning, url: str, connections: int, duration_s: int) -> WrkRun:
    """One wrk run, read from the JSON line xff.lua's done() prints."""
    cmd = pin.client([
        tools.wrk, "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "5s",
        "-s", str(XFF_LUA), url, "--", *ROTATION,
    ])  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60, cwd=REPO_DIR, check=False)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if result.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({result.returncode}) against {url}:\n{result.stdout}{result.stderr}")
    return wrk_run_from(json.loads(line.removeprefix("BENCH_JSON ")), connections)


def wrk_run_from(data: dict[str, Any], connections: int) -> WrkRun:
    requests = int(data["requests"])
    duration_s = data["duration_us"] / 1e6
    errors = {k: int(v) for k, v in data["errors"].items()}
    non2xx = errors.pop("status")
    latency = {k: round(v / 1000.0, 3) for k, v in data["latency_us"].items()}
    return WrkRun(
        connections=connections,
        duration_s=round(duration_s, 3),
        requests=requests,
        rps=round(requests / duration_s, 1) if duration_s else 0.0,
        non2xx=non2xx,
        non2xx_share=round(non2xx / requests, 4) if requests else 0.0,
        socket_errors=errors,
        latency_ms=latency,
    )


@dataclass
class TargetResult:
    key: str
    label: str
    pid: int
    throughput: WrkRun
    latency: WrkRun
    added_p50_ms: float | None = None
    # CPU time of the target's processes (nginx: the master and its workers) per request at
    # 64 connections: less sensitive to a busy machine than req/s.
    cpu_us_per_request: float | None = None
    problems: list[str] = field(default_factory=list)


def measure(target: Target, tools: Tools, pin: Pinning, duration_s: int, warmup_s: int) -> TargetResult:
    """Warm up (pools, caches; not recorded), then 64 connections, then 1 connection."""
    log(f"{target.label}: warm-up {warmup_s}s")
    run_wrk(tools, pin, target.url, THROUGHPUT_CONNECTIONS, warmup_s)
    log(f"{target.label}: {THROUGHPUT_CONNECTIONS} connections, {duration_s}s")
    pids = (target.pid, *target.also)
    cpu_before = sum(tree_cpu_seconds(p) for p in pids)
    throughput = run_wrk(tools, pin, target.url, THROUGHPUT_CONNECTIONS, duration_s)
    cpu = sum(tree_cpu_seconds(p) for p in pids) - cpu_before
    log(f"{target.label}: 1 connection, {duration_s}s")
    latency = run_wrk(tools, pin, target.url, 1, duration_s)
    result = TargetResult(target.key, target.label, target.pid, throughput, latency)
    if throughput.requests:
        result.cpu_us_per_request = round(cpu / throughput.requests * 1e6, 1)
    result.problems = check_run(target, throughput) + check_run(target, latency)
    return result


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live descendants (nginx's workers), from /proc."""
    total = stream_bench.cpu_seconds(pid)
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return total
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for child in children:
            with contextlib.suppress(OSError):  # a worker that exited since
                total += tree_cpu_seconds(child)
    return total


def check_run(target: Target, run: WrkRun) -> list[str]:
    """The refused share must be ~25% (0 for the bare upstream) and sockets mostly clean."""
    where = f"{target.label} @{run.connections}"
    if run.requests == 0:
        return [f"{where}: no request completed"]
    problems = []
    expected = REFUSED_SHARE if target.refuses else 0.0
    if abs(run.non2xx_share - expected) > SHARE_TOLERANCE:
        problems.append(
            f"{where}: non-2xx share {run.non2xx_share:.1%}, expected {expected:.0%} "
            f"(±{SHARE_TOLERANCE:.0%}): the blocking is not what the benchmark assumes"
        )
    errors = sum(run.socket_errors.values())
    if errors > MAX_SOCKET_ERROR_SHARE * run.requests:
        problems.append(f"{where}: {errors} socket errors in {run.requests} requests {run.socket_errors}")
    return problems


def fill_added_latency(results: dict[str, TargetResult]) -> None:
    """Added p50 @1 = the target's p50 at one connection minus the bare upstream's."""
    base = results["upstream"].latency.latency_ms["p50"]
    for result in results.values():
        result.added_p50_ms = round(result.latency.latency_ms["p50"] - base, 3)
