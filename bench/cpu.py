#!/usr/bin/env python3
"""``python bench/cpu.py``: where the gateway's CPU goes per request, by thread and by build.

``bench/run.py``'s gateway row alone (the bare nginx upstream, the bench policy, the three test
databases, the access log to a file), driven by wrk at 64 connections with the same rotation,
servers on one CPU and wrk on the other. For each run it reads the gateway's CPU time from
``/proc`` before and after, split by thread (the event loop, the access log's writer, any other)
and into user and system time, and divides by the requests wrk completed: CPU time, not wall
time, so a busy machine slows a run down without making its figures much larger.

Several builds (``--tree DIR``, each a checkout with this project's layout; the first is this
one) are run in turn, round after round (``--rounds``), so that the machine's drift falls on every
build alike. ``--access-log off`` runs the same without the log; ``--py-spy FILE`` records the
first build's gateway during its first measured run with ``py-spy record --native --threads``
(``pip install py-spy``) and writes a collapsed-stack file for ``--fold``. ``--fold FILE`` prints
a collapsed-stack file's samples summed by part (the table in docs/internals/benchmarks.md).

    python bench/cpu.py --rounds 3 --duration 5
    python bench/cpu.py --tree ../old --rounds 4 --duration 5         # A/B, interleaved
    python bench/cpu.py --access-log off --tree . --rounds 3          # the same build, log off
    python bench/cpu.py --rounds 1 --duration 10 --py-spy /tmp/gw.txt && python bench/cpu.py --fold /tmp/gw.txt
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ANONYMOUS_DB, ASN_DB, CHAT_PATH, CITY_DB, POLICY, REPO_DIR, BenchError, log
from bench.processes import Pinning, find_tools, free_port, http, plan_pinning, stop, wait_ready
from bench.targets import start_upstream
from bench.wrk import THROUGHPUT_CONNECTIONS, run_wrk

_TICKS = os.sysconf("SC_CLK_TCK")


def thread_times(pid: int) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds of ``pid``'s threads: the main one (the event loop) and the others.

    Python does not name its threads for the OS (all are "python"), so the loop is told from
    the rest by its id, the process's; the only other busy thread is the access log's writer.
    """
    out: dict[str, tuple[float, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                rest = f.read().rpartition(")")[2]
            name = "loop thread" if int(tid) == pid else "other threads (the access log's writer)"
            fields = rest.split()
            user, system = int(fields[11]) / _TICKS, int(fields[12]) / _TICKS
            u, s = out.get(name, (0.0, 0.0))
            out[name] = (u + user, s + system)
    return out


def start_gateway(
    tree: Path, pin: Pinning, workdir: Path, upstream_base: str, access_log: str
) -> tuple[str, subprocess.Popen[bytes]]:
    """The gateway of ``tree``, as bench/targets.py starts the plain row (run from ``tree``)."""
    port, admin_port = free_port(), free_port()
    log_target = "off" if access_log == "off" else str(workdir / f"access-{port}.log")
    cmd = [
        sys.executable, "-m", "gateway", "serve",
        "--policy", str(POLICY),
        "--geoip", str(CITY_DB), "--geoip", str(ASN_DB), "--geoip", str(ANONYMOUS_DB),
        "--trusted-proxy", "127.0.0.1/32",
        "--upstream", upstream_base,
        "--host", "127.0.0.1", "--port", str(port),
        "--admin-host", "127.0.0.1", "--admin-port", str(admin_port),
        "--access-log", log_target,
        "--workers", "1",
    ]  # fmt: skip
    log_path = workdir / f"gateway-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGIONGATE_")}
    env["PYTHONPATH"] = str(tree)
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            pin.server(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tree,
            env=env,
            start_new_session=True,
        )
    wait_ready(proc, f"gateway ({tree})", [log_path], lambda: http(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200)
    return f"http://127.0.0.1:{port}{CHAT_PATH}", proc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--tree", type=Path, action="append", default=[], help="another build to run in turn")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5, metavar="SECONDS")
    p.add_argument("--warmup", type=int, default=2, metavar="SECONDS")
    p.add_argument("--access-log", choices=("on", "off"), default="on")
    p.add_argument("--log-off-too", action="store_true", help="run each build twice in turn: access log on, then off")
    p.add_argument("--py-spy", type=Path, metavar="FILE", help="record the first build's first run (collapsed stacks)")
    p.add_argument(
        "--perf", type=Path, metavar="FILE", help="perf record -g the first build's second run (or only run)"
    )
    p.add_argument("--syscalls", type=Path, metavar="FILE", help="strace -c -f the first build's first run (counts)")
    p.add_argument("--fold", type=Path, metavar="FILE", help="only print FILE's samples summed by part")
    args = p.parse_args(argv)
    if args.fold is not None:
        print_fold(args.fold)
        return 0
    builds = [REPO_DIR, *(t.resolve() for t in args.tree)]
    runs = [
        (tree, log_mode)
        for tree in builds
        for log_mode in ((args.access_log, "off") if args.log_off_too else (args.access_log,))
    ]
    tools = find_tools(need_geoip2=False)
    pin = plan_pinning(tools.taskset)
    log(pin.note)
    results: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(runs))}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="regiongate-cpu-")))
        upstream = start_upstream(stack, tools, pin, workdir)
        base = upstream.url.removesuffix(CHAT_PATH)
        gateways = []
        for tree, log_mode in runs:
            url, proc = start_gateway(tree, pin, workdir, base, log_mode)
            stack.callback(stop, proc, f"gateway ({tree})")
            run_wrk(tools, pin, url, THROUGHPUT_CONNECTIONS, args.warmup)
            gateways.append((proc.pid, url))
        for round_no in range(args.rounds):
            for i, (pid, url) in enumerate(gateways):
                first = i == 0 and round_no == 0
                spy = None
                if first and args.py_spy is not None:
                    spy = py_spy(pid, args.py_spy, args.duration)
                elif first and args.syscalls is not None:
                    spy = strace(pid, args.syscalls)
                elif i == 0 and args.perf is not None and round_no == min(1, args.rounds - 1):
                    spy = perf(pid, args.perf, args.duration)
                before = thread_times(pid)
                run = run_wrk(tools, pin, url, THROUGHPUT_CONNECTIONS, args.duration)
                after = thread_times(pid)
                if spy is not None:
                    if first and args.syscalls is not None:
                        spy.send_signal(signal.SIGINT)  # strace -c prints its table when interrupted
                    spy.wait()
                if not run.requests:
                    raise BenchError(f"no requests completed against {url}")
                if first and args.syscalls is not None:
                    print_syscalls(args.syscalls, run.requests)
                results[i].append(per_request(before, after, run.requests, run.rps))
                tree, log_mode = runs[i]
                figure = results[i][-1]["total"]
                log(f"round {round_no + 1} {tree} (log {log_mode}): {figure:.1f} µs/request, {run.rps:,.0f} req/s")
    print(f"CPU µs per request @{THROUGHPUT_CONNECTIONS}, {args.rounds} round(s) of {args.duration} s, builds in turn")
    for i, (tree, log_mode) in enumerate(runs):
        print(f"\n{tree} (access log {log_mode}):")
        keys = sorted({k for r in results[i] for k in r}, key=lambda k: (k == "req/s", k == "total", k))
        for key in keys:
            values = [r.get(key, 0.0) for r in results[i]]
            figures = ", ".join(f"{v:,.0f}" if key == "req/s" else f"{v:.1f}" for v in values)
            print(f"  {key:28} {figures}")
    return 0


