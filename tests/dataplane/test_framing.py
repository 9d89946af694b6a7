"""Framing is the gateway's, both ways: raw sockets, a recording upstream and a real nginx behind it.

Request smuggling through ``Connection: Content-Length`` (issue 14, item 1) and its variants, an
upstream that says more than one response per request or frames it through ``Connection``
(item 7), transfer codings besides ``chunked`` both ways (item 13), retries and failover that
would send a POST twice (item 8), and HTTP/1.0 keep-alive.
"""

from __future__ import annotations

import gzip
import socket
import zlib
from pathlib import Path

import pytest

from gateway.dataplane.upstream import FRAMING, HOP_BY_HOP, forward_headers, response_headers
from gateway.policy import UpstreamSpec
from gateway.proxy.upstreams import build_upstreams
from support.processes import (
    CITY,
    GatewayFactory,
    RawUpstream,
    Stub,
    parse_requests,
    run_nginx,
    run_stub,
    write,
)
from support.raw_http import (
    OK,
    XFF,
    exchange,
    parse_responses,
    read_request,
    read_until_closed,
    scripted,
    start,
)

GB_ADDRESS = "2.125.160.216"
INNER = b"POST /v1/admin/secret HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"


def smuggle(connection: bytes, framing: bytes, body: bytes = INNER, path: bytes = b"/v1/chat/completions") -> bytes:
    """A request whose body is another request, with this Connection list and these framing lines."""
    head = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + XFF
    if connection:
        head += b"Connection: " + connection + b"\r\n"
    return head + framing + b"\r\n" + body


def length(body: bytes = INNER) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


def chunked(body: bytes = INNER) -> bytes:
    return b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)


# The reproduction, then every Connection list and spelling around it that an attacker
# would try next: (Connection value, framing lines, body as sent).
VARIANTS: dict[str, tuple[bytes, bytes, bytes]] = {
    "issue: keep-alive, Content-Length": (b"keep-alive, Content-Length", length(), INNER),
    "Content-Length alone": (b"Content-Length", length(), INNER),
    "lower case": (b"content-length", length(), INNER),
    "upper case, spaces": (b"  CONTENT-LENGTH  ,keep-alive", length(), INNER),
    "with close": (b"close, Content-Length", length(), INNER),
    "every framing name": (b"Content-Length, Transfer-Encoding, Host, TE, Trailer", length(), INNER),
    "chunked, Transfer-Encoding named": (b"keep-alive, Transfer-Encoding", b"Transfer-Encoding: chunked\r\n",
                                         chunked()),
    "chunked, both named": (b"Transfer-Encoding, Content-Length", b"Transfer-Encoding: chunked\r\n", chunked()),
    "Content_Length beside chunked": (b"", b"Transfer-Encoding: chunked\r\nContent_Length: 0\r\n", chunked()),
    "Content_Length beside a length": (b"Content-Length", length() + b"Content_Length: 0\r\n", INNER),
    "Transfer_Encoding beside a length": (b"", length() + b"Transfer_Encoding: chunked\r\n", INNER),
    "Content.Length and CONTENT_LENGTH": (b"", length() + b"Content.Length: 0\r\nCONTENT_LENGTH: 0\r\n", INNER),
    "Connection names the spelling": (b"Content_Length, keep-alive", length() + b"Content_Length: 1\r\n", INNER),
}  # fmt: skip


def test_no_connection_token_or_spelling_lets_a_body_become_a_request(
    gateway: GatewayFactory, raw_upstream: RawUpstream, tmp_path: Path
) -> None:
    """Whatever Connection names and however framing is spelled: one upstream request, its body whole."""
    gw = start(gateway, tmp_path, raw_upstream.url)
    for name, (connection, framing, body) in VARIANTS.items():
        # Each on a fresh client connection, followed by a plain request on the same one.
        data = smuggle(connection, framing, body) + b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + XFF + b"\r\n"
        responses, _ = exchange(gw.port, data, answers=2)  # the POST's and the GET's (a desync makes more)
        assert [r.status for r in responses][:1] == [200], name
    sent = raw_upstream.requests()
    paths = [s.url for s in sent]
    assert b"/v1/admin/secret" not in paths
    posts = [s for s in sent if s.url == b"/v1/chat/completions"]
    assert len(posts) == len(VARIANTS)
    assert all(s.body == INNER for s in posts)
    for s in posts:  # the gateway's framing only, once
        assert set(s.headers) & {b"content_length", b"transfer_encoding", b"content.length"} == set()
    streams = b"".join(raw_upstream.received)
    assert streams.lower().count(b"post /v1/chat/completions") == len(VARIANTS)
    assert streams.count(b"POST /v1/admin/secret") == len(VARIANTS)  # only ever inside a body
    assert len(gw.wait_log(len(sent))) == len(sent)


