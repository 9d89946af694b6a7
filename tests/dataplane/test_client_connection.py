"""The proxy port's client side through a fake transport, on a manual clock: no socket, no sleep.

``ClientConnection`` is driven only through what asyncio itself calls on a protocol
(``connection_made``, ``data_received``, ``pause_writing``, ``resume_writing``,
``connection_lost``) and answers through ``Request``'s public methods, as httpcore's
``AsyncMockStream`` and aiohttp's protocol tests do. The transport writes into a buffer and
records every ``pause_reading``/``resume_reading``/``close``. Time is looptime's fake loop
time: ``await asyncio.sleep(31)`` moves the loop 31 s on at once, so the listener's
once-a-second sweep closes slow and idle connections as it would in 31 s of real time.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.dataplane.limits import Limits
from gateway.dataplane.server import ClientConnection, Listener, Request
from support.raw_http import Response, parse_responses

pytestmark = pytest.mark.looptime

LIMITS = Limits(
    max_request_line=256,
    max_header_bytes=2048,
    max_headers=20,
    header_timeout=10.0,
    idle_timeout=30.0,
    body_buffer=1024,
)


class FakeTransport(asyncio.Transport):
    """Writes into ``written``; records flow control and closing in ``events``, as a socket transport would act."""

    def __init__(self, protocol: asyncio.Protocol, peer: tuple[str, int] = ("203.0.113.7", 40000)) -> None:
        super().__init__()
        self.protocol = protocol
        self.peer = peer
        self.written = bytearray()
        self.events: list[str] = []
        self.reading = True
        self.closed = False
        self.high_water: int | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water = high

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.written += data

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False
        self.events.append("pause_reading")

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.reading = True
        self.events.append("resume_reading")

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.events.append("close")
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def take(self) -> list[Response]:
        """The responses written since the last call."""
        data, self.written = bytes(self.written), bytearray()
        return parse_responses(data)


class Server:
    """A Listener whose handler keeps every request for the test to answer (or answers at once)."""

    def __init__(self, listener: Listener, answer: bool, sock: socket.socket) -> None:
        self.listener = listener
        self.answer = answer
        self.sock = sock
        self.started = False
        self.requests: list[Request] = []

    def handle(self, request: Request) -> None:
        self.requests.append(request)
        if self.answer:
            reply(request)

    async def connect(self) -> tuple[ClientConnection, FakeTransport]:
        if not self.started:  # in the test, on its fake clock: the sweep is timed from there
            self.started = True
            await self.listener.start(self.sock)
        conn = ClientConnection(self.listener)
        transport = FakeTransport(conn)
        conn.connection_made(transport)
        return conn, transport


def reply(request: Request, status: int = 200) -> None:
    body = json.dumps({"path": request.path, "body": b"".join(request.body).decode()}).encode()
    request.respond(status, [(b"content-type", b"application/json")], body)


async def server_with(answer: bool, limits: Limits = LIMITS, cap: int = 100) -> AsyncIterator[Server]:
    box: list[Server] = []
    listener = Listener(lambda r: box[0].handle(r), limits, cap, lambda reason: None)
    with socket.socket() as sock:  # listened on, never connected to: start() is for the sweep
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        server = Server(listener, answer, sock)
        box.append(server)
        yield server
        for conn in list(listener.connections):  # what a closed socket would report
            conn.connection_lost(None)
        await listener.shutdown()


@pytest.fixture
async def answering() -> AsyncIterator[Server]:
    async for s in server_with(answer=True):
        yield s


@pytest.fixture
async def holding() -> AsyncIterator[Server]:
    async for s in server_with(answer=False):
        yield s


def get(path: str, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path.encode(), extra)


def post(path: str, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)


async def turn() -> None:
    """Let callbacks scheduled with call_soon run (connection_lost after a close)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


# --- keep-alive --------------------------------------------------------------------------------


