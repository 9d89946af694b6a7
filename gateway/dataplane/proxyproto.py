"""The PROXY protocol header (v1 text, v2 binary) a load balancer sends before the client's bytes.

A pure, incremental parser: :meth:`Parser.feed` takes bytes as they arrive
and returns the header once it is whole. It never holds more than a header
can be (v1: 107 bytes, the spec's own bound; v2: :data:`MAX_V2` bytes, a
cap of ours), and :meth:`Parser.want` says how many more bytes may be read
without reading past the header. That matters: with TLS on, the bytes after
the header are the client's TLS handshake, which must reach the TLS layer
untouched, so the caller reads exactly what ``want`` allows.

Anything that is not a well-formed header raises :class:`ProxyProtocolError`
and nothing else. What the parser accepts (spec: haproxy's
``doc/proxy-protocol.txt``):

- v1 ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n``, single spaces,
  addresses of the named family, ports 0-65535 without leading zeros;
  ``PROXY UNKNOWN ...\\r\\n`` (anything up to the CRLF) means "no address".
- v2 version 2, command LOCAL (no address: a health check of the balancer's
  own) or PROXY; family UNSPEC, INET, INET6 or UNIX; TLVs after the address
  are skipped. UNSPEC and UNIX carry no IP address.

A header with no IP address (:attr:`ProxyHeader.source` ``None``) means: the
client is the TCP peer, as without a header.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's bound, CRLF included: "PROXY TCP6 " + two full IPv6 + two ports
V1_MIN = 15  # b"PROXY UNKNOWN\r\n"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length
# Our cap on a whole v2 header: addresses (at most 216 bytes, AF_UNIX) plus TLVs. AWS NLB,
# GCP and HAProxy send well under 300; a peer that sends more is refused, not buffered.
MAX_V2 = 1024

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_V2_FAMILIES = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}  # family -> bytes of its address block
# Minimum whole v1 header once its protocol is known: "PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n".
_V1_MIN_BY_PROTO = {b"TCP4": 32, b"TCP6": 22}


class ProxyProtocolError(ValueError):
    """Bytes that are not a PROXY protocol header this gateway accepts."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the header said: the client's address and port, or ``None`` for "use the TCP peer"."""

    version: int
    source: str | None = None
    source_port: int = 0
    destination: str | None = None
    destination_port: int = 0


