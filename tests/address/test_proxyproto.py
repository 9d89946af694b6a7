"""The PROXY protocol parser alone: what it accepts, what it refuses, and its bounds.

Properties: it raises nothing but :class:`ProxyProtocolError`, never holds or
asks for more than a header can be, never asks for a byte past the header's
end, and reads back every header it builds, however the bytes are split.
"""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dataplane.proxyproto import (
    MAX_V2,
    V1_MAX,
    V2_SIGNATURE,
    Parser,
    ProxyHeader,
    ProxyProtocolError,
    build_v1,
    build_v2,
    could_be_header,
)


def read_exactly(data: bytes, splits: list[int] | None = None) -> tuple[ProxyHeader, int]:
    """Feed as a careful reader does: at most ``want()`` bytes a read, fewer when ``splits`` says so."""
    parser, offset, i = Parser(), 0, 0
    while parser.header is None:
        want = parser.want()
        assert want >= 1
        if splits:
            want = max(1, min(want, splits[i % len(splits)]))
            i += 1
        chunk = data[offset : offset + want]
        if not chunk:
            raise EOFError
        offset += len(chunk)
        parser.feed(chunk)
    assert parser.rest == b""
    return parser.header, offset


# --- accepted ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"PROXY TCP4 127.0.0.77 127.0.0.1 51234 8443\r\n", ProxyHeader(1, "127.0.0.77", 51234, "127.0.0.1", 8443)),
        (b"PROXY TCP6 2001:db8::7 ::1 0 65535\r\n", ProxyHeader(1, "2001:db8::7", 0, "::1", 65535)),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(1)),
        (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", ProxyHeader(1)),
        (build_v2("192.0.2.9", 1, "192.0.2.1", 443), ProxyHeader(2, "192.0.2.9", 1, "192.0.2.1", 443)),
        (build_v2("2001:db8::9", 1, "2001:db8::1", 443), ProxyHeader(2, "2001:db8::9", 1, "2001:db8::1", 443)),
        (build_v2(None), ProxyHeader(2)),  # LOCAL: the balancer's own health check
        # PROXY with UNSPEC family, and AF_UNIX (216 bytes of paths): no IP address, the TCP peer stands.
        (V2_SIGNATURE + b"\x21\x00\x00\x00", ProxyHeader(2)),
        (V2_SIGNATURE + b"\x21\x31\x00\xd8" + b"\x00" * 216, ProxyHeader(2)),
        # TLVs after the addresses (AWS NLB's VPC endpoint id, type 0xEA) are skipped.
        (
            build_v2("192.0.2.9", 1, "192.0.2.1", 443, b"\xea\x00\x05\x01vpce"),
            ProxyHeader(2, "192.0.2.9", 1, "192.0.2.1", 443),
        ),
    ],
)
def test_accepted(raw: bytes, expected: ProxyHeader) -> None:
    assert read_exactly(raw + b"\x16\x03\x01 the TLS handshake") == (expected, len(raw))
    whole = Parser()
    assert whole.feed(raw + b"GET / HTTP/1.1\r\n") == expected
    assert whole.rest == b"GET / HTTP/1.1\r\n"


def test_v1_at_its_longest_is_accepted() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    longest = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()  # the spec's worst case
    assert len(longest) == V1_MAX
    assert read_exactly(longest)[0] == ProxyHeader(1)
    tcp6 = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert read_exactly(tcp6)[0].source == full
    with pytest.raises(ProxyProtocolError):
        read_exactly(longest[:-2] + b"f\r\n")


# --- refused ----------------------------------------------------------------------------------


def v2(ver_cmd: int, fam: int, block: bytes, length: int | None = None) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(block) if length is None else length) + block