async def test_keep_alive_answers_request_after_request_on_one_connection(answering: Server) -> None:
    conn, t = await answering.connect()
    for n in range(3):
        conn.data_received(get(f"/v1/n{n}"))
        (r,) = t.take()
        assert r.status == 200 and r.complete and r.json()["path"] == f"/v1/n{n}"
        assert not any(k == b"connection" for k, _ in r.headers)
    assert not t.closed and t.events == []


async def test_connection_close_is_answered_then_closed(answering: Server) -> None:
    conn, t = await answering.connect()
    conn.data_received(get("/v1/last", b"Connection: close\r\n"))
    (r,) = t.take()
    assert r.status == 200 and (b"connection", b"close") in r.headers
    assert t.closed and t.events == ["close"]
    await turn()
    assert conn.closed and conn not in answering.listener.connections


async def test_http10_keeps_the_connection_only_when_asked(answering: Server) -> None:
    conn, t = await answering.connect()
    conn.data_received(b"GET /v1/a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    (r,) = t.take()
    assert r.status == 200 and (b"connection", b"keep-alive") in r.headers and not t.closed
    conn.data_received(b"GET /v1/b HTTP/1.0\r\n\r\n")
    (r,) = t.take()
    assert r.status == 200 and (b"connection", b"close") in r.headers and t.closed


# --- pipelining --------------------------------------------------------------------------------


async def test_pipelined_requests_wait_with_reading_paused_and_are_answered_in_order(holding: Server) -> None:
    conn, t = await holding.connect()
    conn.data_received(get("/v1/first") + get("/v1/second") + get("/v1/third"))
    assert [r.path for r in holding.requests] == ["/v1/first"]  # the others wait behind it
    assert t.events == ["pause_reading"]
    reply(holding.requests[0])
    assert [r.path for r in holding.requests] == ["/v1/first", "/v1/second"]
    reply(holding.requests[1])
    assert t.events == ["pause_reading", "resume_reading"]  # the queue is empty: reading goes on
    reply(holding.requests[2])
    assert [r.json()["path"] for r in t.take()] == ["/v1/first", "/v1/second", "/v1/third"]
    assert not t.closed


async def test_a_bad_request_behind_good_ones_is_answered_after_them_then_closes(holding: Server) -> None:
    conn, t = await holding.connect()
    conn.data_received(get("/v1/good") + b"NOT HTTP AT ALL\r\n\r\n")
    assert t.take() == []  # nothing may overtake the good request's answer
    reply(holding.requests[0])
    good, bad = t.take()
    assert good.status == 200 and bad.status == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert t.closed and len(holding.requests) == 1


# --- backpressure ------------------------------------------------------------------------------


async def test_an_unread_body_past_the_buffer_pauses_reading_until_it_is_read(holding: Server) -> None:
    conn, t = await holding.connect()
    head = b"POST /v1/up HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n"
    conn.data_received(head + b"a" * 512)
    (request,) = holding.requests
    assert t.events == []  # under body_buffer (1024): kept, reading goes on
    conn.data_received(b"b" * 1024)
    assert t.events == ["pause_reading"]  # over it: the client waits
    got: list[bytes] = []
    ended: list[bool] = []
    early = request.read_body(got.append, lambda: ended.append(True))
    assert b"".join(early) == b"a" * 512 + b"b" * 1024
    assert t.events == ["pause_reading", "resume_reading"]
    conn.data_received(b"c" * (4096 - 1536))
    assert b"".join(got) == b"c" * (4096 - 1536) and ended == [True]


async def test_a_reader_can_pause_and_resume_the_body(holding: Server) -> None:
    conn, t = await holding.connect()
    conn.data_received(b"POST /v1/up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    (request,) = holding.requests
    got: list[bytes] = []
    request.read_body(got.append, lambda: None)
    request.pause_body()  # the upstream's socket is full
    request.pause_body()  # twice is once
    assert t.events == ["pause_reading"]
    request.resume_body()
    assert t.events == ["pause_reading", "resume_reading"]
    conn.data_received(b"3\r\nabc\r\n0\r\n\r\n")
    assert got == [b"abc"] and request.body_done


async def test_pause_writing_reaches_the_request_being_answered(holding: Server) -> None:
    conn, t = await holding.connect()
    assert t.high_water == LIMITS.write_high_water
    conn.data_received(get("/v1/stream"))
    (request,) = holding.requests
    flow: list[str] = []
    request.on_pause = lambda: flow.append("pause")
    request.on_resume = lambda: flow.append("resume")
    request.send(request.head(200, [], length=None))
    conn.pause_writing()  # the client stopped reading
    assert request.write_paused and flow == ["pause"]
    conn.resume_writing()
    assert not request.write_paused and flow == ["pause", "resume"]
    request.send(request.frame(b"data"))
    request.send(request.tail())
    request.finish()
    (r,) = t.take()
    assert r.complete and r.body == b"data" and (b"transfer-encoding", b"chunked") in r.headers


# --- timeouts ----------------------------------------------------------------------------------


async def test_a_head_that_takes_too_long_gets_a_408_and_is_closed(answering: Server) -> None:
    conn, t = await answering.connect()
    conn.data_received(b"GET /v1/slow HTTP/1.1\r\nHost: x\r\n")  # never ends
    await asyncio.sleep(LIMITS.header_timeout - 2)
    assert not t.closed
    await asyncio.sleep(3)  # past header_timeout: the next sweep (once a second) answers
    (r,) = t.take()
    assert r.status == 408 and r.json()["error"]["code"] == "header_timeout" and t.closed


async def test_a_silent_connection_is_closed_after_the_idle_timeout(answering: Server) -> None:
    _conn, t = await answering.connect()
    await asyncio.sleep(LIMITS.idle_timeout - 2)
    assert not t.closed
    await asyncio.sleep(3)
    assert t.closed and t.written == b""


async def test_an_idle_keep_alive_connection_is_closed_after_its_last_answer(answering: Server) -> None:
    conn, t = await answering.connect()
    await asyncio.sleep(LIMITS.idle_timeout - 5)
    conn.data_received(get("/v1/late"))  # a request restarts the count
    assert [r.status for r in t.take()] == [200]
    await asyncio.sleep(LIMITS.idle_timeout - 2)
    assert not t.closed
    await asyncio.sleep(3)
    assert t.closed and t.written == b""


async def test_a_request_being_answered_is_never_swept(holding: Server) -> None:
    conn, t = await holding.connect()
    conn.data_received(get("/v1/long"))
    await asyncio.sleep(LIMITS.idle_timeout * 3)
    assert not t.closed
    reply(holding.requests[0])
    assert [r.status for r in t.take()] == [200]


# --- limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (get("/" + "a" * 300), 414, "uri_too_long"),
        (get("/v1/x", b"".join(b"x-h%d: v\r\n" % i for i in range(25))), 431, "too_many_headers"),
        (get("/v1/x", b"x-big: " + b"v" * 3000 + b"\r\n"), 431, "headers_too_large"),
        (b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, None),
    ],
    ids=["request line", "header count", "header bytes", "transfer coding"],
)
async def test_oversized_heads_are_refused_and_never_dispatched(
    answering: Server, data: bytes, status: int, code: str | None
) -> None:
    conn, t = await answering.connect()
    conn.data_received(data)
    (r,) = t.take()
    assert r.status == status and t.closed and answering.requests == []
    assert code is None or r.json()["error"]["code"] == code


