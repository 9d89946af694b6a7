"""A property of the wire: one upstream request per accepted client request, and nothing else.

Hypothesis writes requests a smuggler would (methods, header lists with
``Connection`` naming framing headers, framing headers spelled with ``_``,
``.`` and other cases, bodies chunked and not, several pipelined on one
connection, split at any byte) and sends them through the real data plane
(in this process: :mod:`support.wire`) to an upstream that records every
byte (``support.processes.RawUpstream``). ``h11``, an HTTP/1.1 parser that shares
no code with the gateway's llhttp, reads what the upstream received. The
invariant: every client request was answered by the upstream, and the
upstream received exactly those requests, each with the method, path and
body the gateway judged, and not one byte more (no request hidden in a
body, no partial one left behind).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import h11
import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.processes import RawUpstream
from support.wire import GB, GUARD, inprocess_gateway

SMUGGLED = b"GET /v1/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
METHODS = ["GET", "POST", "DELETE", "OPTIONS"]  # the default --allow-method list, HEAD aside (its answer has no body)
# What a Connection header may name: framing, the headers the gateway sets, and harmless ones.
TOKENS = [
    "keep-alive", "Content-Length", "content-length", "Transfer-Encoding", "transfer-encoding", "Host",
    "X-Forwarded-For", "TE", "Trailer", "Keep-Alive", "X-Other", "Content_Length", "Transfer_Encoding",
]  # fmt: skip
# Names that normalise to a framing header in some server (CGI-style variables, case folding).
DECOY_LENGTH = ["Content_Length", "content_length", "CONTENT_LENGTH", "Content.Length", "content.length"]
DECOY_CODING = ["Transfer_Encoding", "transfer_encoding", "TRANSFER_ENCODING", "Transfer.Encoding"]
LENGTH_NAMES = ["Content-Length", "content-length", "CONTENT-LENGTH", "CoNtEnT-LeNgTh"]
CODING_NAMES = ["Transfer-Encoding", "transfer-encoding", "TRANSFER-ENCODING"]
CODING_VALUES = ["chunked", "Chunked", "CHUNKED", "chunked ", ", chunked"]


@dataclass(frozen=True)
class Sent:
    method: str
    framing: str  # "length", "chunked", "none"
    body: bytes
    pieces: tuple[int, ...]  # chunk sizes for a chunked body (the rest goes in one last chunk)
    headers: tuple[tuple[str, str], ...]
    query: str

    def raw(self, n: int) -> tuple[bytes, str, bytes]:
        """The request's bytes with ``n`` in its path; the path and body the upstream must see."""
        path = f"/v1/p{n}"
        target = path + (f"?{self.query}" if self.query else "")
        lines = [f"{self.method} {target} HTTP/1.1", "Host: gateway", f"X-Forwarded-For: {GB}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        body = self.body if self.framing != "none" else b""
        payload = b""
        if self.framing == "length":
            lines.append(f"{self.length_name}: {len(body)}")
            payload = body
        elif self.framing == "chunked":
            lines.append(f"{self.coding_name}: {self.coding_value}")
            rest, parts = body, []
            for size in self.pieces:
                if not rest:
                    break
                piece, rest = rest[:size], rest[size:]
                parts.append(b"%x\r\n%b\r\n" % (len(piece), piece))
            if rest:
                parts.append(b"%x\r\n%b\r\n" % (len(rest), rest))
            payload = b"".join(parts) + b"0\r\n\r\n"
        return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + payload, target, body

    # Spellings drawn with the request, kept on it so that a failing example shows them.
    length_name: str = "Content-Length"
    coding_name: str = "Transfer-Encoding"
    coding_value: str = "chunked"


def _decoys(body_len: int) -> st.SearchStrategy[list[tuple[str, str]]]:
    """Headers that must never frame anything: a Connection list, framing names spelled otherwise."""
    connection = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=4).map(lambda ts: ("Connection", ", ".join(ts)))
    wrong_length = st.tuples(
        st.sampled_from(DECOY_LENGTH), st.sampled_from([0, 1, body_len + 7, len(SMUGGLED)]).map(str)
    )
    coding = st.tuples(st.sampled_from(DECOY_CODING), st.sampled_from(["chunked", "gzip, chunked"]))
    other = st.tuples(st.sampled_from(["X-Other", "X_Other", "Accept"]), st.sampled_from(["1", "*/*"]))
    return st.lists(st.one_of(connection, wrong_length, coding, other), max_size=4)


