"""`python bench/run.py`: the flags, one run from preflight to report, and the exit status."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import __doc__ as PACKAGE_DOC
from .common import ALLOWED_ADDRS, DEFAULT_OUTPUT, REFUSED_ADDRS, REPO_DIR, BenchError, check_inputs, log
from .edges import start_edge_targets
from .goals import evaluate, recorded_figures
from .policy import load_bench_policy, preflight_policy
from .processes import find_tools, plan_pinning
from .report import display_path, environment, report_text, write_json
from .rules import measure_load, write_policy
from .streamruns import run_streams
from .targets import metered, probe, start_targets, stop_target
from .wrk import TargetResult, fill_added_latency, measure


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=PACKAGE_DOC.split("\n\n")[0] if PACKAGE_DOC else None)
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--duration",
        type=int,
        default=10,
        metavar="SECONDS",
        help="length of each measured wrk run (default 10)",
    )
    length.add_argument(
        "--quick",
        action="store_true",
        help="2 s runs and a 1 s warm-up: a smoke test, not a measurement",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        metavar="SECONDS",
        help="unrecorded wrk run before each target's measurements (default 2)",
    )
    p.add_argument("--skip-nginx-geoip2", action="store_true", help="do not run the nginx+geoip2 comparison")
    p.add_argument("--skip-streams", action="store_true", help="do not run the stream benchmarks")
    p.add_argument("--skip-grpc", action="store_true", help="do not run the gRPC Check rows (bench/grpcrun.py)")
    p.add_argument(
        "--skip-edges",
        action="store_true",
        help="do not run the decision-service rows (nginx, Traefik; bench/edges.py)",
    )
    p.add_argument(
        "--streams",
        type=int,
        default=2000,
        help="concurrent event streams for the CPU-per-event benchmark (default 2000)",
    )
    p.add_argument(
        "--stream-interval",
        type=float,
        default=0.25,
        metavar="SECONDS",
        help="time between two events of one stream (default 0.25)",
    )
    p.add_argument(
        "--held-streams",
        type=int,
        default=10000,
        help="concurrent idle streams for the memory-per-stream benchmark (default 10000)",
    )
    p.add_argument(
        "--rules",
        type=int,
        default=0,
        metavar="N",
        help="add a row: the bench policy behind N generated one-CIDR deny rules (none holds a rotation "
        "address), with its load time (default 0: no such row)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the results as JSON on stdout (the table goes to stderr)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"where to write the JSON results (default {DEFAULT_OUTPUT.relative_to(REPO_DIR)})",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 2, 1
        args.streams, args.held_streams = min(args.streams, 100), min(args.held_streams, 200)
    if args.duration < 1 or args.warmup < 1:
        p.error("--duration and --warmup must be at least 1 second")
    if args.rules < 0:
        p.error("--rules must be 0 or more")
    return args


def run(args: argparse.Namespace) -> int:
    check_inputs()
    recorded = recorded_figures()
    tools = find_tools(need_geoip2=not args.skip_nginx_geoip2)
    pin = plan_pinning(tools.taskset)
    log(pin.note)
    policy = load_bench_policy()
    preflight_policy()
    meta: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "quick": args.quick,
        "pinning": asdict(pin),
        "rotation": {"allowed": ALLOWED_ADDRS, "refused": REFUSED_ADDRS},
        "environment": environment(tools),
    }
    results: dict[str, TargetResult] = {}
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="regiongate-bench-")))
        rules = None
        if args.rules:
            rules_policy = write_policy(workdir, args.rules)
            meta["rules"] = {"generated": args.rules, **measure_load(rules_policy)}
            log(f"--rules {args.rules}: loaded in {meta['rules']['load_cpu_s']} s of CPU")
            rules = (args.rules, rules_policy)
        targets = start_targets(stack, tools, pin, workdir, policy, not args.skip_nginx_geoip2, rules)
        if not args.skip_edges:
            targets += start_edge_targets(stack, tools, pin, workdir, targets[0])
        for t in targets:
            problems += probe(t, policy.block_body)
        for t in targets:
            results[t.key] = measure(t, tools, pin, args.duration, args.warmup)
            problems += results[t.key].problems + metered(t)
        for t in targets:
            stop_target(t)
        streams: dict[str, Any] = {}
        if not args.skip_streams:
            streams, stream_problems = run_streams(args, pin, workdir)
            problems += stream_problems
        if not args.skip_grpc:  # Envoy's ext_authz gRPC Check, beside grpcio's own cost (bench/grpcrun.py)
            from .grpcrun import run_grpc_check

            meta["grpc_check"], grpc_problems = run_grpc_check(pin, workdir, args.duration, args.warmup)
            problems += grpc_problems
    meta["streams"] = streams
    fill_added_latency(results)
    goals = evaluate(results, streams, recorded)
    document = {
        **meta,
        "targets": {k: asdict(r) for k, r in results.items()},
        "goals": [asdict(g) for g in goals],
        "sanity_ok": not problems,
        "problems": problems,
    }
    write_json(args.output, document)
    text = report_text(results, goals, problems, meta)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(document, indent=2))
    else:
        print(text)
    log(f"results written to {display_path(args.output)}")
    return 1 if problems else 0


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) takes the same path as Ctrl-C, so the servers are
    # stopped either way instead of being left running on their ports.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130