class Parser:
    """Feed bytes in; get a :class:`ProxyHeader` once, or a :class:`ProxyProtocolError`.

    Bytes fed past the end of the header are returned by :attr:`rest`; a
    caller that reads only :meth:`want` bytes at a time never has any.
    """

    __slots__ = ("_buf", "header", "rest")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.header: ProxyHeader | None = None
        self.rest = b""

    def want(self) -> int:
        """How many more bytes may be read without reading past the header (at least 1 until done)."""
        buf = self._buf
        n = len(buf)
        if self.header is not None:
            return 0
        if n < 1 or buf[0] == V1_PREFIX[0]:
            return self._v1_want(n)
        if n < V2_FIXED:
            return V2_FIXED - n
        return V2_FIXED + (buf[14] << 8 | buf[15]) - n

    def _v1_want(self, n: int) -> int:
        buf = self._buf
        least = V1_MIN
        if n >= 10:
            least = _V1_MIN_BY_PROTO.get(bytes(buf[6:10]), V1_MIN)
        until_crlf = 1 if n and buf[-1] == 0x0D else 2
        return min(max(least - n, until_crlf), V1_MAX - n)

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Take more bytes; the header once it is whole, ``None`` while more are needed."""
        if self.header is not None:
            self.rest += data
            return self.header
        buf = self._buf
        start = len(buf)
        buf += data
        if not buf:
            return None
        if buf[0] == V1_PREFIX[0]:
            return self._v1(start)
        if buf[0] == V2_SIGNATURE[0]:
            return self._v2()
        raise ProxyProtocolError("not a PROXY protocol header")

    # --- v1 ----------------------------------------------------------------------------------

    def _v1(self, start: int) -> ProxyHeader | None:
        buf = self._buf
        head = bytes(buf[: len(V1_PREFIX)])
        if not V1_PREFIX.startswith(head):
            raise ProxyProtocolError("not a PROXY protocol header")
        # Only the new bytes need looking at for the end (a CR may end the bytes before them).
        end = buf.find(b"\n", max(start - 1, 0))
        if end < 0:
            if len(buf) >= V1_MAX:
                raise ProxyProtocolError(f"v1 header longer than {V1_MAX} bytes")
            if b"\r" in buf[:-1]:
                raise ProxyProtocolError("v1 header: CR not followed by LF")
            return None
        if end + 1 > V1_MAX:
            raise ProxyProtocolError(f"v1 header longer than {V1_MAX} bytes")
        if end == 0 or buf[end - 1] != 0x0D:
            raise ProxyProtocolError("v1 header: LF without CR")
        line = bytes(buf[: end - 1])
        if not line.isascii() or any(c < 0x20 or c == 0x7F for c in line):
            raise ProxyProtocolError("v1 header: control or non-ASCII bytes")
        self.rest = bytes(buf[end + 1 :])
        self._buf = bytearray()
        self.header = parse_v1_line(line)
        return self.header

    # --- v2 ----------------------------------------------------------------------------------

    def _v2(self) -> ProxyHeader | None:
        buf = self._buf
        n = len(buf)
        if not V2_SIGNATURE.startswith(bytes(buf[: len(V2_SIGNATURE)])):
            raise ProxyProtocolError("v2 header: bad signature")
        if n < V2_FIXED:
            return None
        length = V2_FIXED + (buf[14] << 8 | buf[15])
        if length > MAX_V2:
            raise ProxyProtocolError(f"v2 header of {length} bytes is over the {MAX_V2}-byte cap")
        _check_v2_fixed(buf[12], buf[13], length)
        if n < length:
            return None
        block = bytes(buf[V2_FIXED:length])
        self.rest = bytes(buf[length:])
        self._buf = bytearray()
        self.header = _v2_addresses(buf[12] & 0x0F, buf[13] >> 4, block)
        return self.header


def _check_v2_fixed(ver_cmd: int, fam: int, length: int) -> None:
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"v2 header: version {ver_cmd >> 4}, not 2")
    if ver_cmd & 0x0F not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"v2 header: unknown command {ver_cmd & 0x0F}")
    family, transport = fam >> 4, fam & 0x0F
    if family not in _V2_FAMILIES or transport > 2:
        raise ProxyProtocolError(f"v2 header: unknown address family/transport 0x{fam:02x}")
    if ver_cmd & 0x0F == _V2_PROXY and length - V2_FIXED < _V2_FAMILIES[family]:
        raise ProxyProtocolError("v2 header: shorter than its address family's addresses")


def _v2_addresses(command: int, family: int, block: bytes) -> ProxyHeader:
    if command == _V2_LOCAL or family in (0x0, 0x3):  # LOCAL, UNSPEC, UNIX: no IP address
        return ProxyHeader(2)
    if family == 0x1:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", block)
        return ProxyHeader(2, str(ipaddress.IPv4Address(src)), sport, str(ipaddress.IPv4Address(dst)), dport)
    src, dst, sport, dport = struct.unpack_from("!16s16sHH", block)
    return ProxyHeader(2, str(ipaddress.IPv6Address(src)), sport, str(ipaddress.IPv6Address(dst)), dport)


def parse_v1_line(line: bytes) -> ProxyHeader:
    """A v1 header without its CRLF."""
    parts = line.split(b" ")
    if len(parts) < 2 or parts[0] != b"PROXY":
        raise ProxyProtocolError("v1 header: malformed")
    proto = parts[1]
    if proto == b"UNKNOWN":
        return ProxyHeader(1)
    if proto not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyProtocolError("v1 header: expected TCP4, TCP6 or UNKNOWN and four fields")
    version = 4 if proto == b"TCP4" else 6
    src, dst = (_v1_address(p, version) for p in parts[2:4])
    sport, dport = (_v1_port(p) for p in parts[4:6])
    return ProxyHeader(1, src, sport, dst, dport)


def _v1_address(raw: bytes, version: int) -> str:
    try:
        text = raw.decode("ascii")
        ip = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except (UnicodeDecodeError, ValueError):
        raise ProxyProtocolError(f"v1 header: not an IPv{version} address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ProxyProtocolError("v1 header: an address with a zone")
    return str(ip)


def _v1_port(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 5 or (raw[0] == 0x30 and len(raw) > 1):
        raise ProxyProtocolError("v1 header: bad port")
    port = int(raw)
    if port > 65535:
        raise ProxyProtocolError("v1 header: bad port")
    return port


def could_be_header(prefix: bytes) -> bool:
    """Whether bytes a connection opened with are, or may become, a PROXY protocol header."""
    n = min(len(prefix), len(V2_SIGNATURE))
    return V1_PREFIX.startswith(prefix[: len(V1_PREFIX)]) or V2_SIGNATURE[:n] == prefix[:n]


def build_v1(source: str | None, source_port: int = 0, destination: str = "", destination_port: int = 0) -> bytes:
    """A v1 header (``UNKNOWN`` without a source): for tests and tools."""
    if source is None:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP4" if ipaddress.ip_address(source).version == 4 else "TCP6"
    return f"PROXY {proto} {source} {destination} {source_port} {destination_port}\r\n".encode()


def build_v2(
    source: str | None,
    source_port: int = 0,
    destination: str = "",
    destination_port: int = 0,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 header (``LOCAL`` without a source): for tests and tools."""
    if source is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source_port, destination_port) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(block)) + block