NGINX = """\
log_format framing '$request_method $request_uri $status';
server {
    listen 127.0.0.1:@PORT@;
    access_log @LOG@ framing;
    location / { return 200 '{}'; }
}
"""


def test_a_real_nginx_upstream_logs_one_request_per_gateway_request(gateway: GatewayFactory, tmp_path: Path) -> None:
    """The issue's reproduction against the upstream it was found with: nginx's access log is the judge."""
    log = tmp_path / "nginx-access.log"
    with run_nginx(tmp_path, NGINX.replace("@LOG@", str(log))) as port:
        gw = start(gateway, tmp_path, f"http://127.0.0.1:{port}")
        for name, (connection, framing, body) in VARIANTS.items():
            data = smuggle(connection, framing, body, b"/v1/chat/completions?v=%d" % len(name))
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
                s.sendall(data + b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + XFF + b"\r\n")
                raw, _ = read_until_closed(s)
            responses = parse_responses(raw)
            if b"close" in connection:
                assert [r.status for r in responses] == [200], name
            else:
                assert [r.status for r in responses] == [200, 200], name
    # Read once nginx has stopped: it writes a line after its answer went out, so only then are all in.
    lines = log.read_text().splitlines()
    expected = 2 * len(VARIANTS) - sum(b"close" in c for c, _, _ in VARIANTS.values())
    assert len(gw.wait_log(expected)) == expected
    assert len(lines) == expected, lines
    assert not any("/v1/admin/secret" in line for line in lines)
    assert all(line.endswith(" 200") for line in lines), lines
    posts = sorted(line for line in lines if line.startswith("POST "))
    assert posts == sorted(f"POST /v1/chat/completions?v={len(name)} 200" for name in VARIANTS)


# --- the response side: one answer per request, framed by the gateway --------------------------


EXTRA = {
    "a whole second response": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nextra",
    "half a response": b"HTTP/1.1 200 OK\r\ncont",
    "garbage": b"garbage\r\n\r\n",
}


@pytest.mark.parametrize("extra", sorted(EXTRA))
def test_bytes_after_the_answer_are_never_relayed_and_close_the_upstream_connection(
    gateway: GatewayFactory, tmp_path: Path, extra: str
) -> None:
    def serve(conn: socket.socket, _: int) -> None:
        while read_request(conn):
            conn.sendall(OK + EXTRA[extra])  # one read: the answer, then more

    with scripted(serve) as up:
        gw = start(gateway, tmp_path, up.url)
        request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + XFF + b"\r\n"
        responses, _ = exchange(gw.port, request * 3 + b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                + XFF + b"\r\n")  # fmt: skip
        assert [(r.status, r.body) for r in responses] == [(200, b"{}")] * 4
        assert up.connections == 4  # never reused after it said too much


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Content-Length\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent_Length: 9\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer_Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
def test_an_upstream_connection_token_cannot_unframe_the_response(
    gateway: GatewayFactory, tmp_path: Path, answer: bytes
) -> None:
    def serve(conn: socket.socket, _: int) -> None:
        while read_request(conn):
            conn.sendall(answer)

    with scripted(serve) as up:
        gw = start(gateway, tmp_path, up.url)
        request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + XFF + b"\r\n"
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(request + request)
            raw = b""
            while len(parse_responses(raw)) < 2 or not parse_responses(raw)[-1].complete:
                chunk = s.recv(65536)
                assert chunk, raw
                raw += chunk
        responses = parse_responses(raw)
        assert [(r.status, r.body, r.complete) for r in responses] == [(200, b"{}", True)] * 2
        for r in responses:  # exactly one framing header, the gateway's
            framing = [n.lower() for n, _ in r.headers if n.lower().replace(b"_", b"-") in (
                b"content-length", b"transfer-encoding")]  # fmt: skip
            assert len(framing) == 1, r.headers


