"""Holding a request body to look at it, then answering or relaying it, on real sockets.

The data plane's own Listener (on uvloop, as in production) serves a tiny
handler that holds the body and then either answers with what it got or,
when the hold gave up, starts a real Relay to a real upstream
(the ``raw_upstream`` fixture, which records every byte it receives). What
the upstream decodes must be exactly what the client sent, whatever the
framing, the size against the limit, and ``Expect: 100-continue``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httptools
import pytest
import uvloop

from gateway.dataplane.bodyhold import _Hold, hold
from gateway.dataplane.failover import Failover
from gateway.dataplane.limits import Limits
from gateway.dataplane.pool import Pool
from gateway.dataplane.relay import Relay
from gateway.dataplane.server import Listener, Request
from gateway.dataplane.upstream import Upstream
from gateway.policy import UpstreamSpec
from gateway.proxy.upstreams import build_upstreams
from gateway.server import bind
from support.processes import RawUpstream, parse_requests

LIMIT = 200_000  # above one socket read, so a held body arrives in several
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
NEXT = b"GET /v1/next HTTP/1.1\r\nhost: x\r\n\r\n"
GUARD = 20.0  # seconds before a wait that should have ended is a failure (a hang guard, not a timing claim)


# --- the server side: a Listener whose handler holds the body --------------------------------


@dataclass
class Seen:
    """What the handler saw of each request, in order."""

    done: list[bytes | None] = field(default_factory=list)
    continue_sent_at_done: list[bool] = field(default_factory=list)
    reading_paused_at_done: list[bool] = field(default_factory=list)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    requests: int = 0


class _Outcome:
    attempted = False
    client_gone = False
    status = 0
    sent = 0
    error: str | None = None
    ttfb: float | None = None
    target: Upstream | None = None
    failovers: list[Failover] | None = None
    refused: str | None = None
    attempts = 0


def relay(request: Request, pool: Pool) -> None:
    """A plain streamed relay (the proxy's forward step without the policy around it; it frames the body)."""
    Relay(request, pool, b"/v1/held", [], b"rid", (b"x-regiongate-policy", b"test"), _Outcome(), lambda: None).start()


Then = Callable[[Request, bytes | None], None]


def echo(request: Request, body: bytes | None) -> None:
    """Answer with what was held; 413 when the hold gave up."""
    if body is None:
        request.respond(413, [], b"")
    else:
        request.respond(200, [(b"content-type", b"application/octet-stream")], body)


def holder(seen: Seen, then: Then, limit: int = LIMIT) -> Callable[[Request], None]:
    def handle(request: Request) -> None:
        seen.requests += 1
        request.on_gone = seen.gone.set

        def done(body: bytes | None) -> None:
            seen.done.append(body)
            seen.continue_sent_at_done.append(request.continue_sent)
            transport = request._conn.transport
            seen.reading_paused_at_done.append(transport is not None and not transport.is_reading())
            then(request, body)

        hold(request, limit, done)

    return handle


@contextlib.asynccontextmanager
async def listening(
    handler: Callable[[Request], None], limits: Limits | None = None
) -> AsyncIterator[tuple[Listener, int]]:
    listener = Listener(handler, limits or Limits(grace=1.0), 64, lambda reason: None)
    sock = bind("127.0.0.1", 0)
    await listener.start(sock)
    try:
        yield listener, sock.getsockname()[1]
    finally:
        await listener.shutdown()


@contextlib.asynccontextmanager
async def serving(handler: Callable[[Request], None], limits: Limits | None = None) -> AsyncIterator[int]:
    async with listening(handler, limits) as (_, port):
        yield port


def upstream_pool(up: RawUpstream, limits: Limits) -> Pool:
    upstream = build_upstreams({"default": UpstreamSpec(url=up.url)}, {})["default"].members[0]
    return Pool(upstream, limits, 8)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(scenario(), GUARD * 2))


# --- the client side: real sockets, bodies framed both ways -----------------------------------


def request_head(size: int, *, chunked: bool, expect: bool) -> bytes:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    head += b"transfer-encoding: chunked\r\n" if chunked else b"content-length: %d\r\n" % size
    if expect:
        head += b"expect: 100-continue\r\n"
    return head + b"\r\n"


