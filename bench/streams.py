#!/usr/bin/env python3
"""Stream benchmarks: many concurrent SSE responses with events spaced in time.

Two parts, both plain asyncio Protocols (uvloop when it is installed), so that
neither is the bottleneck of what is measured:

* ``python bench/streams.py emit --port P``: the emitter, an upstream that
  answers every request with an event stream. ``x-events`` (count) and
  ``x-interval`` (seconds) steer it. One timer tick every 10 ms writes the
  events that are due, one ``write`` per event on a ``TCP_NODELAY`` socket, so
  each event leaves as its own TCP segment; streams are spread evenly over the
  interval, so the load is flat rather than bursty.
* ``python bench/streams.py pipe --port P --upstream-port U``: a bare byte pipe on the
  same event loop, no HTTP at all: what relaying one event costs the kernel and the
  loop alone, the floor under any proxy written this way.
* :func:`drive`: the client side, run inside ``bench/run.py`` (bench/streamruns.py): opens streams
  through the target, counts events as they arrive and reports how many were
  relayed in a measurement window and how many streams were dropped.

Standard library only (uvloop optional).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import socket
import time
from dataclasses import dataclass, field

EVENT = (
    b"data: "
    + json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": "token "}, "finish_reason": None}],
        },
        separators=(",", ":"),
    ).encode()
    + b"\n\n"
)
DONE = b"data: [DONE]\n\n"
TICK = 0.01
# A request asking for usage (stream_options.include_usage, as the gateway asks for a token-budgeted
# stream) gets OpenAI's shape: "usage":null on every chunk, then a chunk with no choices and the usage.
EVENT_NULL_USAGE = EVENT.replace(b"}]}\n\n", b'}],"usage":null}\n\n')
USAGE_EVENT = (
    b"data: "
    + json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-4o-mini",
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
        },
        separators=(",", ":"),
    ).encode()
    + b"\n\n"
)


def raise_nofile() -> int:
    """As many open files as we may have (root: plenty); every stream is a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (1 << 20, 262144, 65536, hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
            return want
    return soft


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


# --- the emitter --------------------------------------------------------------------------


class _Stream:
    __slots__ = ("conn", "interval", "left", "next_at", "usage")

    def __init__(self, conn: _EmitConnection, events: int, interval: float, first_at: float, usage: bool) -> None:
        self.conn = conn
        self.left = events
        self.interval = interval
        self.next_at = first_at
        self.usage = usage  # the request asked for usage (stream_options.include_usage)


class Emitter:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.slots: dict[int, list[_Stream]] = {}
        self.events = 0
        self.opened = 0
        self.slot = int(self.loop.time() / TICK)  # the next slot the ticker will look at

    def _schedule(self, stream: _Stream) -> None:
        self.slots.setdefault(max(int(stream.next_at / TICK), self.slot), []).append(stream)

    def add(self, stream: _Stream) -> None:
        self._schedule(stream)
        self.opened += 1

    async def run(self) -> None:
        while True:
            now = self.loop.time()
            current = int(now / TICK)
            while self.slot <= current:
                due = self.slots.pop(self.slot, None)
                self.slot += 1
                if due:
                    for stream in due:
                        self._emit(stream, now)
            await asyncio.sleep(max(0.0, (self.slot * TICK) - self.loop.time()))

    def _emit(self, stream: _Stream, now: float) -> None:
        conn = stream.conn
        if conn.transport is None or conn.transport.is_closing():
            return
        if stream.left <= 0:
            conn.transport.write((_CHUNKED_USAGE if stream.usage else b"") + _chunk(DONE) + b"0\r\n\r\n")
            conn.busy = False
            return
        conn.transport.write(_CHUNKED_EVENT_NULL_USAGE if stream.usage else _CHUNKED_EVENT)
        self.events += 1
        stream.left -= 1
        stream.next_at += stream.interval
        self._schedule(stream)


_CHUNKED_EVENT = _chunk(EVENT)
_CHUNKED_EVENT_NULL_USAGE = _chunk(EVENT_NULL_USAGE)
_CHUNKED_USAGE = _chunk(USAGE_EVENT)
_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


class _EmitConnection(asyncio.Protocol):
    def __init__(self, emitter: Emitter) -> None:
        self.emitter = emitter
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.busy and b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            if len(rest) < length:
                return
            body, self.buffer = rest[:length], rest[length:]
            events = int(headers.get(b"x-events", b"10"))
            interval = float(headers.get(b"x-interval", b"0.25"))
            assert self.transport is not None
            self.transport.write(_HEAD)
            self.busy = True
            now = self.emitter.loop.time()
            # The first event at once (the stream is known to be up), then one per interval.
            self.emitter.add(_Stream(self, events, interval, now, asks_usage(body)))


def asks_usage(body: bytes) -> bool:
    """Whether a request body has ``stream_options.include_usage: true`` (read once per stream)."""
    try:
        options = json.loads(body).get("stream_options") or {}
    except (ValueError, AttributeError):
        return False
    return isinstance(options, dict) and options.get("include_usage") is True


async def emit(host: str, port: int) -> None:
    emitter = Emitter()
    server = await emitter.loop.create_server(lambda: _EmitConnection(emitter), host, port, backlog=8192)
    print(f"emitter on {host}:{port}", flush=True)
    async with server:
        await emitter.run()


# --- the floor: a byte pipe ---------------------------------------------------------------


class _PipeUp(asyncio.Protocol):
    def __init__(self, down: _PipeDown) -> None:
        self.down = down
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.down.transport is not None:
            self.down.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.down.transport is not None:
            self.down.transport.close()


class _PipeDown(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.transport: asyncio.Transport | None = None
        self.up: _PipeUp | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: _PipeUp(self), "127.0.0.1", self.upstream_port)
        self.up = up
        for data in self.early:
            up.transport.write(data)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()


async def pipe(host: str, port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _PipeDown(upstream_port), host, port, backlog=8192)
    print(f"pipe on {host}:{port} -> {upstream_port}", flush=True)
    async with server:
        await server.serve_forever()


# --- the client side ---------------------------------------------------------------------------


@dataclass
class DriveResult:
    streams: int
    opened: int = 0
    first_event: int = 0  # streams that saw their first event
    events: int = 0
    completed: int = 0
    dropped: int = 0  # closed, or an error status, before [DONE]
    usage_seen: int = 0  # streams that got a "usage" member: none asked for one
    statuses: dict[int, int] = field(default_factory=dict)


class _ClientStream(asyncio.Protocol):
    def __init__(self, result: DriveResult, request: bytes, ready: asyncio.Future[None]) -> None:
        self.result = result
        self.request = request
        self.ready = ready
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.in_body = False
        self.tail = b""
        self.seen = 0
        self.done = False
        self.usage_seen = False
        self.usage_tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]
        self.result.opened += 1

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            self.result.statuses[status] = self.result.statuses.get(status, 0) + 1
            self.in_body = True
            if status != 200:
                self._end(dropped=True)
                return
        if not self.usage_seen and b'"usage"' in self.usage_tail + data:  # split across reads too
            self.usage_seen = True
            self.result.usage_seen += 1
        self.usage_tail = data[-6:]
        text = self.tail + data
        n = text.count(b"\n\n")
        self.tail = text[-1:]
        if n:
            if self.seen == 0:
                self.result.first_event += 1
                if not self.ready.done():
                    self.ready.set_result(None)
            self.seen += n
            self.result.events += n
        if DONE in text:
            self.result.events -= 1  # [DONE] is not a token event
            self._end(dropped=False)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self._end(dropped=True)

    def _end(self, *, dropped: bool) -> None:
        if self.done:
            return
        self.done = True
        if dropped:
            self.result.dropped += 1
        else:
            self.result.completed += 1
        if not self.ready.done():
            self.ready.set_result(None)
        if self.transport is not None:
            self.transport.close()