def test_204_loses_its_content_length_and_gateway_headers_are_the_gateways(
    gateway: GatewayFactory, tmp_path: Path
) -> None:
    def serve(conn: socket.socket, _: int) -> None:
        while request := read_request(conn):
            if b"/204" in request.split(b"\r\n")[0]:
                conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-Regiongate-Policy: forged\r\n\r\n")
            else:
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-regiongate-request-id: forged\r\n"
                    b"X_Regiongate_Policy: forged\r\nX-Regiongate-Anything: forged\r\n\r\n{}"
                )

    with scripted(serve) as up:
        gw = start(gateway, tmp_path, up.url)
        data = (
            b"GET /204 HTTP/1.1\r\nHost: x\r\n" + XFF + b"\r\n"
            b"GET /200 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + XFF + b"\r\n"
        )
        responses, _ = exchange(gw.port, data)
    assert [r.status for r in responses] == [204, 200]
    assert responses[0].header("content-length") is None and responses[0].header("transfer-encoding") is None
    for r in responses:
        own = [(n.lower(), v) for n, v in r.headers if n.lower().replace(b"_", b"-").startswith(b"x-regiongate-")]
        assert b"forged" not in b"".join(v for _, v in own), own
        assert sorted(n for n, _ in own) == [b"x-regiongate-policy", b"x-regiongate-request-id"]


# --- transfer codings besides chunked ----------------------------------------------------------


PLAIN = b'{"object": "list", "data": []}' * 20


def _chunks(data: bytes, size: int = 50) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(data[i : i + size]), data[i : i + size]) for i in range(0, len(data), size))


CODED = {
    "gzip, chunked": (b"gzip, chunked", _chunks(gzip.compress(PLAIN)) + b"0\r\n\r\n"),
    "x-gzip, chunked": (b"x-gzip, chunked", _chunks(gzip.compress(PLAIN)) + b"0\r\n\r\n"),
    "deflate, chunked": (b"deflate, chunked", _chunks(zlib.compress(PLAIN)) + b"0\r\n\r\n"),
    "gzip, gzip, chunked": (b"gzip, gzip, chunked", _chunks(gzip.compress(gzip.compress(PLAIN))) + b"0\r\n\r\n"),
    "GZIP to the close": (b"GZIP", gzip.compress(PLAIN)),
}


@pytest.mark.parametrize("name", sorted(CODED))
@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_an_upstream_transfer_coding_is_taken_off_not_lost(
    gateway: GatewayFactory, tmp_path: Path, name: str, version: bytes
) -> None:
    """RFC 9112 §7: any recipient may remove a transfer coding; the client gets the body it can read."""
    coding, body = CODED[name]

    def serve(conn: socket.socket, _: int) -> None:
        if read_request(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nTransfer-Encoding: " + coding
                         + b"\r\n\r\n" + body)  # fmt: skip

    with scripted(serve) as up:
        gw = start(gateway, tmp_path, up.url)
        request = b"GET /v1/models HTTP/" + version + b"\r\nHost: x\r\n" + XFF + b"\r\n"
        # HTTP/1.0 is close-delimited: read to the close; 1.1 stays open after its one answer.
        responses, closed = exchange(gw.port, request, answers=None if version == b"1.0" else 1)
    (r,) = responses
    assert r.status == 200 and r.body == PLAIN
    if version == b"1.0":  # close-delimited: whole when the connection closed
        assert closed and r.header("transfer-encoding") is None
    else:
        assert r.complete and r.header("transfer-encoding") == "chunked"


