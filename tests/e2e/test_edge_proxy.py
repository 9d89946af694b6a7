"""PROXY protocol on the proxy port: HAProxy in front for real, raw sockets for everything malformed.

All of it runs on loopback, so clients are told apart by source address:
HAProxy connects to the gateway from 127.0.0.1 (the only peer allowed to
send a header), test clients connect from 127.0.0.77, 127.0.0.88 and so on.
"""

from __future__ import annotations

import socket
import ssl
import struct
from pathlib import Path

import httpx
import pytest

from gateway.dataplane.proxyproto import MAX_V2, V2_SIGNATURE, build_v1, build_v2
from support.edge import LocalCA, client_context, haproxy_bin, run_haproxy, tls_connect
from support.processes import Gateway, GatewayFactory, Stub

BALANCER = ("--proxy-protocol-from", "127.0.0.1/32")
GET = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"
needs_haproxy = pytest.mark.skipif(haproxy_bin() is None, reason="haproxy is not installed (scripts/test installs it)")


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(source, 0))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the gateway closes the connection (a reset counts as closed)."""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def exchange(port: int, data: bytes | list[bytes], source: str = "127.0.0.1") -> bytes:
    """Send ``data`` (pieces sent one by one), ask to close, return the whole answer."""
    with connect(port, source) as s:
        for piece in [data] if isinstance(data, bytes) else data:
            s.sendall(piece)
        return read_all(s)


def closed_unanswered(port: int, data: bytes | list[bytes], source: str = "127.0.0.1") -> None:
    """The gateway closes the connection and writes not one byte (nothing was taken for HTTP)."""
    with connect(port, source) as s:
        for piece in [data] if isinstance(data, bytes) else data:
            try:
                s.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
        assert read_all(s) == b""


def served(gw: Gateway, source: str = "127.0.0.1") -> None:
    """The gateway still serves: a plain request from a peer outside the PROXY protocol CIDRs."""
    answer = exchange(gw.port, GET.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n"), source)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def close_after(request: bytes) -> bytes:
    return request.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)


def bad_reasons(gw: Gateway) -> dict[str, float]:
    out = {}
    for line in gw.metrics().splitlines():
        if line.startswith('regiongate_bad_requests_total{reason="proxy_protocol'):
            reason = line.split('"')[1]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


# --- through HAProxy --------------------------------------------------------------------------


@needs_haproxy
@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_haproxy_passes_the_client_address(gateway: GatewayFactory, stub: Stub, tmp_path: Path, send: str) -> None:
    gw = gateway("--upstream", stub.url, *BALANCER, "--trusted-proxy", "127.0.0.77/32")
    with run_haproxy(tmp_path, gw.port, send) as front:
        # 127.0.0.88 is nobody we trust: it is the client, whatever its X-Forwarded-For says.
        answer = exchange(
            front, close_after(GET.replace(b"host: x", b"host: x\r\nx-forwarded-for: 2.125.160.216")), "127.0.0.88"
        )
        assert answer.startswith(b"HTTP/1.1 200 ")
        # 127.0.0.77 is a trusted proxy: its X-Forwarded-For names the client.
        answer = exchange(
            front, close_after(GET.replace(b"host: x", b"host: x\r\nx-forwarded-for: 2.125.160.216")), "127.0.0.77"
        )
        assert answer.startswith(b"HTTP/1.1 ")
        # Keep-alive through the balancer: two requests on one connection, both from 127.0.0.99.
        with connect(front, "127.0.0.99") as s:
            s.sendall(GET)
            s.sendall(close_after(GET))
            assert read_all(s).count(b"HTTP/1.1 200 ") == 2
    lines = gw.wait_log(4)
    assert [(line["client"], line["client_via"]) for line in lines] == [
        ("127.0.0.88", "peer"),
        ("2.125.160.216", "x-forwarded-for"),
        ("127.0.0.99", "peer"),
        ("127.0.0.99", "peer"),
    ]
    # Straight to the gateway, not through HAProxy, from an address outside the CIDRs: served as itself.
    served(gw, "127.0.0.5")
    assert gw.wait_log(5)[-1]["client"] == "127.0.0.5"


@needs_haproxy
@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front_of_tls(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, send: str
) -> None:
    """HAProxy sends the PROXY header, then the client's own TLS handshake: the gateway takes both."""
    ca = LocalCA(tmp_path_factory.mktemp("ca"))
    leaf = ca.leaf("behind-haproxy", 77)
    gw = gateway("--upstream", stub.url, *BALANCER, "--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key))
    with run_haproxy(tmp_path, gw.port, send) as front:
        transport = httpx.HTTPTransport(verify=client_context(ca), local_address="127.0.0.77")
        with httpx.Client(transport=transport) as client:
            for _ in range(3):  # keep-alive: one handshake, three requests
                assert client.get(f"https://127.0.0.1:{front}/v1/models").status_code == 200
    assert [line["client"] for line in gw.wait_log(3)] == ["127.0.0.77"] * 3


# --- raw: a balancer's header, well formed --------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        build_v1("127.0.0.66", 40000, "127.0.0.1", 443),
        build_v2("127.0.0.66", 40000, "127.0.0.1", 443),
        build_v2("127.0.0.66", 40000, "127.0.0.1", 443, tlvs=b"\xea\x00\x05\x01vpce"),
        build_v2("::ffff:127.0.0.66", 40000, "::1", 443),  # judged as the IPv4 address it carries
    ],
    ids=["v1", "v2", "v2-tlv", "v2-mapped"],
)
def test_header_address_is_the_client(gateway: GatewayFactory, stub: Stub, header: bytes) -> None:
    gw = gateway("--upstream", stub.url, *BALANCER)
    assert exchange(gw.port, header + close_after(GET)).startswith(b"HTTP/1.1 200 ")
    # One byte a segment: the parser takes a header however it is cut.
    assert exchange(gw.port, [bytes([b]) for b in header] + [close_after(GET)]).startswith(b"HTTP/1.1 200 ")
    assert [line["client"] for line in gw.wait_log(2)] == ["127.0.0.66", "127.0.0.66"]


