#!/usr/bin/env python3
"""``python bench/memory.py``: the gateway's memory per idle keep-alive connection and per held stream.

Measured, not timed, with ``tracemalloc`` in the gateway's own process: the real ``Listener`` and
``Gateway`` serve in this process on uvloop (wired as :func:`bench.calls.gateway` does), while the
clients and the upstream run in child processes, so that every byte traced is the gateway's. Two
figures, each the slope between two counts of connections (``--small`` and ``--large``) after a
warm-up round, so that what is made once (a pool, a cache, a dict grown past a size) is not divided
into the figure:

* **idle keep-alive**: a client that sent one request, read its whole answer and keeps the
  connection open (the gateway holds a ``ClientConnection``, its parser and transport, and the
  pooled upstream connection of that request, shared by all);
* **held stream**: a client whose event stream is open, the upstream having sent its head and one
  event and holding the rest (the gateway holds both connections, the ``Request``, the ``Relay``
  and the request's record until the stream ends).

uvloop's transports and libuv handles are allocated through Python's allocator, so they are
traced; what the kernel holds (socket buffers) is not, and neither is the interpreter's own
freelist reuse. nginx's figure for an idle connection, for scale: about 0.5 KiB.

    python bench/memory.py                    # this checkout
    python bench/memory.py --against ../old   # and another one (for example a git worktree of main)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
POLICY = BENCH_DIR / "policy.yaml"
ALLOWED = b"2.125.160.216"  # GB: allowed by bench/policy.yaml
GUARD = 30.0  # seconds before a wait that should have ended is an error (a hang guard)
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"stream":true}'
SETTLE = 1.2  # seconds before a snapshot: the last turn's work is done, and the proxy port's sweep (once a second) ran


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.role == "upstream":
        asyncio.run(serve_upstream())
        return 0
    if args.role == "clients":
        return hold_clients(args.port, args.kind, args.count)
    figures = measure(args.tree, args.small, args.large, args.top)
    if args.dump:
        print(f"{figures['idle']} {figures['stream']}")
        return 0
    report(str(args.tree), figures)
    if args.against is not None:
        out = subprocess.run(
            [sys.executable, __file__, "--dump", "--small", str(args.small), "--large", str(args.large),
             "--tree", str(args.against.resolve())],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        idle, stream = (float(f) for f in out.stdout.split())
        report(str(args.against), {"idle": idle, "stream": stream})
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`: "))
    p.add_argument("--small", type=int, default=20, help="connections in the first count")
    p.add_argument("--large", type=int, default=60, help="connections in the second (at most 60: the pool's bound)")
    p.add_argument("--top", type=int, default=0, help="list the N source lines that grew most (large round)")
    p.add_argument("--against", type=Path, help="another checkout to measure the same way")
    p.add_argument("--dump", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", type=Path, default=REPO_DIR, help=argparse.SUPPRESS)
    p.add_argument("--role", choices=("upstream", "clients"), help=argparse.SUPPRESS)  # the child processes
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--kind", choices=("idle", "stream"), help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    return p


def report(tree: str, figures: dict[str, float]) -> None:
    print(f"{tree}:")
    print(f"  {figures['idle'] / 1024:6.2f} KiB per idle keep-alive client connection")
    print(f"  {figures['stream'] / 1024:6.2f} KiB per held stream")


def measure(tree: Path, small: int, large: int, top: int = 0) -> dict[str, float]:
    """Bytes per connection of each kind: the traced growth's slope between ``small`` and ``large``."""
    sys.path.insert(0, str(BENCH_DIR.parent))
    from bench.calls import gateway

    upstream = subprocess.Popen(
        [sys.executable, __file__, "--role", "upstream"], stdout=subprocess.PIPE, text=True
    )  # fmt: skip
    try:
        assert upstream.stdout is not None
        base = upstream.stdout.readline().strip()
        tracemalloc.start(8 if top else 1)
        figures = {}
        with gateway(tree, POLICY, base) as (port, _):
            for kind in ("idle", "stream"):
                grown(port, kind, small)  # a warm-up: what is made once (pools, caches) is made here
                growth = [grown(port, kind, small), grown(port, kind, large, top)]
                figures[kind] = (growth[1] - growth[0]) / (large - small)
        tracemalloc.stop()
        return figures
    finally:
        upstream.kill()
        upstream.wait()


def grown(port: int, kind: str, count: int, top: int = 0) -> int:
    """Traced bytes while ``count`` clients of ``kind`` are held open, over the figure before them."""
    settle()
    before = tracemalloc.get_traced_memory()[0]
    first = tracemalloc.take_snapshot() if top else None
    clients = subprocess.Popen(
        [sys.executable, __file__, "--role", "clients", "--port", str(port), "--kind", kind, "--count", str(count)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert clients.stdout is not None and clients.stdin is not None
        if clients.stdout.readline().strip() != "held":
            raise RuntimeError("the clients did not get their answers")
        settle()
        during = tracemalloc.get_traced_memory()[0]
        if first is not None:
            print(f"{kind}, {count} connections: the lines that grew most (bytes per connection)")
            for stat in tracemalloc.take_snapshot().compare_to(first, "traceback")[:top]:
                frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(stat.traceback[-4:]))
                print(f"  {stat.size_diff / count:8.0f}  {frames}")
        clients.stdin.close()  # the clients close their sockets and leave
        clients.wait(GUARD)
    finally:
        clients.kill()
    return during - before


def settle() -> None:
    time.sleep(SETTLE)  # the gateway's thread finishes the turn the last byte started
    gc.collect()


def hold_clients(port: int, kind: str, count: int) -> int:
    """``count`` connections, each with one request answered (idle) or one event read (stream), held open."""
    sockets = []
    path = b"/v1/chat/completions" if kind == "stream" else b"/v1/models"
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=GUARD)
        s.sendall(
            b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nX-Forwarded-For: %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path, ALLOWED, len(BODY), BODY)
        )
        data = b""
        want = b"data: one\n\n" if kind == "stream" else b'"answer"'
        while want not in data:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError(f"the gateway closed the connection: {data!r}")
            data += chunk
        sockets.append(s)
    print("held", flush=True)
    sys.stdin.read()
    for s in sockets:
        s.close()
    return 0


async def serve_upstream() -> None:
    """Answers /v1/models whole and /v1/chat/completions with an event stream that stays open."""
    answer = b'{"answer":true}'
    whole = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(answer),
        answer,
    )
    stream = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        b"b\r\ndata: one\n\n\r\n"
    )

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.lower().split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                if b" /v1/chat/completions " in head.split(b"\r\n", 1)[0] + b" ":
                    writer.write(stream)
                    await reader.read()  # held until the gateway lets go
                    break
                writer.write(whole)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
