"""The stream benchmarks, driven from here: the emitter of bench/streams.py on wrk's CPU, the bare
byte pipe (the floor per event), then each gateway in turn with many relayed and many held streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import streams as stream_bench
from .common import ALLOWED_ADDRS, BENCH_DIR, CHAT_PATH, log
from .processes import Pinning, connects, free_port, spawn, stop, wait_ready
from .targets import STREAM_GATEWAYS, metered, start_gateway


def run_streams(args: argparse.Namespace, pin: Pinning, workdir: Path) -> tuple[dict[str, Any], list[str]]:
    """Targets 3 and 4 for both data planes, one gateway at a time, against one emitter.

    The emitter and this process (the clients) share the CPU wrk used; the gateway has
    its own. The emitter is not the bottleneck when its CPU share stays well below one
    core and the events relayed match what the schedule asks for; both are reported, and
    a shortfall of more than 10% fails the sanity check.
    """
    problems: list[str] = []
    results: dict[str, Any] = {}
    port = free_port()
    with contextlib.ExitStack() as stack:
        log_path = workdir / "emitter.log"
        cmd = [sys.executable, str(BENCH_DIR / "streams.py"), "emit", "--port", str(port)]
        emitter = spawn(pin.client(cmd), log_path, many_files=True)
        stack.callback(stop, emitter, "emitter")
        wait_ready(emitter, "emitter", [log_path], lambda: connects(port))
        stream_bench.raise_nofile()
        held_streams = fit_held_streams(args.held_streams)
        if pin.client_cpu is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {pin.client_cpu})
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        floor = relay_through_pipe(args, pin, workdir, port, emitter.pid)
        results["pipe"] = {"relay": asdict(floor), "held": None}
        if floor.dropped or floor.events_in_window < 0.9 * floor.expected_events:
            problems.append(
                f"bare pipe: {floor.events_in_window:,} of {floor.expected_events:,.0f} events, {floor.dropped} "
                f"dropped: the emitter ({floor.emitter_cpu_share:.0%} CPU) or the clients cannot keep the schedule"
            )
        for key in STREAM_GATEWAYS:
            with contextlib.ExitStack() as gw_stack:
                gw = start_gateway(gw_stack, pin, workdir, f"http://127.0.0.1:{port}", key)
                gw_port = int(gw.url.split(":")[2].split("/")[0])
                log(f"{gw.label}: {args.streams:,} streams, one event each per {args.stream_interval}s, "
                    f"{args.duration}s window")  # fmt: skip
                relay = asyncio.run(
                    stream_bench.measure_relay(
                        "127.0.0.1", gw_port, CHAT_PATH, ALLOWED_ADDRS[0], args.streams,
                        args.stream_interval, args.duration, gw.pid, emitter.pid,
                    )
                )  # fmt: skip
                log(f"{gw.label}: {held_streams:,} held streams")
                held = asyncio.run(
                    stream_bench.measure_held("127.0.0.1", gw_port, CHAT_PATH, ALLOWED_ADDRS[0], held_streams, gw.pid)
                )
                problems += metered(gw, stream=True)
            results[key] = {"relay": asdict(relay), "held": asdict(held)}
            where = gw.label
            if relay.dropped or held.dropped:
                problems.append(f"{where}: streams dropped: {relay.dropped} relayed, {held.dropped} held")
            if relay.usage_seen or held.usage_seen:
                problems.append(
                    f"{where}: {relay.usage_seen + held.usage_seen} streams got usage they did not ask for "
                    "(the usage chunk or usage:null members the gateway asked the upstream for reached the client)"
                )
            if relay.events_in_window < 0.9 * relay.expected_events:
                problems.append(
                    f"{where}: {relay.events_in_window:,} events relayed, {relay.expected_events:,.0f} scheduled: "
                    f"the emitter ({relay.emitter_cpu_share:.0%} CPU), the clients or the gateway fell behind"
                )
    if pin.client_cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return results, problems


def relay_through_pipe(
    args: argparse.Namespace, pin: Pinning, workdir: Path, emitter_port: int, emitter_pid: int
) -> stream_bench.RelayMeasure:
    """The same relay load through a bare byte pipe on the gateway's CPU: the floor per event."""
    port = free_port()
    log_path = workdir / "pipe.log"
    cmd = [sys.executable, str(BENCH_DIR / "streams.py"), "pipe", "--port", str(port),
           "--upstream-port", str(emitter_port)]  # fmt: skip
    with contextlib.ExitStack() as stack:
        proc = spawn(pin.server(cmd), log_path, many_files=True)
        stack.callback(stop, proc, "pipe")
        wait_ready(proc, "pipe", [log_path], lambda: connects(port))
        log(f"bare byte pipe (floor): {args.streams:,} streams")
        return asyncio.run(
            stream_bench.measure_relay(
                "127.0.0.1", port, CHAT_PATH, ALLOWED_ADDRS[0], args.streams,
                args.stream_interval, args.duration, proc.pid, emitter_pid,
            )
        )  # fmt: skip


def fit_held_streams(wanted: int) -> int:
    """As many held streams as one gateway process may hold under the open-file hard limit.

    Each held stream is two descriptors in the gateway (client and upstream side), and the
    native data plane keeps 64 back for its control plane; a hard limit we cannot raise
    (no CAP_SYS_RESOURCE) bounds the benchmark, and the output says so.
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    fit = (hard - 64) // 2 - 100  # the warm-up streams and some slack
    if wanted > fit:
        log(f"NOTE: open-file hard limit {hard}: {fit:,} held streams instead of {wanted:,} (raise it to measure more)")
        return fit
    return wanted
