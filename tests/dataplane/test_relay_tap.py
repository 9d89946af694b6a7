"""The relay's body tap, on real sockets: every decoded byte of a 2xx body in order, what it gives back
is what the client gets, what it held back comes out at the end; never a byte of any other answer.

The data plane's Listener (uvloop, as in production) relays to an upstream in this test that writes
its body in pieces, each only after the tap has seen the last (so each is its own read at the
relay, without a sleep); the client reads the response with h11, a parser that shares no code
with the gateway's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import h11
import pytest
import uvloop

from gateway.dataplane.limits import Limits
from gateway.dataplane.pool import Pool
from gateway.dataplane.relay import BodyTap, Relay
from gateway.dataplane.server import Listener, Request
from gateway.policy import UpstreamSpec
from gateway.proxy.upstreams import build_upstreams
from gateway.server import bind
from gateway.usage.tap import UsageTap

GUARD = 20.0  # seconds before a wait that should have ended is a failure (a hang guard)


def _outcome() -> Any:
    """What a relay writes down about its request (:class:`gateway.dataplane.relay.RelayRecord`)."""
    return SimpleNamespace(
        attempted=False, client_gone=False, status=0, sent=0, error=None, ttfb=None, target=None,
        failovers=None, refused=None, attempts=0,
    )  # fmt: skip


class Recorder:
    """A tap that writes down what it is fed and, with ``hold``, keeps it all until the end; ``strips``
    says whether it may change bytes (the relay frames its body itself) or only observes."""

    def __init__(self, hold: bool = False, strips: bool = True) -> None:
        self.hold = hold
        self.strips = strips
        self.given: list[bytes] = []  # what feed gave back, the very objects
        self.seen: list[bytes] = []
        self.ended = 0
        self.fed = asyncio.Event()

    def feed(self, data: bytes) -> bytes:
        self.seen.append(data)
        self.fed.set()
        out = b"" if self.hold else data
        self.given.append(out)
        return out

    def end(self) -> bytes:
        self.ended += 1
        return b"".join(self.seen) if self.hold else b""

    @property
    def size(self) -> int:
        return sum(map(len, self.seen))


def upstream_head(status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"HTTP/1.1 %d X\r\n" % status, *(b"%s: %s\r\n" % h for h in headers), b"\r\n"]
    return b"".join(lines)


@contextlib.asynccontextmanager
async def upstream(head: bytes, pieces: list[bytes], tap: Recorder | None) -> AsyncIterator[int]:
    """Answers one request with ``head``, then each piece once the tap (if any) has seen the ones before
    (a chunked piece's payload: its chunk framing taken off)."""

    chunked = b"transfer-encoding: chunked" in head

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head)
        sent = 0
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            sent += len(_payload(piece)) if chunked else len(piece)
            while tap is not None and tap.size < sent:  # the relay read it (and decoded it) before the next
                tap.fed.clear()
                await tap.fed.wait()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def _payload(chunk: bytes) -> bytes:
    """One chunk's data: ``SIZE\r\nDATA\r\n``."""
    size, _, rest = chunk.partition(b"\r\n")
    return rest[: int(size, 16)]