ADDR4 = bytes(12)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # plain HTTP from a peer that must send a header
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello, ditto
        b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2\n",  # LF without CR
        b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2\r\r\n",
        b"PROXY TCP4 127.0.0.1  127.0.0.1 1 2\r\n",  # two spaces
        b"PROXY TCP4 127.0.0.1 127.0.0.1 1\r\n",  # a field short
        b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2 3\r\n",  # a field more
        b"PROXY TCP4 ::1 127.0.0.1 1 2\r\n",  # family mismatch
        b"PROXY TCP6 127.0.0.1 ::1 1 2\r\n",
        b"PROXY TCP4 127.0.0.01 127.0.0.1 1 2\r\n",  # leading zero
        b"PROXY TCP4 127.0.0.1 127.0.0.1 01 2\r\n",
        b"PROXY TCP4 127.0.0.1 127.0.0.1 65536 2\r\n",
        b"PROXY TCP4 127.0.0.1 127.0.0.1 -1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # a zone
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n",
        b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY unknown\r\n",
        b"PROXY UNKNOWN \x00\r\n",  # control bytes
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\xc3\xa9\r\n",
        b"PROXY\r\n",
        b"PROXYTCP4 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n",  # oversized v1
        b"\r\n\r\n\x00\r\nQUIX\n" + bytes(4),  # bad signature
        v2(0x11, 0x11, ADDR4),  # version 1 in a v2 header
        v2(0x31, 0x11, ADDR4),  # version 3
        v2(0x22, 0x11, ADDR4),  # command 2
        v2(0x21, 0x41, ADDR4),  # family 4
        v2(0x21, 0x13, ADDR4),  # transport 3
        v2(0x21, 0x11, bytes(11)),  # INET needs 12 bytes
        v2(0x21, 0x21, bytes(35)),  # INET6 needs 36
        v2(0x21, 0x31, bytes(215)),  # UNIX needs 216
        v2(0x21, 0x11, bytes(MAX_V2 - 16 + 1)),  # over the cap
        v2(0x21, 0x11, b"", length=0xFFFF),  # claims 64 KiB
    ],
)
def test_refused(raw: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        read_exactly(raw + b"\r\n" * 600)  # more than enough bytes: refused, not waiting
    with pytest.raises(ProxyProtocolError):
        Parser().feed(raw + b"\r\n" * 600)


@pytest.mark.parametrize(
    "raw",
    [b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2", b"PROXY ", b"P", build_v2("192.0.2.9", 1, "192.0.2.1", 443)[:-1]],
)
def test_truncated_waits_for_more(raw: bytes) -> None:
    """A header cut short is incomplete, not wrong: the caller's header timeout closes it."""
    with pytest.raises(EOFError):
        read_exactly(raw)


def test_v1_without_end_is_refused_at_the_spec_bound() -> None:
    parser = Parser()
    with pytest.raises(ProxyProtocolError, match="107"):
        for _ in range(200):
            parser.feed(b"PROXY UNKNOWN "[: parser.want()] if not parser._buf else b"x" * parser.want())
    assert len(parser._buf) <= V1_MAX


def test_could_be_header() -> None:
    assert could_be_header(b"PRO") and could_be_header(b"PROXY TCP4") and could_be_header(V2_SIGNATURE[:5])
    assert not could_be_header(b"POST /") and not could_be_header(b"GET") and not could_be_header(b"\r\nGET")
    assert not could_be_header(b"\x16\x03\x01")


# --- properties -------------------------------------------------------------------------------

v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(lambda a: str(ipaddress.IPv6Address(int(a))))
ports = st.integers(0, 65535)
tlvs = st.binary(max_size=MAX_V2 - 16 - 36)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    kind = draw(st.sampled_from(["v1", "v2", "v1-unknown", "v2-local"]))
    if kind == "v1-unknown":
        return build_v1(None), ProxyHeader(1)
    if kind == "v2-local":
        return build_v2(None, tlvs=draw(st.binary(max_size=64))), ProxyHeader(2)
    src = draw(st.one_of(v4, v6))
    dst = draw(v4 if ":" not in src else v6)
    sport, dport = draw(ports), draw(ports)
    if kind == "v1":
        return build_v1(src, sport, dst, dport), ProxyHeader(1, src, sport, dst, dport)
    return build_v2(src, sport, dst, dport, draw(tlvs)), ProxyHeader(2, src, sport, dst, dport)


@given(headers(), st.lists(st.integers(1, 40), min_size=1, max_size=20), st.binary(max_size=64))
@settings(max_examples=400, deadline=None)
def test_round_trip_split_anywhere_never_reads_past_the_header(
    built: tuple[bytes, ProxyHeader], splits: list[int], after: bytes
) -> None:
    raw, expected = built
    header, consumed = read_exactly(raw + after, splits)
    assert header == expected
    assert consumed == len(raw)


@given(st.binary(max_size=2048), st.lists(st.integers(1, 64), min_size=1, max_size=10))
@settings(max_examples=1000, deadline=None)
def test_any_bytes_raise_only_its_error_and_stay_bounded(data: bytes, splits: list[int]) -> None:
    parser, offset, i = Parser(), 0, 0
    try:
        while parser.header is None and offset < len(data):
            want = parser.want()
            assert 1 <= want <= MAX_V2
            take = max(1, min(want, splits[i % len(splits)]))
            i += 1
            parser.feed(data[offset : offset + take])
            offset += take
            assert offset <= MAX_V2  # never asks for more than a header may be
    except ProxyProtocolError:
        pass


@given(st.sampled_from([b"PROXY ", V2_SIGNATURE]), st.binary(max_size=1200))
@settings(max_examples=1000, deadline=None)
def test_header_shaped_bytes_raise_only_its_error(prefix: bytes, rest: bytes) -> None:
    with contextlib.suppress(ProxyProtocolError):
        Parser().feed(prefix + rest)