@pytest.mark.parametrize("coding", [b"br, chunked", b"compress, chunked", b"zstd", b"chunked, gzip"])
def test_a_transfer_coding_the_gateway_cannot_take_off_is_a_502(
    gateway: GatewayFactory, tmp_path: Path, coding: bytes
) -> None:
    def serve(conn: socket.socket, _: int) -> None:
        if read_request(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n2\r\nab\r\n0\r\n\r\n")

    with scripted(serve) as up:
        gw = start(gateway, tmp_path, up.url)
        responses, _ = exchange(gw.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + XFF + b"\r\n", answers=1)
    assert [r.status for r in responses] == [502]
    assert responses[0].json()["error"]["code"] == "upstream_bad_response"


def test_a_gzip_body_that_does_not_decode_is_cut_not_passed_as_whole(gateway: GatewayFactory, tmp_path: Path) -> None:
    def serve(conn: socket.socket, _: int) -> None:
        if read_request(conn):
            good = gzip.compress(PLAIN)
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + _chunks(good[:-12])
                         + b"0\r\n\r\n")  # fmt: skip

    with scripted(serve) as up:
        gw = start(gateway, tmp_path, up.url)
        responses, closed = exchange(gw.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + XFF + b"\r\n")
    assert closed and (not responses or not responses[0].complete)


@pytest.mark.parametrize(
    "coding", [b"gzip, chunked", b"identity, chunked", b"chunked\r\nTransfer-Encoding: x-gzip, chunked"]
)
def test_a_request_transfer_coding_besides_chunked_is_a_501_never_forwarded(
    gateway: GatewayFactory, raw_upstream: RawUpstream, tmp_path: Path, coding: bytes
) -> None:
    gw = start(gateway, tmp_path, raw_upstream.url)
    data = b"POST /v1/x HTTP/1.1\r\nHost: x\r\n" + XFF + b"Transfer-Encoding: " + coding + b"\r\n\r\n"
    responses, closed = exchange(gw.port, data + _chunks(gzip.compress(b"{}")) + b"0\r\n\r\n")
    assert closed and len(responses) == 1
    status = responses[0].status
    assert status in (400, 501) and responses[0].json()["error"]["type"] == "invalid_request_error"
    assert raw_upstream.requests() == []


# --- never twice: failover after a 504 ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers", "fails_over"),
    [
        (b"POST", b"", False),
        (b"POST", b"Idempotency-Key: order-7\r\n", True),
        (b"GET", b"", True),
        (b"DELETE", b"", True),
    ],
)
def test_504_fails_over_only_for_a_request_that_may_be_sent_twice(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, method: bytes, headers: bytes, fails_over: bool
) -> None:
    with run_stub("--status", "504") as slow:
        text = (
            f'version: 1\nupstreams:\n  default: {{url: "{slow.url}", fallback: [backup]}}\n'
            f'  backup: {{url: "{stub.url}"}}\nrules:\n  - {{name: gb, countries: [GB], action: allow}}\n'
        )
        gw = gateway("--policy", write(tmp_path, "p.yaml", text), "--geoip", CITY, "--trusted-proxy", "127.0.0.1/32")
        body = b'{"model": "gpt-4o"}'
        data = (
            method + b" /echo/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\ncontent-type: application/json\r\n"
            + headers + XFF + b"Content-Length: %d\r\n\r\n" % len(body) + body
        )  # fmt: skip
        responses, _ = exchange(gw.port, data)
        assert slow.stats()["requests"] == 1
    (entry,) = gw.wait_log(1)
    if fails_over:
        assert responses[0].status == 200 and stub.stats()["requests"] == 1
        assert entry["attempts"] == 2 and entry["failovers"][0]["reason"] == "status_504"
    else:
        assert responses[0].status == 504 and stub.stats()["requests"] == 0
        assert entry["attempts"] == 1 and "failovers" not in entry


# --- HTTP/1.0 keep-alive ------------------------------------------------------------------------


def test_http10_keep_alive_is_honoured_with_a_content_length(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path
) -> None:
    gw = start(gateway, tmp_path, stub.url)
    keep = b"GET /echo/a HTTP/1.0\r\nConnection: keep-alive\r\n" + XFF + b"\r\n"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        for _ in range(3):  # one connection, three answers
            s.sendall(keep)
            raw = b""
            while not (parse_responses(raw) and parse_responses(raw)[0].complete):
                chunk = s.recv(65536)
                assert chunk, "closed after an HTTP/1.0 keep-alive answer"
                raw += chunk
            (r,) = parse_responses(raw)
            assert r.status == 200 and r.header("content-length") == str(len(r.body))
            assert r.header("connection") == "keep-alive" and r.header("transfer-encoding") is None
        # Without keep-alive, HTTP/1.0 still closes.
        s.sendall(b"GET /echo/b HTTP/1.0\r\n" + XFF + b"\r\n")
        raw, closed = read_until_closed(s)
    assert closed and parse_responses(raw)[0].status == 200