def stream_request(host: str, port: int, path: str, client_ip: str, events: int, interval: float) -> bytes:
    body = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"X-Forwarded-For: {client_ip}\r\nx-events: {events}\r\nx-interval: {interval}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def open_streams(
    host: str, port: int, request: bytes, count: int, result: DriveResult, batch: int = 200
) -> list[_ClientStream]:
    """Open ``count`` streams in batches (a SYN flood would only measure the backlog) and wait for their first event."""
    loop = asyncio.get_running_loop()
    streams: list[_ClientStream] = []
    for start in range(0, count, batch):
        waits = []
        for _ in range(min(batch, count - start)):
            ready: asyncio.Future[None] = loop.create_future()
            proto = _ClientStream(result, request, ready)
            try:
                await loop.create_connection(lambda p=proto: p, host, port)  # type: ignore[misc]
            except OSError:
                result.dropped += 1
                continue
            streams.append(proto)
            waits.append(ready)
        if waits:
            await asyncio.wait(waits, timeout=30)
    return streams


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


try:
    import os as _os

    _TICKS = float(_os.sysconf("SC_CLK_TCK"))
except (ValueError, OSError, AttributeError):  # pragma: no cover
    _TICKS = 100.0


@dataclass
class RelayMeasure:
    streams: int
    interval_s: float
    window_s: float
    events_in_window: int
    expected_events: float
    gateway_cpu_s: float
    cpu_us_per_event: float | None
    emitter_cpu_share: float  # of one core, during the window
    client_cpu_share: float
    dropped: int
    statuses: dict[int, int]
    usage_seen: int = 0  # streams whose client got a usage member it did not ask for