@pytest.mark.parametrize("header", [build_v1(None), build_v2(None)], ids=["v1-unknown", "v2-local"])
def test_no_address_means_the_tcp_peer(gateway: GatewayFactory, stub: Stub, header: bytes) -> None:
    gw = gateway("--upstream", stub.url, *BALANCER)
    assert exchange(gw.port, header + close_after(GET)).startswith(b"HTTP/1.1 200 ")
    assert gw.wait_log(1)[0]["client"] == "127.0.0.1"


def test_header_address_enters_the_trusted_proxy_logic(gateway: GatewayFactory, stub: Stub) -> None:
    """The TCP peer (the balancer) is trusted for X-Forwarded-For here; with a header, its address no longer counts."""
    gw = gateway("--upstream", stub.url, *BALANCER, "--trusted-proxy", "127.0.0.1/32", "--trusted-proxy", "10.1.0.0/16")
    spoof = close_after(GET.replace(b"host: x", b"host: x\r\nx-forwarded-for: 2.125.160.216"))
    exchange(gw.port, build_v2("127.0.0.66", 1, "127.0.0.1", 443) + spoof)
    exchange(gw.port, build_v2("10.1.2.3", 1, "127.0.0.1", 443) + spoof)  # an ingress we trust, behind the balancer
    exchange(gw.port, build_v2(None) + spoof)  # LOCAL: the balancer itself, which is trusted
    lines = gw.wait_log(3)
    assert [(line["client"], line["client_via"]) for line in lines] == [
        ("127.0.0.66", "peer"),
        ("2.125.160.216", "x-forwarded-for"),
        ("2.125.160.216", "x-forwarded-for"),
    ]