def test_http10_keep_alive_with_an_unknown_length_is_close_delimited(gateway: GatewayFactory, tmp_path: Path) -> None:
    def serve(conn: socket.socket, _: int) -> None:
        if read_request(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")

    with scripted(serve) as up:
        gw = start(gateway, tmp_path, up.url)
        data = b"GET /v1/models HTTP/1.0\r\nConnection: keep-alive\r\n" + XFF + b"\r\n"
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(data)
            raw, closed = read_until_closed(s)
    assert closed
    head, body = raw.split(b"\r\n\r\n", 1)
    assert body == b"hello" and b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()


def test_framing_reaches_the_upstream_once_as_the_parser_counted(
    gateway: GatewayFactory, raw_upstream: RawUpstream, tmp_path: Path
) -> None:
    """A length with spaces around it, a zero length, a chunked body: the gateway's own framing line."""
    gw = start(gateway, tmp_path, raw_upstream.url)
    for data in (
        b"POST /v1/a HTTP/1.1\r\nHost: x\r\nContent-Length:   3  \r\n" + XFF + b"\r\nabc",
        b"POST /v1/b HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n" + XFF + b"\r\n",
        b"POST /v1/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n" + XFF + b"\r\n3\r\nabc\r\n0\r\n\r\n",
    ):
        responses, _ = exchange(gw.port, data + b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                + XFF + b"\r\n")  # fmt: skip
        assert [r.status for r in responses] == [200, 200]
    stream = b"".join(raw_upstream.received)
    assert b"content-length: 3\r\n" in stream and b"content-length: 0\r\n" in stream
    assert stream.count(b"transfer-encoding: chunked\r\n") == 1
    assert {s.url: s.body for s in parse_requests(stream)} == {
        b"/v1/a": b"abc", b"/v1/b": b"", b"/v1/c": b"abc", b"/v1/models": b"",
    }  # fmt: skip


# --- the header rule itself (a pure function) --------------------------------------------------


@pytest.mark.parametrize("connection", [b"", b"content-length, transfer-encoding", b"Host, X-Forwarded-For, te"])
def test_forward_headers_never_passes_framing_or_its_spellings(connection: bytes) -> None:
    upstream = build_upstreams({"default": UpstreamSpec(url="http://127.0.0.1:1")})["default"].members[0]
    spellings = [
        b"content-length", b"transfer-encoding", b"content_length", b"transfer_encoding", b"content.length",
        b"transfer.encoding", b"host", b"x_forwarded_host", b"x_real_ip", b"x_forwarded_for", b"keep_alive",
        b"x_regiongate_client_ip", b"connection",
    ]  # fmt: skip
    headers = [(b"connection", connection)] if connection else []
    headers += [(name, b"1") for name in spellings] + [(b"x-kept", b"yes"), (b"x_kept_too", b"yes")]
    out = forward_headers(headers, "127.0.0.1", GB_ADDRESS, upstream)
    names = [n for n, _ in out]
    assert [n for n in names if n.replace(b"_", b"-").replace(b".", b"-") in FRAMING | HOP_BY_HOP] == []
    assert names.count(b"x-forwarded-for") == 1 and names.count(b"x-regiongate-client-ip") == 1
    assert dict(out)[b"x-forwarded-for"] == b"127.0.0.1"  # the peer only: no spelling added to the chain
    assert b"x-kept" in names and b"x_kept_too" in names  # a spelling of nothing dropped is kept


def test_response_headers_drop_framing_spellings_and_the_gateways_own() -> None:
    raw = [
        (b"Connection", b"content-length, x-a"), (b"Content-Length", b"2"), (b"Transfer_Encoding", b"chunked"),
        (b"X-Regiongate-Policy", b"forged"), (b"x_regiongate_request_id", b"forged"), (b"X-A", b"1"),
        (b"Content-Type", b"application/json"),
    ]  # fmt: skip
    assert response_headers(raw) == [(b"content-type", b"application/json")]