async def measure_relay(
    host: str, port: int, path: str, client_ip: str, streams: int, interval: float, window: float,
    gateway_pid: int, emitter_pid: int,
) -> RelayMeasure:  # fmt: skip
    """Target 3: gateway CPU per relayed event while ``streams`` streams each get one event per ``interval``."""
    events = int((window + 30) / interval) + 20  # outlast the ramp and the window
    result = DriveResult(streams)
    request = stream_request(host, port, path, client_ip, events, interval)
    opened = await open_streams(host, port, request, streams, result)
    await asyncio.sleep(interval * 2)  # steady state
    e0, g0, m0, c0 = result.events, cpu_seconds(gateway_pid), cpu_seconds(emitter_pid), time.process_time()
    t0 = time.monotonic()
    await asyncio.sleep(window)
    e1, g1, m1, c1 = result.events, cpu_seconds(gateway_pid), cpu_seconds(emitter_pid), time.process_time()
    elapsed = time.monotonic() - t0
    for s in opened:
        if s.transport is not None:
            s.done = True
            s.transport.close()
    relayed = e1 - e0
    return RelayMeasure(
        streams=streams,
        interval_s=interval,
        window_s=round(elapsed, 3),
        events_in_window=relayed,
        expected_events=round(streams * elapsed / interval, 1),
        gateway_cpu_s=round(g1 - g0, 3),
        cpu_us_per_event=round((g1 - g0) / relayed * 1e6, 2) if relayed else None,
        emitter_cpu_share=round((m1 - m0) / elapsed, 3),
        client_cpu_share=round((c1 - c0) / elapsed, 3),
        dropped=result.dropped,
        statuses=result.statuses,
        usage_seen=result.usage_seen,
    )


@dataclass
class HeldMeasure:
    streams: int
    opened: int
    with_first_event: int
    dropped: int
    rss_before_kib: int
    rss_after_kib: int
    kib_per_stream: float | None
    statuses: dict[int, int]
    usage_seen: int = 0


async def measure_held(host: str, port: int, path: str, client_ip: str, streams: int, gateway_pid: int) -> HeldMeasure:
    """Target 4: RSS per held stream (one event at open, then idle), none dropped."""
    result = DriveResult(streams)
    warm = DriveResult(50)
    warm_req = stream_request(host, port, path, client_ip, 1, 0.01)
    await open_streams(host, port, warm_req, 50, warm)  # allocator and pools warmed, then closed
    await asyncio.sleep(1.0)
    before = rss_kib(gateway_pid)
    request = stream_request(host, port, path, client_ip, 2, 600.0)  # one event now, the next far away
    opened = await open_streams(host, port, request, streams, result, batch=500)
    await asyncio.sleep(2.0)
    after = rss_kib(gateway_pid)
    held = sum(1 for s in opened if not s.done and s.seen >= 1)
    for s in opened:
        s.done = True
        if s.transport is not None:
            s.transport.close()
    return HeldMeasure(
        streams=streams,
        opened=result.opened,
        with_first_event=result.first_event,
        dropped=streams - held,
        rss_before_kib=before,
        rss_after_kib=after,
        kib_per_stream=round((after - before) / held, 2) if held else None,
        statuses=result.statuses,
        usage_seen=result.usage_seen,
    )


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main() -> None:
    p = argparse.ArgumentParser(description="SSE emitter for the stream benchmarks")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("emit")
    e.add_argument("--host", default="127.0.0.1")
    e.add_argument("--port", type=int, required=True)
    f = sub.add_parser("pipe")
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--upstream-port", type=int, required=True)
    args = p.parse_args()
    raise_nofile()
    _use_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        if args.command == "emit":
            asyncio.run(emit(args.host, args.port))
        else:
            asyncio.run(pipe(args.host, args.port, args.upstream_port))


if __name__ == "__main__":
    main()