def per_request(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], requests: int, rps: float
) -> dict[str, float]:
    row: dict[str, float] = {}
    for name, (user, system) in after.items():
        u0, s0 = before.get(name, (0.0, 0.0))
        row[f"{name} user"] = (user - u0) / requests * 1e6
        row[f"{name} system"] = (system - s0) / requests * 1e6
    row["total"] = sum(row.values())
    row["req/s"] = rps
    return row


def py_spy(pid: int, out: Path, duration: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    # Blocking sampling (the only kind that sees native frames): each sample stops the process
    # for a moment, so the run it records is slower and its CPU figure is not quoted, only shares.
    cmd = [exe, "record", "--native", "--threads", "--gil", "--rate", "250", "--format", "raw",
           "--duration", str(duration), "--pid", str(pid), "--output", str(out)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def strace(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Counts of every system call of every thread (``strace`` slows the gateway a lot: only counts are read)."""
    return subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def print_syscalls(path: Path, requests: int) -> None:
    print(f"system calls per request ({requests:,} requests, strace -c -f):")
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
            print(f"  {fields[-1]:16} {int(fields[3]) / requests:6.2f}")


def perf(pid: int, out: Path, duration: int) -> subprocess.Popen[bytes]:
    """``perf record`` with call graphs (native frames and the kernel's; Python 3.11's frames show
    as the interpreter's own functions: 3.12's ``-X perf`` would name them)."""
    cmd = ["perf", "record", "-F", "999", "-g", "-p", str(pid), "-o", str(out), "--", "sleep", str(duration)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --- reading the samples -----------------------------------------------------------------

# perf's leaf frame (where the CPU was), by shared object and symbol. Python 3.11's frames are the
# interpreter's own functions to perf, and without frame pointers the chains above a leaf in
# libpython are not reliable: only the leaf is read. The collector is told by its functions.
_GC = re.compile(
    r"^(gc_collect_main|gc_collect_|visit_|subtract_refs|update_refs|move_unreachable|"
    r"deduce_unreachable|move_legacy|handle_legacy|finalize_garbage|delete_garbage|\w*_?traverse)"
)
_DSO_PARTS = (
    ("kernel", "kernel: syscalls, TCP on loopback, scheduling"),
    ("parser.cpython", "httptools: llhttp and its callbacks' glue"),
    ("url_parser.cpython", "httptools: llhttp and its callbacks' glue"),
    ("loop.cpython", "uvloop / libuv"),
    ("orjson", "orjson"),
    ("libc.so", "libc (memcpy, malloc, locks)"),
    ("vdso", "libc (memcpy, malloc, locks)"),
    ("libpython", "CPython: the interpreter running the gateway's Python"),
)


def fold_perf(path: Path, pid: int | None = None) -> tuple[Counter[str], Counter[str]]:
    """Samples of a ``perf record`` file by part (the leaf's object) and by thread."""
    out = subprocess.run(["perf", "script", "-i", str(path), "-F", "pid,tid,ip,sym,dso"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    parts: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for block in out.split("\n\n"):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if len(lines) < 2:
            continue
        ids = lines[0].split()
        main = ids[0].split("/")[0] == ids[-1].split("/")[-1] if "/" in ids[0] else len(set(ids)) == 1
        threads["loop thread" if main else "other threads (the access log's writer)"] += 1
        leaf = lines[1].split(None, 1)[1] if len(lines[1].split(None, 1)) > 1 else ""
        sym, _, dso = leaf.rpartition(" (")
        if "libpython" in dso and _GC.match(sym):
            parts["CPython: the cyclic garbage collector"] += 1
            continue
        if "libpython" in dso and re.match(
            r"^(_PyObject_Malloc|_PyObject_Free|PyObject_Free|PyObject_Malloc|"
            r"\w*dealloc|_Py_Dealloc|PyObject_GC_Del|_PyObject_GC_New|tuple_alloc|"
            r"PyObject_GC_UnTrack|_PyObject_GC_Link|_PyObject_GC_NewVar|_Py_NewReference|"
            r"PyList_New|PyTuple_New|_PyFrame_Clear)",
            sym,
        ):
            parts["CPython: allocating and freeing objects"] += 1
            continue
        for key, part in _DSO_PARTS:
            if key in dso:
                parts[part] += 1
                break
        else:
            parts[f"other ({Path(dso.rstrip(')')).name})"] += 1
    return parts, threads


# py-spy's samples are wall-clock ones: a sample of a thread that is runnable but off the CPU (the
# upstream nginx shares the core) lands where it stopped, often in a write. With --gil only the
# thread holding the GIL is kept; the gateway's Python parts are read from those, by the innermost
# frame of the gateway's own code (or of the libraries it calls straight into).
_FILE_PARTS = (
    ("gateway/dataplane/server.py", "client side: server.py (Request, ClientConnection, heads)"),
    ("gateway/dataplane/relay.py", "relay: relay.py"),
    ("gateway/dataplane/pool.py", "pool: pool.py (upstream connections)"),
    ("gateway/dataplane/upstream.py", "relay: upstream heads (upstream.py, failover.py)"),
    ("gateway/dataplane/failover.py", "relay: upstream heads (upstream.py, failover.py)"),
    ("gateway/dataplane/timers.py", "relay: the timer wheel"),
    ("gateway/dataplane/health.py", "relay: passive health"),
    ("gateway/proxy/record.py", "record: record.py (tallies, the log's tuple)"),
    ("gateway/metrics.py", "record: metrics.py"),
    ("gateway/accesslog.py", "access log (writer thread and hand-over)"),
    ("gateway/proxy/logline.py", "access log (writer thread and hand-over)"),
    ("gateway/proxy/", "request path glue: path.py, exchange.py, replies.py"),
    ("gateway/policy/", "decision: resolve, geo, canonical, decide"),
    ("gateway/geo", "decision: resolve, geo, canonical, decide"),
    ("gateway/clientip.py", "decision: resolve, geo, canonical, decide"),
    ("gateway/forwarded.py", "decision: resolve, geo, canonical, decide"),
    ("gateway/trust.py", "decision: resolve, geo, canonical, decide"),
    ("gateway/requestpath.py", "decision: resolve, geo, canonical, decide"),
    ("gateway/modelfield.py", "decision: resolve, geo, canonical, decide"),
    ("gateway/cidrs.py", "decision: resolve, geo, canonical, decide"),
    ("gateway/requestid.py", "request path glue: path.py, exchange.py, replies.py"),
    ("gateway/live/", "background: the policy file watcher"),
    ("gateway/server.py", "event loop (uvloop) and the rest"),
    ("gateway/", "other gateway modules"),
)


def fold_spy(path: Path) -> Counter[str]:
    parts: Counter[str] = Counter()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            parts["other threads"] += int(count)
            continue
        parts[classify(frames)] += int(count)
    return parts


def classify(frames: list[str]) -> str:
    leaf = frames[-1]
    if any(g in f for f in frames[-6:] for g in ("gc_collect", "collect_main", "collect_with_callback")):
        return "the cyclic garbage collector"
    if re.match(r"^(write|read|__libc_write|__libc_read|epoll_pwait|writev|send|recv)\b", leaf):
        return "in a syscall (kernel)"
    for frame in reversed(frames):
        if "(llhttp" in frame or "llhttp__" in frame:
            # llhttp's own frames below the gateway's callbacks: the parser itself.
            return "httptools: llhttp"
        for key, part in _FILE_PARTS:
            if f"({key}" in frame:
                return part
    return "event loop (uvloop) and the rest"


def print_fold(path: Path) -> None:
    if path.suffix == ".data":
        parts, threads = fold_perf(path)
    else:
        parts, threads = fold_spy(path), Counter()
    all_samples = sum(parts.values()) or 1
    print(f"{path}: {all_samples} samples\n\n| part | share of samples |\n|---|---:|")
    for part, n in parts.most_common():
        print(f"| {part} | {n / all_samples:.1%} |")
    if threads:
        print("\nby thread:", ", ".join(f"{t}: {n / all_samples:.1%}" for t, n in threads.most_common()))


if __name__ == "__main__":
    sys.exit(main())
