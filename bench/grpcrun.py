"""The gRPC Check rows: Envoy's ext_authz Check against Regiongate, beside grpcio's own cost per call.

Two servers, each pinned to the servers' CPU, one after the other, driven by ``bench/grpcload.py``
pinned to the other CPU:

* ``grpcio alone``: an empty Authorization servicer (``python -m bench.grpcload empty``): what
  grpcio costs per call with no decision at all;
* ``Regiongate gRPC Check``: ``regiongate serve --port 0 --authz-grpc-port`` with the full
  benchmark policy (bench/policy.yaml) and its databases, the body sent so model rules apply.

Each row says calls per second, the server's CPU seconds per call (from /proc, so "per core"
holds even if the server did not use its whole CPU), and the load generator's CPU share of its
own core: under 0.9 means it had room left, so the server, not the client, set the rate
(``client_bound`` is set otherwise, and the row is then a lower bound). Target: at least
8,000 Checks per second per core (issue 17).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import ANONYMOUS_DB, ASN_DB, CITY_DB, POLICY, REFUSED_SHARE, SHARE_TOLERANCE, log
from .processes import Pinning, connects, free_port, spawn, stop, wait_ready

TARGET_PER_CORE = 8_000
CLIENT_BOUND = 0.9  # the load generator's share of its core above which it may have been the limit


@dataclass(frozen=True)
class GrpcRow:
    name: str
    calls_per_s: float
    server_cpu_us_per_call: float
    per_core: float  # calls per second per fully used server core
    client_cpu_share: float
    client_bound: bool
    kinds: dict[str, int]


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its threads (grpcio polls on its own threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _drive(pin: Pinning, port: int, server_pid: int, seconds: float, warmup: float) -> dict[str, Any]:
    cmd = pin.client([sys.executable, "-m", "bench.grpcload", "client", "--port", str(port),
                      "--seconds", str(seconds), "--warmup", str(warmup)])  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    # The server's CPU is read across the client's whole run; the warm-up is subtracted by rate below.
    before = _cpu_seconds(server_pid)
    out, _ = proc.communicate(timeout=seconds + warmup + 60)
    after = _cpu_seconds(server_pid)
    result: dict[str, Any] = json.loads(out)
    result["server_cpu_s"] = (after - before) * seconds / (seconds + warmup)
    return result


def _row(name: str, r: dict[str, Any]) -> GrpcRow:
    rate = r["calls"] / r["seconds"]
    per_call = r["server_cpu_s"] / max(r["calls"], 1)
    share = r["client_cpu_s"] / r["seconds"]
    return GrpcRow(
        name=name,
        calls_per_s=rate,
        server_cpu_us_per_call=per_call * 1e6,
        per_core=1 / per_call if per_call else 0.0,
        client_cpu_share=share,
        client_bound=share > CLIENT_BOUND,
        kinds=r["kinds"],
    )


def run_grpc_check(pin: Pinning, workdir: Path, seconds: float, warmup: float) -> tuple[dict[str, Any], list[str]]:
    """Both rows and the sanity problems (the refused share, a server that did not start)."""
    problems: list[str] = []
    rows: list[GrpcRow] = []
    port = free_port()
    log_path = workdir / "grpc-empty.log"
    empty = spawn(pin.server([sys.executable, "-m", "bench.grpcload", "empty", "--port", str(port)]), log_path)
    try:
        wait_ready(empty, "grpcio empty servicer", [log_path], lambda: connects(port))
        rows.append(_row("grpcio alone (empty servicer)", _drive(pin, port, empty.pid, seconds, warmup)))
    finally:
        stop(empty, "grpcio empty servicer")
    port = free_port()
    log_path = workdir / "grpc-regiongate.log"
    cmd = [sys.executable, "-m", "gateway", "serve", "--port", "0", "--admin-port", str(free_port()),
           "--policy", str(POLICY), "--geoip", str(CITY_DB), "--geoip", str(ASN_DB), "--geoip", str(ANONYMOUS_DB),
           "--access-log", str(workdir / "grpc-access.log"), "--authz-grpc-port", str(port),
           "--authz-grpc-envoy-edge"]  # fmt: skip
    gateway = spawn(pin.server(cmd), log_path)
    try:
        wait_ready(gateway, "Regiongate gRPC", [log_path], lambda: connects(port))
        row = _row("Regiongate gRPC Check (full policy)", _drive(pin, port, gateway.pid, seconds, warmup))
        rows.append(row)
        refused = row.kinds.get("denied_response", 0) / max(sum(row.kinds.values()), 1)
        if abs(refused - REFUSED_SHARE) > SHARE_TOLERANCE:
            problems.append(f"gRPC Check: {refused:.1%} refused, expected {REFUSED_SHARE:.0%}")
    finally:
        stop(gateway, "Regiongate gRPC")
    for r in rows:
        bound = " (the load generator was near its core's limit: a lower bound)" if r.client_bound else ""
        log(
            f"{r.name}: {r.calls_per_s:,.0f} calls/s, {r.server_cpu_us_per_call:.1f} µs server CPU per call "
            f"= {r.per_core:,.0f}/s per core; load generator {r.client_cpu_share:.0%} of its core{bound}"
        )
    return {"rows": [asdict(r) for r in rows], "target_per_core": TARGET_PER_CORE}, problems