@st.composite
def requests(draw: st.DrawFn) -> Sent:
    body = draw(
        st.one_of(
            st.binary(max_size=48),
            st.just(SMUGGLED),
            st.tuples(st.binary(max_size=8), st.binary(max_size=8)).map(lambda ab: ab[0] + SMUGGLED + ab[1]),
        )
    )
    return Sent(
        method=draw(st.sampled_from(METHODS)),
        framing=draw(st.sampled_from(["length", "chunked", "none"])),
        body=body,
        pieces=tuple(draw(st.lists(st.integers(1, 20), max_size=3))),
        headers=tuple(draw(_decoys(len(body)))),
        query=draw(st.sampled_from(["", "a=1", "q=%20x"])),
        length_name=draw(st.sampled_from(LENGTH_NAMES)),
        coding_name=draw(st.sampled_from(CODING_NAMES)),
        coding_value=draw(st.sampled_from(CODING_VALUES)),
    )


def upstream_requests(stream: bytes) -> list[tuple[str, str, bytes]]:
    """Every request h11 reads in one upstream connection's bytes; fails on anything else in them."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(stream)
    out: list[tuple[str, str, bytes]] = []
    method, target, body = "", "", b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request):
            method, target, body = event.method.decode(), event.target.decode(), b""
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            out.append((method, target, body))
            conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            conn.send(h11.EndOfMessage())
            conn.start_next_cycle()
        elif event is h11.NEED_DATA:
            break
        else:
            raise AssertionError(f"unexpected h11 event {event!r}")
    leftover, _ = conn.trailing_data
    assert leftover == b"", f"bytes after the last whole request: {leftover!r}"
    assert conn.their_state is h11.IDLE, "a request cut short"
    return out


def answers(port: int, data: bytes, splits: list[int], count: int) -> list[tuple[int, bytes]]:
    """Send ``data`` in pieces cut at ``splits``; read ``count`` responses (status, body)."""
    got: list[tuple[int, bytes]] = []
    parser: httptools.HttpResponseParser

    class Collect:
        body = b""

        def on_message_begin(self) -> None:
            self.body = b""

        def on_body(self, b: bytes) -> None:
            self.body += b

        def on_message_complete(self) -> None:
            got.append((parser.get_status_code(), self.body))

    parser = httptools.HttpResponseParser(Collect())
    with socket.create_connection(("127.0.0.1", port), timeout=GUARD) as s:
        at = 0
        for cut in sorted(set(splits)):
            if 0 < cut < len(data):
                s.sendall(data[at:cut])
                at = cut
        s.sendall(data[at:])
        while len(got) < count:
            chunk = s.recv(65536)
            if not chunk:
                break
            parser.feed_data(chunk)
    return got


@pytest.fixture(scope="module")
def wire(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, RawUpstream]]:
    upstream = RawUpstream()
    try:
        with inprocess_gateway(tmp_path_factory.mktemp("wire"), upstream.url) as gw:
            yield gw.port, upstream
    finally:
        upstream.close()


class Ledger:
    """Every request sent so far (all examples): what the upstream must have received, no more."""

    def __init__(self) -> None:
        self.expected: list[tuple[str, str, bytes]] = []


_ledger = Ledger()


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(requests(), min_size=1, max_size=3), splits=st.lists(st.integers(0, 600), max_size=3))
def test_one_upstream_request_per_client_request(
    wire: tuple[int, RawUpstream], batch: list[Sent], splits: list[int]
) -> None:
    port, upstream = wire
    raws = []
    for sent in batch:
        n = len(_ledger.expected)
        raw, target, body = sent.raw(n)
        raws.append(raw)
        _ledger.expected.append((sent.method, target, body))
    got = answers(port, b"".join(raws), splits, len(batch))
    # Every request was accepted and answered by the upstream ("{}"), none by the gateway itself.
    assert got == [(200, b"{}")] * len(batch)
    received = [r for stream in list(upstream.received) for r in upstream_requests(stream)]
    assert sorted(received) == sorted(_ledger.expected)


def test_the_issue_reproduction_through_the_same_harness(wire: tuple[int, RawUpstream]) -> None:
    """The issue's bytes (Connection naming Content-Length, a request in the body), as a fixed example."""
    port, upstream = wire
    n = len(_ledger.expected)
    inner = b"POST /v1/admin/secret HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    head = (
        f"POST /v1/chat/completions/{n} HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {GB}\r\n"
        f"Connection: keep-alive, Content-Length\r\nContent-Length: {len(inner)}\r\n\r\n"
    ).encode()
    _ledger.expected.append(("POST", f"/v1/chat/completions/{n}", inner))
    assert answers(port, head + inner, [], 1) == [(200, b"{}")]
    received = [r for stream in list(upstream.received) for r in upstream_requests(stream)]
    assert sorted(received) == sorted(_ledger.expected)
    assert not any(target == "/v1/admin/secret" for _, target, _ in received)