async def test_a_header_that_never_ends_is_refused_before_it_grows(answering: Server) -> None:
    conn, t = await answering.connect()
    conn.data_received(b"GET /v1/x HTTP/1.1\r\nx-endless: ")
    fed = 0
    while not t.closed:
        conn.data_received(b"v" * 256)
        fed += 256
        assert fed <= LIMITS.max_header_bytes + 256, "still reading past the head bound"
    (r,) = t.take()
    assert r.status == 431 and answering.requests == []


async def test_the_connection_cap_answers_503_and_closes(answering: Server) -> None:
    answering.listener.cap = 1
    _first, t1 = await answering.connect()
    _second, t2 = await answering.connect()
    (r,) = t2.take()
    assert r.status == 503 and (b"x-should-retry", b"true") in r.headers and t2.closed
    assert not t1.closed


# --- the client leaving ------------------------------------------------------------------------


async def test_a_client_gone_mid_stream_tells_the_request_and_nothing_more_is_written(holding: Server) -> None:
    conn, t = await holding.connect()
    conn.data_received(get("/v1/stream") + get("/v1/queued"))
    request = holding.requests[0]
    gone: list[bool] = []
    request.on_gone = lambda: gone.append(True)
    request.send(request.head(200, [], length=None))
    request.send(request.frame(b"part"))
    conn.connection_lost(ConnectionResetError())
    assert gone == [True] and request.finished and conn.closed
    before = bytes(t.written)
    request.send(request.frame(b"late"))  # a relay still finishing: dropped, not an error
    request.finish()
    assert bytes(t.written) == before
    assert [r.path for r in holding.requests] == ["/v1/stream"]  # the queued one is never dispatched
    assert conn not in holding.listener.connections


