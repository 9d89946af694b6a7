#!/usr/bin/env python3
"""``python bench/calls.py``: the calls the gateway makes per request, counted, not timed.

``bench/run.py`` measures time, and on a shared 2-core machine two runs of the same build can
differ by 10% or more. This counts instead: the real ``Listener`` and ``Gateway`` serve in this
process, on uvloop, in front of a minimal keep-alive upstream on another thread; one client sends
``--requests`` POSTs over one connection, cycling through ``bench/run.py``'s four addresses (one
refused in four), and cProfile, enabled on the gateway's loop thread only, counts every call
in between: the gateway's Python functions, the libraries' and the built-ins they call. The
gateway's own functions are counted the same on every run of the same code (a library call or
two may vary, such as a lock released when the access log's writer thread is woken, about one
call in ten thousand), so two builds compare function by function: ``--against DIR`` runs the
same count on another checkout (for example a ``git worktree`` of main) and lists the functions
whose calls per request differ.

A call count is not a cost (what a C extension does inside one call is not seen, and a cheap
call counts as much as a dear one): it tells what changed, ``bench/run.py`` how much it weighs.

    python bench/calls.py                      # bench/policy.yaml, 2,000 requests
    python bench/calls.py --policy route       # bench/policy-route.yaml: every body read and renamed
    python bench/calls.py --policy tokens      # bench/policy-tokens.yaml: a token budget (in memory) per request
    python bench/calls.py --against ../old     # this checkout against another, function by function
    python bench/calls.py --record-usage budgeted   # unbudgeted answers not read for their usage
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import pstats
import re
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
GEOIP_DIR = REPO_DIR / "tests" / "fixtures" / "geoip"
DATABASES = ("GeoIP2-City-Test.mmdb", "GeoLite2-ASN-Test.mmdb", "GeoIP2-Anonymous-IP-Test.mmdb")
POLICIES = {
    "plain": BENCH_DIR / "policy.yaml",
    "route": BENCH_DIR / "policy-route.yaml",
    "tokens": BENCH_DIR / "policy-tokens.yaml",  # in memory here (no --redis): the request path's own work
}
ROTATION = (b"2.125.160.216", b"89.160.20.112", b"216.160.83.56", b"175.16.199.1")  # bench/common.py's
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
# With its usage, as a provider sends it: a token-budgeted request is settled on it (a plain one never reads it).
ANSWER = b'{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}'
GUARD = 30.0  # seconds before a wait that should have ended is an error (a hang guard)
WARM_UP = 200  # requests before counting: first-use caches (geo, pools) are not per-request work


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    counts = count(args.tree, args.policy, args.requests, args.record_usage)
    if args.dump:  # --against's child: the counts, for the parent to read
        for name, calls in counts.items():
            print(f"{calls} {name}")
        return 0
    usage = f", --record-usage {args.record_usage}" if args.record_usage else ""
    print(f"{args.tree}: {total(counts):.1f} calls per request ({args.policy}{usage}, {args.requests:,} requests)")
    if args.against is not None:
        # The other checkout runs in a process of its own, so that its `gateway` is the one imported.
        out = subprocess.run(
            [sys.executable, __file__, "--policy", args.policy, "--requests", str(args.requests), "--dump",
             "--tree", str(args.against.resolve())],
            capture_output=True,
            text=True,
            check=True,
        )  # fmt: skip
        other: dict[str, float] = {}
        for line in out.stdout.splitlines():
            figure, _, name = line.partition(" ")
            other[name] = float(figure)
        print(f"{args.against}: {total(other):.1f} calls per request")
        print(f"\nper request, {args.against} -> {args.tree} (functions whose count differs):")
        for name in sorted(set(counts) | set(other), key=lambda n: (-abs(counts.get(n, 0) - other.get(n, 0)), n)):
            change = counts.get(name, 0.0) - other.get(name, 0.0)
            if abs(change) >= 0.005:
                print(f"  {change:+7.2f}  {other.get(name, 0.0):7.2f} -> {counts.get(name, 0.0):7.2f}  {name}")
    else:
        print("\nthe most called, per request:")
        for name, calls in sorted(counts.items(), key=lambda item: -item[1])[: args.top]:
            print(f"  {calls:7.2f}  {name}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`: "))
    p.add_argument(
        "--policy",
        choices=sorted(POLICIES),
        default="plain",
        help="bench/policy.yaml, policy-route.yaml or policy-tokens.yaml",
    )
    p.add_argument("--requests", type=int, default=2000, help="requests counted (after a warm-up of 200)")
    p.add_argument("--top", type=int, default=25, help="functions listed")
    p.add_argument(
        "--record-usage",
        choices=("all", "budgeted"),
        help="the serve option, for this checkout only (a checkout older than it runs with its own default)",
    )
    p.add_argument("--against", type=Path, help="another checkout to compare with, function by function")
    p.add_argument("--dump", action="store_true", help=argparse.SUPPRESS)  # --against's child
    p.add_argument("--tree", type=Path, default=REPO_DIR, help=argparse.SUPPRESS)  # whose gateway package
    return p


def total(counts: dict[str, float]) -> float:
    return sum(counts.values())


def count(tree: Path, policy: str, requests: int, record_usage: str | None = None) -> dict[str, float]:
    """Calls per request on the gateway's loop thread, by ``module:function``."""
    profile = cProfile.Profile()
    started, done = threading.Event(), threading.Event()

    listeners: list[Any] = []

    def start() -> None:
        for listener in listeners:
            quiet(listener)
        profile.enable()  # cProfile counts on the thread that enables it: the gateway's loop
        started.set()

    def stop() -> None:
        profile.disable()
        done.set()

    with (
        upstream() as base,
        gateway(tree, POLICIES[policy], base, listeners, record_usage) as (port, loop),
        socket.create_connection(("127.0.0.1", port), timeout=GUARD) as client,
    ):
        for i in range(WARM_UP):
            exchange(client, i)
        loop.call_soon_threadsafe(start)
        if not started.wait(GUARD):  # the first counted request must not reach the loop before this
            raise RuntimeError("the gateway's loop did not start the profiler")
        for i in range(requests):
            exchange(client, i)
        loop.call_soon_threadsafe(stop)
        if not done.wait(GUARD):
            raise RuntimeError("the gateway's loop did not stop the profiler")
    counts: dict[str, float] = {}
    for (filename, _, function), stat in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        where = filename.partition("/gateway/")[2] or Path(filename).name
        # A built-in's name carries its address ("<built-in method __new__ of type object at 0x...>").
        function = re.sub(r" at 0x[0-9a-f]+", "", function)
        name = f"{'gateway/' + where if '/gateway/' in filename else where}:{function}"
        counts[name] = counts.get(name, 0.0) + stat[1] / requests
    return counts