def glued_tls(port: int, ctx: ssl.SSLContext, first: bytes, request: bytes) -> bytes:
    """TLS over a socket whose first segment is ``first`` and the ClientHello together, via memory BIOs."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with connect(port) as s:
        pending = first
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                s.sendall(pending + outgoing.read())
                pending = b""
                data = s.recv(65536)
                assert data, "closed during the handshake"
                incoming.write(data)
        tls.write(request)
        s.sendall(outgoing.read())
        answer = b""
        while True:
            try:
                chunk = tls.read(65536)
                if not chunk:  # the gateway's close_notify
                    return answer
                answer += chunk
            except ssl.SSLWantReadError:
                data = s.recv(65536)
                if not data:
                    return answer
                incoming.write(data)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return answer


def test_header_and_client_hello_in_one_segment(
    gateway: GatewayFactory, stub: Stub, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Not one byte of the ClientHello is taken for the header: the gateway reads exactly the header's bytes."""
    ca = LocalCA(tmp_path_factory.mktemp("ca"))
    leaf = ca.leaf("glued", 78)
    gw = gateway("--upstream", stub.url, *BALANCER, "--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key))
    for header in (build_v1("127.0.0.66", 1, "127.0.0.1", 443), build_v2("127.0.0.67", 1, "127.0.0.1", 443)):
        answer = glued_tls(gw.port, client_context(ca), header, close_after(GET))
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
    assert [line["client"] for line in gw.wait_log(2)] == ["127.0.0.66", "127.0.0.67"]
    # A peer outside the CIDRs still gets TLS without a header.
    with tls_connect(gw.port, client_context(ca), "127.0.0.5") as s:
        s.sendall(close_after(GET))
        assert s.recv(100).startswith(b"HTTP/1.1 200 ")
    # A peer inside the CIDRs that starts TLS without a header: closed.
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        tls_connect(gw.port, client_context(ca)).close()
    # A header from a peer outside the CIDRs fails the handshake: closed, never HTTP.
    with socket.create_connection(("127.0.0.1", gw.port), source_address=("127.0.0.5", 0)) as raw:
        raw.sendall(build_v1("127.0.0.66", 1, "127.0.0.1", 443) + GET)
        assert b"HTTP/1.1" not in read_all(raw)


# --- raw: refused -----------------------------------------------------------------------------


def v2(ver_cmd: int, fam: int, block: bytes, length: int | None = None) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(block) if length is None else length) + block


REFUSED = {
    "plain HTTP from the balancer": (GET, "proxy_protocol_missing"),
    "TLS hello without a header": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", "proxy_protocol_missing"),
    "v1 LF without CR": (b"PROXY TCP4 127.0.0.66 127.0.0.1 1 2\n" + GET, "proxy_protocol_malformed"),
    "v1 bad address": (b"PROXY TCP4 127.0.0.666 127.0.0.1 1 2\r\n" + GET, "proxy_protocol_malformed"),
    "v1 family mismatch": (b"PROXY TCP6 127.0.0.66 127.0.0.1 1 2\r\n" + GET, "proxy_protocol_malformed"),
    "v1 oversized": (b"PROXY UNKNOWN " + b"a" * 200 + b"\r\n" + GET, "proxy_protocol_malformed"),
    "v1 never ends": (b"PROXY TCP4 " + b"1" * 5000, "proxy_protocol_malformed"),
    "v2 bad signature": (b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + bytes(12) + GET, "proxy_protocol_malformed"),
    "v2 version 1": (v2(0x11, 0x11, bytes(12)) + GET, "proxy_protocol_malformed"),
    "v2 command 15": (v2(0x2F, 0x11, bytes(12)) + GET, "proxy_protocol_malformed"),
    "v2 family 5": (v2(0x21, 0x51, bytes(12)) + GET, "proxy_protocol_malformed"),
    "v2 short for INET6": (v2(0x21, 0x21, bytes(12)) + GET, "proxy_protocol_malformed"),
    "v2 oversized": (v2(0x21, 0x11, bytes(MAX_V2)) + GET, "proxy_protocol_malformed"),
    "v2 claims 64 KiB": (v2(0x21, 0x11, bytes(12), length=0xFFFF) + bytes(70000), "proxy_protocol_malformed"),
}