async def test_an_aborted_answer_closes_so_it_cannot_pass_for_a_whole_one(holding: Server) -> None:
    conn, t = await holding.connect()
    conn.data_received(get("/v1/cut"))
    request = holding.requests[0]
    request.send(request.head(200, [], length=10))
    request.send(b"12345")
    request.abort()
    assert t.closed
    (r,) = t.take()
    assert not r.complete


# --- memory between messages -------------------------------------------------------------------


async def test_the_sweep_takes_the_parser_only_between_messages(holding: Server) -> None:
    """An idle connection (or one whose answer is streaming) gives its llhttp parser back to the
    once-a-second sweep and makes a new one for the next request; a head cut in two across a
    sweep keeps its parser, so nothing of a message is ever lost or parsed twice."""
    conn, t = await holding.connect()
    conn.data_received(get("/v1/one"))
    await asyncio.sleep(1.5)  # a sweep: the request is whole, its answer not yet written
    assert conn.parser is None and conn.last is not None
    reply(holding.requests[0])
    assert conn.last is None  # an answered request is not kept by the connection
    conn.data_received(b"POST /v1/two HTTP/1.1\r\nHost: x\r\nContent-")
    await asyncio.sleep(1.5)  # a sweep in the middle of the head
    assert conn.parser is not None
    conn.data_received(b"Length: 3\r\n\r\nabc" + get("/v1/three"))
    reply(holding.requests[1])
    reply(holding.requests[2])
    responses = t.take()
    assert [r.json() for r in responses] == [
        {"path": "/v1/one", "body": ""},
        {"path": "/v1/two", "body": "abc"},
        {"path": "/v1/three", "body": ""},
    ]
    assert not t.closed


async def test_a_connection_to_close_keeps_its_parser(holding: Server) -> None:
    """After "Connection: close" llhttp refuses what follows; a fresh parser would not, so none is made."""
    conn, t = await holding.connect()
    conn.data_received(get("/v1/last", b"Connection: close\r\n"))
    await asyncio.sleep(1.5)
    assert conn.parser is not None
    conn.data_received(get("/v1/after"))
    reply(holding.requests[0])
    assert [r.json()["path"] for r in t.take()] == ["/v1/last"] and t.closed
    assert len(holding.requests) == 1


async def test_a_connection_that_stopped_reading_keeps_its_parser(holding: Server) -> None:
    """After an unparseable request (reading stopped for good) the sweep leaves the parser alone."""
    conn, t = await holding.connect()
    conn.data_received(get("/v1/ok") + b"BAD\x00 / HTTP/1.1\r\n\r\n")
    await asyncio.sleep(1.5)
    assert conn.parser is not None and conn.broken is not None
    reply(holding.requests[0])
    assert [r.status for r in t.take()] == [200, 400] and t.closed