def frame(body: bytes, *, chunked: bool, seed: int = 1) -> list[bytes]:
    """The body as the client writes it: random pieces, each a chunk when chunked, then the terminator."""
    r = random.Random(seed)
    pieces, i = [], 0
    while i < len(body):
        n = r.randint(1, 70_000)
        pieces.append(body[i : i + n])
        i += n
    if not chunked:
        return pieces
    return [b"%x\r\n%b\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


class Responses:
    """Responses parsed off a client socket with llhttp, 1xx included."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.parser = httptools.HttpResponseParser(self)
        self.statuses: list[int] = []
        self.bodies: list[bytes] = []
        self.complete = 0

    def on_headers_complete(self) -> None:
        self.statuses.append(self.parser.get_status_code())
        self.bodies.append(b"")

    def on_body(self, body: bytes) -> None:
        self.bodies[-1] += body

    def on_message_complete(self) -> None:
        self.complete += 1

    async def until(self, count: int) -> None:
        """Read until ``count`` final (non-1xx) responses are complete."""
        while sum(1 for s in self.statuses[: self.complete] if s >= 200) < count:
            data = await asyncio.wait_for(self.reader.read(65536), GUARD)
            assert data, f"connection closed after {self.statuses}"
            self.parser.feed_data(data)

    def final(self) -> list[tuple[int, bytes]]:
        return [(s, b) for s, b in zip(self.statuses, self.bodies, strict=True) if s >= 200]


async def send(
    port: int, body: bytes, *, chunked: bool, expect: bool, then: bytes = b""
) -> tuple[Responses, asyncio.StreamWriter]:
    """One request (``then`` right behind its body); with ``expect`` the body waits for the 100 Continue."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_head(len(body), chunked=chunked, expect=expect))
    if expect:
        assert await asyncio.wait_for(reader.readexactly(len(CONTINUE)), GUARD) == CONTINUE
    pieces = frame(body, chunked=chunked)
    pieces[-1] += then
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
    return Responses(reader), writer


def upstream_bodies(raw: bytes) -> list[bytes]:
    """Every complete request body the upstream received on one connection, as llhttp decodes it."""
    return [sent.body for sent in parse_requests(raw)]


def live(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(int(GUARD / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


BOTH = pytest.mark.parametrize(("chunked", "expect"), [(False, False), (False, True), (True, False), (True, True)])


# --- a body within the limit is held whole -----------------------------------------------------


@BOTH
@pytest.mark.parametrize("size", [1, 70_000, LIMIT - 1, LIMIT])
def test_a_body_within_the_limit_is_held_whole(size: int, chunked: bool, expect: bool) -> None:
    body = os.urandom(size)

    async def scenario() -> None:
        seen = Seen()
        async with serving(holder(seen, echo)) as port:
            # A request right behind the body: done() runs inside the read that ends the body (with
            # expect, always), answers there, and the connection goes on to the next one.
            responses, writer = await send(port, body, chunked=chunked, expect=expect, then=NEXT)
            await responses.until(2)
            writer.close()
        assert responses.final() == [(200, body), (200, b"")]
        assert seen.done == [body, b""]
        assert 100 not in responses.statuses  # with expect, send() read the one 100 Continue: no second

    run(scenario)


def test_a_request_without_a_body_is_done_at_once_with_nothing() -> None:
    async def scenario() -> None:
        seen = Seen()
        async with serving(holder(seen, echo)) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /v1/x HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\nGET /v1/y HTTP/1.1\r\nhost: x\r\n\r\n"
            )
            responses = Responses(reader)
            await responses.until(2)
            writer.close()
        assert seen.done == [b"", b""]
        assert responses.final() == [(200, b""), (200, b"")]

    run(scenario)


# --- a body over the limit is given back and relayed byte-exact --------------------------------


@BOTH
@pytest.mark.parametrize("size", [LIMIT + 1, 5 * LIMIT])
def test_a_body_over_the_limit_reaches_the_upstream_byte_exact(
    raw_upstream: RawUpstream, size: int, chunked: bool, expect: bool
) -> None:
    body = os.urandom(size)

    async def scenario() -> None:
        seen = Seen()
        limits = Limits(grace=1.0)
        pool = upstream_pool(raw_upstream, limits)
        async with serving(holder(seen, lambda request, _: relay(request, pool)), limits) as port:
            responses, writer = await send(port, body, chunked=chunked, expect=expect, then=NEXT)
            await responses.until(2)
            writer.close()
        pool.close()
        assert responses.final() == [(200, b"{}"), (200, b"{}")]
        assert seen.done == [None, b""]
        assert upstream_bodies(raw_upstream.received[0]) == [body, b""]
        assert 100 not in responses.statuses  # with expect, send() read the one 100 Continue: no second
        if expect and not chunked:
            # Declared too large: given up on before reading, so the 100 Continue came from the relay.
            assert seen.continue_sent_at_done[0] is False

    run(scenario)


def test_a_relay_started_later_still_gets_everything_and_reading_waits_for_it(raw_upstream: RawUpstream) -> None:
    """Between give-back and relay, reading is paused (the buffer is full); the relay resumes it."""
    body = os.urandom(3 * LIMIT)

    async def scenario() -> None:
        seen = Seen()
        limits = Limits(grace=1.0)
        pool = upstream_pool(raw_upstream, limits)
        loop = asyncio.get_running_loop()
        relayed = asyncio.Event()

        def later(request: Request, _: bytes | None) -> None:
            def go() -> None:
                relayed.set()
                relay(request, pool)

            loop.call_later(0.3, go)

        async with serving(holder(seen, later), limits) as port:
            responses, writer = await send(port, body, chunked=True, expect=False)
            await responses.until(1)
            writer.close()
        pool.close()
        assert relayed.is_set()
        assert seen.reading_paused_at_done == [True]
        assert upstream_bodies(raw_upstream.received[0]) == [body]

    run(scenario)


def test_a_body_that_does_not_arrive_in_time_is_given_back(raw_upstream: RawUpstream) -> None:
    """``body_timeout``: done(None) with the prefix read; the relay then sends it and the rest."""
    body = os.urandom(50_000)

    async def scenario() -> None:
        seen = Seen()
        limits = Limits(grace=1.0, body_timeout=0.2)
        pool = upstream_pool(raw_upstream, limits)
        async with serving(holder(seen, lambda request, _: relay(request, pool)), limits) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_head(len(body), chunked=False, expect=False) + body[:20_000])
            await until(lambda: bool(raw_upstream.received) and body[:20_000] in raw_upstream.received[0])
            writer.write(body[20_000:])
            responses = Responses(reader)
            await responses.until(1)
            writer.close()
        pool.close()
        assert seen.done == [None]
        assert upstream_bodies(raw_upstream.received[0]) == [body]

    run(scenario)


@pytest.mark.parametrize("path", ["plain relay", "held, given back, relayed"])
def test_a_body_that_ends_in_the_read_that_filled_its_buffer_leaves_the_connection_reading(
    raw_upstream: RawUpstream, path: str
) -> None:
    """uvloop reads up to 256 KiB at once: reading pauses for a full body buffer in the middle of a read,
    the body ends later in that same read, and the next request must still be read.

    The one read is fed to the connection's protocol directly, so the test does not depend on how the
    kernel happens to split the bytes; the next request comes over the socket as usual.
    """
    body = os.urandom(150_000)

    async def scenario() -> None:
        limits = Limits(grace=1.0)
        pool = upstream_pool(raw_upstream, limits)
        seen = Seen()
        if path == "plain relay":
            handler: Callable[[Request], None] = lambda request: relay(request, pool)  # noqa: E731
        else:
            handler = holder(seen, lambda request, _: relay(request, pool), limit=100_000)
        async with listening(handler, limits) as (listener, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await until(lambda: len(listener.connections) == 1)
            (conn,) = listener.connections
            conn.data_received(
                request_head(len(body), chunked=True, expect=False) + b"".join(frame(body, chunked=True))
            )
            responses = Responses(reader)
            await responses.until(1)
            writer.write(NEXT)
            await responses.until(2)
            writer.close()
        pool.close()
        assert responses.final() == [(200, b"{}"), (200, b"{}")]
        assert upstream_bodies(raw_upstream.received[0]) == [body, b""]
        assert seen.done == ([] if path == "plain relay" else [None, b""])

    run(scenario)


# --- the connection goes on after a hold ---------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_pipelined_requests_after_held_and_given_back_bodies(raw_upstream: RawUpstream, chunked: bool) -> None:
    """Held, then over the limit (relayed), then held again, then over the limit but refused: in order."""
    small, big, small2, big2 = os.urandom(1000), os.urandom(LIMIT + 5000), os.urandom(10), os.urandom(LIMIT + 1)

    async def scenario() -> None:
        seen = Seen()
        limits = Limits(grace=1.0)
        pool = upstream_pool(raw_upstream, limits)

        def then(request: Request, body: bytes | None) -> None:
            if body is not None:
                echo(request, body)
            elif len(seen.done) == 2:
                relay(request, pool)
            else:
                echo(request, None)  # refused: the rest of the body is read and dropped

        async with serving(holder(seen, then), limits) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for b in (small, big, small2, big2):
                writer.write(request_head(len(b), chunked=chunked, expect=False) + b"".join(frame(b, chunked=chunked)))
            await writer.drain()
            responses = Responses(reader)
            await responses.until(4)
            writer.close()
        pool.close()
        assert responses.final() == [(200, small), (200, b"{}"), (200, small2), (413, b"")]
        assert seen.done == [small, None, small2, None]
        assert [upstream_bodies(r) for r in raw_upstream.received] == [[big]]

    run(scenario)


# --- a client that leaves -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["leaves", "malformed chunk"])
def test_a_client_that_leaves_mid_body_leaves_nothing_behind(how: str) -> None:
    async def scenario() -> None:
        seen = Seen()
        listener_limits = Limits(grace=1.0)
        async with serving(holder(seen, echo), listener_limits) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            chunked = how == "malformed chunk"
            writer.write(request_head(100_000, chunked=chunked, expect=False))
            writer.write(b"".join(frame(os.urandom(30_000), chunked=chunked)[:-1] if chunked else [os.urandom(30_000)]))
            await writer.drain()
            await until(lambda: seen.requests == 1)
            if chunked:
                writer.write(b"zz\r\n")  # not a chunk size: the server answers 400 and closes
                await writer.drain()
                answer = await asyncio.wait_for(reader.read(), GUARD)
                assert answer.startswith(b"HTTP/1.1 400 ")
            else:
                writer.close()
            await asyncio.wait_for(seen.gone.wait(), GUARD)
            writer.close()
            # The caller's on_gone was called, done never; nothing (no timer, no callback) keeps the request.
            assert seen.done == []
            await until(lambda: live(Request) == live(_Hold) == 0)

    run(scenario)
