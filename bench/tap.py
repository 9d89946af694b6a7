#!/usr/bin/env python3
"""``python bench/tap.py``: CPU per relayed event-stream event, through the usage tap and without it.

The data plane's own Listener and Relay serve on uvloop in this process's main thread; an upstream
and a client run in another thread, in lockstep: the upstream writes one OpenAI-shaped chunk (one
SSE event, as a model streams a token) and the client reads it through the gateway before the next
is written, so every event is its own read at the relay, as in production. The CPU time of the
gateway's thread alone (``time.thread_time``) over ``--events`` events, divided by their number,
is the figure: deterministic enough to compare on a busy machine (it is not wall time), though
not a latency. Three modes, in one run:

* ``plain``: no tap (the zero-copy relay: what a request without a token limit costs);
* ``tap``: a :class:`~gateway.usage.tap.UsageTap` reading a stream whose client asked for usage
  (every chunk carries ``"usage":null``; the final chunk is read);
* ``tap+strip``: the same stream, for a client that did not ask: the tap takes the null members
  and the usage-only chunk out.

``--tap-only`` measures the tap alone (``feed`` per event, no sockets) as well.

    python bench/tap.py                   # 5,000 events per mode
    python bench/tap.py --events 500      # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import uvloop

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.dataplane.limits import Limits
from gateway.dataplane.pool import Pool
from gateway.dataplane.relay import BodyTap, Relay
from gateway.dataplane.server import Listener, Request
from gateway.policy import UpstreamSpec
from gateway.proxy.upstreams import build_upstreams
from gateway.server import bind
from gateway.usage.tap import UsageTap

MODES = ("plain", "tap", "tap+strip")
GUARD = 60.0  # seconds: a run that should have ended is an error (a hang guard)


def outcome() -> SimpleNamespace:
    """What a relay writes down about its request (:class:`gateway.dataplane.relay.RelayRecord`)."""
    none = dict.fromkeys(("error", "ttfb", "target", "failovers", "refused"))
    return SimpleNamespace(attempted=False, client_gone=False, status=0, sent=0, attempts=0, **none)


def events(count: int, usage_null: bool) -> list[bytes]:
    """``count`` chunks as OpenAI streams them (compact JSON; ``"usage":null`` when usage was asked)."""
    out = []
    for i in range(count):
        chunk = {
            "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
            "object": "chat.completion.chunk",
            "created": 1741569952,
            "model": "gpt-4o-2024-08-06",
            "system_fingerprint": "fp_eb9dce56a8",
            "choices": [{"index": 0, "delta": {"content": f" w{i % 97}"}, "logprobs": None, "finish_reason": None}],
        }
        if usage_null:
            chunk["usage"] = None
        out.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    if usage_null:
        last = {"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 9}}
        out.append(b"data: " + json.dumps(last, separators=(",", ":")).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def drive(upstream: socket.socket, gateway_port: int, stream: list[bytes]) -> None:
    """The client and the upstream, in lockstep: each event written once the last came through."""
    client = socket.create_connection(("127.0.0.1", gateway_port))
    client.sendall(b"GET /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\r\n")
    conn, _ = upstream.accept()
    request = b""
    while b"\r\n\r\n" not in request:
        request += conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    received = b""
    for event in stream[:-2]:
        conn.sendall(b"%x\r\n%b\r\n" % (len(event), event))
        while not received.endswith(b"\n\n\r\n"):  # the event, chunk-framed by the gateway
            received = client.recv(65536)
    for event in stream[-2:]:  # the usage chunk (maybe stripped: nothing comes) and [DONE]
        conn.sendall(b"%x\r\n%b\r\n" % (len(event), event))
    conn.sendall(b"0\r\n\r\n")
    while not received.endswith(b"0\r\n\r\n"):
        received = client.recv(65536)
    client.close()
    conn.close()


async def relay_cpu(mode: str, count: int) -> float:
    """Gateway-thread CPU seconds per event for one mode."""
    upstream = socket.create_server(("127.0.0.1", 0))
    spec = UpstreamSpec(url=f"http://127.0.0.1:{upstream.getsockname()[1]}")
    pool = Pool(build_upstreams({"default": spec}, {})["default"].members[0], Limits(), 8)
    policy = (b"x-regiongate-policy", b"bench")

    def handle(request: Request) -> None:
        tap: BodyTap | None = None if mode == "plain" else UsageTap("chat", mode == "tap+strip", "gpt-4o")
        Relay(request, pool, b"/v1/chat/completions", [], b"rid", policy, outcome(), lambda: None, tap=tap).start()

    listener = Listener(handle, Limits(grace=1.0), 64, lambda reason: None)
    sock = bind("127.0.0.1", 0)
    await listener.start(sock)
    stream = events(count, usage_null=mode != "plain")
    try:
        start = time.thread_time()
        await asyncio.wait_for(asyncio.to_thread(drive, upstream, sock.getsockname()[1], stream), GUARD)
        spent = time.thread_time() - start
    finally:
        await listener.shutdown()
        upstream.close()
    return spent / count


def tap_only(count: int) -> dict[str, float]:
    """The tap's own CPU per event (``feed``, whole events), no sockets."""
    out = {}
    for mode in MODES[1:]:
        stream = events(count, usage_null=True)
        tap = UsageTap("chat", mode == "tap+strip", "gpt-4o")
        start = time.process_time()
        for event in stream:
            tap.feed(event)
        tap.end()
        out[mode] = (time.process_time() - start) / len(stream)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`: "))
    p.add_argument("--events", type=int, default=5000, help="events per mode (default: 5000)")
    p.add_argument("--tap-only", action="store_true", help="also time the tap alone, without sockets")
    args = p.parse_args(argv)
    figures = {}
    for mode in MODES:
        figures[mode] = uvloop.run(relay_cpu(mode, args.events))
    plain = figures["plain"]
    print(f"gateway-thread CPU per relayed event ({args.events:,} events, one per read):")
    for mode, seconds in figures.items():
        print(f"  {mode:10} {seconds * 1e6:7.2f} us   {seconds / plain:5.2f}x plain")
    if args.tap_only:
        print("the tap alone (feed per event, no sockets):")
        for mode, seconds in tap_only(args.events).items():
            print(f"  {mode:10} {seconds * 1e6:7.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