def test_malformed_headers_close_the_connection(gateway: GatewayFactory, stub: Stub) -> None:
    gw = gateway("--upstream", stub.url, *BALANCER)
    expected: dict[str, float] = {}
    for name, (data, reason) in REFUSED.items():
        closed_unanswered(gw.port, data)
        expected[reason] = expected.get(reason, 0) + 1
        served(gw, "127.0.0.5")  # and everyone else is still served
        assert bad_reasons(gw) == expected, name
    assert gw.proc.poll() is None
    assert stub.stats()["requests"] == len(REFUSED)  # only the "still served" requests reached it


def test_truncated_header_is_closed_at_the_header_timeout(gateway: GatewayFactory, stub: Stub) -> None:
    gw = gateway("--upstream", stub.url, *BALANCER, "--header-timeout", "1")
    for partial in (
        build_v1("127.0.0.66", 1, "127.0.0.1", 2)[:-3],
        build_v2("127.0.0.66", 1, "127.0.0.1", 2)[:20],
        b"",
    ):
        with connect(gw.port) as s:
            s.sendall(partial)
            assert read_all(s) == b""  # the gateway closed it; the client never did
    assert bad_reasons(gw) == {"proxy_protocol_timeout": 3}
    served(gw, "127.0.0.5")


@pytest.mark.parametrize(
    "data",
    [
        build_v1("127.0.0.66", 1, "127.0.0.1", 2) + GET,
        build_v2("127.0.0.66", 1, "127.0.0.1", 2) + GET,
        build_v1(None) + GET,
        [b"PRO", b"XY TCP4 1.2.3.4 ", b"5.6.7.8 1 2\r\n" + GET],
        [V2_SIGNATURE[:3], V2_SIGNATURE[3:]],
    ],
    ids=["v1", "v2", "v1-unknown", "v1-split", "v2-split"],
)
def test_header_from_anyone_else_is_refused(gateway: GatewayFactory, stub: Stub, data: bytes | list[bytes]) -> None:
    gw = gateway("--upstream", stub.url, *BALANCER)
    closed_unanswered(gw.port, data, source="127.0.0.5")
    assert bad_reasons(gw) == {"proxy_protocol_unexpected": 1}
    assert stub.stats()["requests"] == 0
    # Plain HTTP from the same peer is served, methods beginning with P included, cut anywhere.
    served(gw, "127.0.0.5")
    post = b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
    assert exchange(gw.port, [post[:1], post[1:3], post[3:]], "127.0.0.5").startswith(b"HTTP/1.1 200 ")
    assert gw.wait_log(2)[-1]["client"] == "127.0.0.5"


def test_options_are_checked_at_startup(gateway: GatewayFactory, stub: Stub) -> None:
    for args, message in [
        (("--proxy-protocol-from", "10.0.0.5/8"), "--proxy-protocol-from: "),
        (("--proxy-protocol-from", "0.0.0.0/0"), "every public address could then say where its connection came from"),
    ]:
        gw = gateway("--upstream", stub.url, *args, wait=False)
        assert gw.proc.wait(timeout=30) != 0
        err = gw.stderr().strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    gw = gateway("--upstream", stub.url, env={"REGIONGATE_PROXY_PROTOCOL_FROM": "10.9.0.0/16, 127.0.0.1/32"})
    assert "PROXY protocol v1/v2 required from 10.9.0.0/16, 127.0.0.1/32" in gw.stderr()
    assert exchange(gw.port, build_v2("127.0.0.66", 1, "127.0.0.1", 2) + close_after(GET)).startswith(b"HTTP/1.1 200")