async def fetch(handler: Callable[[Request], None]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One GET through a Listener serving ``handler``: the status, headers and body the client read."""
    listener = Listener(handler, Limits(grace=1.0), 64, lambda reason: None)
    sock = bind("127.0.0.1", 0)
    await listener.start(sock)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        writer.write(b"GET /v1/x HTTP/1.1\r\nhost: x\r\n\r\n")
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/v1/x", headers=[("host", "x")]))
        status, headers, body = 0, [], b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        writer.close()
        return status, headers, body
    finally:
        await listener.shutdown()


def relaying(port: int, tap: BodyTap | None) -> Callable[[Request], None]:
    spec = UpstreamSpec(url=f"http://127.0.0.1:{port}")
    pool = Pool(build_upstreams({"default": spec}, {})["default"].members[0], Limits(), 8)
    policy = (b"x-regiongate-policy", b"test")

    def handle(request: Request) -> None:
        Relay(request, pool, b"/v1/x", [], b"rid", policy, _outcome(), lambda: None, tap=tap).start()

    return handle


def run(scenario: Callable[[], object]) -> None:
    uvloop.run(asyncio.wait_for(scenario(), GUARD))  # type: ignore[arg-type]


PIECES = [b"data: one\n\n", b"data: two\n", b"\ndata: [DONE]\n\n"]


def framed(framing: str) -> tuple[bytes, list[bytes]]:
    """An event stream of PIECES as the upstream sends it: its head, and its reads (one piece each)."""
    if framing == "length":
        length = b"%d" % len(b"".join(PIECES))
        return upstream_head(200, [(b"content-type", b"text/event-stream"), (b"content-length", length)]), PIECES
    head = upstream_head(200, [(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")])
    return head, [b"%x\r\n%s\r\n" % (len(p), p) for p in PIECES] + [b"0\r\n\r\n"]


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_the_tap_sees_every_byte_in_order_one_read_at_a_time(framing: str) -> None:
    body = b"".join(PIECES)
    head, wire = framed(framing)

    async def scenario() -> None:
        tap = Recorder()
        async with upstream(head, wire, tap) as port:
            status, headers, got = await fetch(relaying(port, tap))
        assert status == 200 and got == body
        assert tap.seen == PIECES and tap.ended == 1
        # a tapped body is framed by the gateway: the tap may change its length
        assert (b"transfer-encoding", b"chunked") in headers
        assert not any(name == b"content-length" for name, _ in headers)

    run(scenario)


def test_bytes_the_tap_held_back_come_out_at_the_end() -> None:
    head = upstream_head(200, [(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")])
    wire = [b"%x\r\n%s\r\n" % (len(p), p) for p in PIECES] + [b"0\r\n\r\n"]

    async def scenario() -> None:
        tap = Recorder(hold=True)
        async with upstream(head, wire, tap) as port:
            status, _, got = await fetch(relaying(port, tap))
        assert status == 200 and got == b"".join(PIECES) and tap.ended == 1

    run(scenario)


def test_the_tap_is_fed_the_body_with_its_transfer_coding_taken_off() -> None:
    body = b'{"id":"x","usage":{"prompt_tokens":12,"completion_tokens":3}}'
    coded = gzip.compress(body)
    head = upstream_head(200, [(b"content-type", b"application/json"), (b"transfer-encoding", b"gzip, chunked")])
    wire = [b"%x\r\n%s\r\n" % (len(coded), coded), b"0\r\n\r\n"]

    async def scenario() -> None:
        tap = UsageTap("chat", False, "gpt-4o")
        async with upstream(head, wire, None) as port:
            status, _, got = await fetch(relaying(port, tap))
        assert status == 200 and got == body
        usage = tap.usage()
        assert usage is not None and (usage.input, usage.output) == (12, 3)

    run(scenario)


@pytest.mark.parametrize("status", [204, 404, 429, 500])
def test_no_byte_of_an_answer_other_than_a_2xx_with_a_body_reaches_the_tap(status: int) -> None:
    body = b"" if status == 204 else b'{"error":{"message":"no","type":"x","param":null,"code":"x"}}'
    length = [] if status == 204 else [(b"content-length", b"%d" % len(body))]
    head = upstream_head(status, [(b"content-type", b"application/json"), *length])

    async def scenario() -> None:
        tap = Recorder()
        async with upstream(head, [body] if body else [], None) as port:
            got_status, headers, got = await fetch(relaying(port, tap))
        assert (got_status, got) == (status, body)
        assert tap.seen == [] and tap.ended == 0
        if body:  # untapped: the upstream's own length, as before
            assert (b"content-length", b"%d" % len(body)) in headers

    run(scenario)


def test_without_a_tap_the_upstreams_framing_is_kept() -> None:
    body = b"".join(PIECES)
    head = upstream_head(200, [(b"content-type", b"text/event-stream"), (b"content-length", b"%d" % len(body))])

    async def scenario() -> None:
        async with upstream(head, PIECES, None) as port:
            status, headers, got = await fetch(relaying(port, None))
        assert (status, got) == (200, body)
        assert (b"content-length", b"%d" % len(body)) in headers

    run(scenario)


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_observing_tap_keeps_the_upstreams_framing_and_its_bytes(framing: str) -> None:
    body = b"".join(PIECES)
    head, wire = framed(framing)

    async def scenario() -> None:
        tap = Recorder(strips=False)
        async with upstream(head, wire, tap) as port:
            status, headers, got = await fetch(relaying(port, tap))
        assert status == 200 and got == body
        assert tap.seen == PIECES and tap.ended == 1
        assert all(out is data for out, data in zip(tap.given, tap.seen, strict=True))  # no copy
        if framing == "length":  # the upstream's own length, as untapped
            assert (b"content-length", b"%d" % len(body)) in headers
            assert not any(name == b"transfer-encoding" for name, _ in headers)
        else:
            assert (b"transfer-encoding", b"chunked") in headers

    run(scenario)


def test_an_observing_usage_tap_reads_a_json_answer_under_its_content_length() -> None:
    body = b'{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3}}'
    pieces = [body[:20], body[20:]]
    head = upstream_head(200, [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))])

    async def scenario() -> None:
        tap = UsageTap.observing("chat")
        async with upstream(head, pieces, None) as port:
            status, headers, got = await fetch(relaying(port, tap))
        assert status == 200 and got == body
        assert (b"content-length", b"%d" % len(body)) in headers
        usage = tap.usage()
        assert usage is not None and (usage.input, usage.output, usage.source) == (12, 3, "usage")

    run(scenario)