def exchange(client: socket.socket, i: int) -> None:
    """One POST and its whole answer (the gateway's refusal or the upstream's 200)."""
    client.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"X-Forwarded-For: %s\r\nContent-Length: %d\r\n\r\n%s" % (ROTATION[i % len(ROTATION)], len(BODY), BODY)
    )
    data = b""
    while True:
        chunk = client.recv(65536)
        if not chunk:
            raise RuntimeError("the gateway closed the connection")
        data += chunk
        end = data.find(b"\r\n\r\n")
        if end < 0:
            continue
        length = content_length(data[:end])
        if length is None:  # chunked (a tapped answer): its last chunk ends it (the bodies here have no trailers)
            if data.endswith(b"\r\n0\r\n\r\n"):
                return
        elif len(data) >= end + 4 + length:
            return


def content_length(head: bytes) -> int | None:
    """The answer's content-length; None when it is chunked."""
    chunked = False
    for line in head.lower().split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name == b"content-length":
            return int(value)
        chunked = chunked or (name == b"transfer-encoding" and value.strip() == b"chunked")
    if chunked:
        return None
    raise RuntimeError(f"an answer without content-length: {head!r}")


@contextlib.contextmanager
def upstream() -> Iterator[str]:
    """A keep-alive upstream answering every request with a small completion, on a thread of its own."""
    listening = socket.create_server(("127.0.0.1", 0))
    loop = asyncio.new_event_loop()
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(ANSWER),
        ANSWER,
    )

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(content_length(head[:-4]) or 0)
                writer.write(answer)
        writer.close()

    server = loop.run_until_complete(asyncio.start_server(serve, sock=listening))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listening.getsockname()[1]}"
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(GUARD)


def quiet(listener: Any) -> None:
    """Stop the listener's once-a-second sweep (idle connections, header timeouts) for the counted window.

    The sweep is driven by the clock, not by requests: a window that spans a second boundary on a
    loaded machine counted its calls once more than a faster one (1/40 of a call per request in
    tests/project/test_bench_calls.py's 40 requests), so the same code gave two counts.
    """
    sweeper = getattr(listener, "_sweeper", None)
    if sweeper is not None:
        sweeper.cancel()


@contextlib.contextmanager
def gateway(
    tree: Path, policy: Path, base: str, listeners: list[Any] | None = None, record_usage: str | None = None
) -> Iterator[tuple[int, asyncio.AbstractEventLoop]]:
    """The proxy port of the checkout ``tree`` (its ``gateway`` package), serving in this process.

    The policy and databases are this checkout's, so two trees are compared on the same input.
    The wiring is the one ``gateway.server`` and ``tests/support/wire.py`` do (Gateway, Listener,
    shutdown), written out here from the classes every checkout since the native data plane has,
    rather than through a helper: ``--against`` must also run checkouts older than any helper.
    """
    sys.path.insert(0, str(tree))
    import uvloop
    from prometheus_client import CollectorRegistry

    from gateway.dataplane.limits import Limits
    from gateway.dataplane.server import Listener
    from gateway.metrics import Metrics
    from gateway.proxy import Gateway
    from gateway.runtime import Settings, load_runtime
    from gateway.server import bind

    with tempfile.TemporaryDirectory() as tmp:
        written = Path(tmp) / policy.name
        written.write_text(policy.read_text(encoding="utf-8").replace("@UPSTREAM@", base), encoding="utf-8")
        settings = Settings(
            policy=str(written),
            geoip=tuple(str(GEOIP_DIR / name) for name in DATABASES),
            upstream=base,
            trusted_proxy=("127.0.0.1/32",),
            access_log=str(Path(tmp) / "access.log"),  # to a file, as bench/run.py's gateway
            watch=False,
            **({"record_usage": record_usage} if record_usage else {}),  # (a checkout older than it has none)
        )
        runtime = load_runtime(settings)
        limits = Limits()
        sock = bind("127.0.0.1", 0)
        loop = uvloop.new_event_loop()
        ready = threading.Event()
        stop = asyncio.Event()

        async def serve() -> None:
            metrics = Metrics(CollectorRegistry())
            proxy = Gateway(runtime, metrics, limits)
            proxy.open(64)
            listener = Listener(proxy.handle, limits, 256, metrics.bad_request)
            await listener.start(sock)
            if listeners is not None:
                listeners.append(listener)
            ready.set()
            await stop.wait()
            await listener.shutdown()
            proxy.close()
            runtime.access_log.close()

        thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
        thread.start()
        if not ready.wait(GUARD):
            raise RuntimeError("the in-process gateway did not start")
        try:
            yield sock.getsockname()[1], loop
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(GUARD)
            sock.close()


if __name__ == "__main__":
    sys.exit(main())
