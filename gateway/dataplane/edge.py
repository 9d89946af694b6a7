"""What happens on a proxy connection before HTTP: the PROXY protocol header, then TLS.

Off by default, and then none of this runs: the listener hands every
connection straight to :class:`~.server.ClientConnection`. With
``--tls-cert`` or ``--proxy-protocol-from``, each connection starts in a
:class:`Gate`, counted against the connection cap from its first moment
(a connection over the cap is closed at once), which reads the PROXY
header if one is due, then puts asyncio's TLS layer (its handshake bounded
by ``--header-timeout``, with the newest certificate) in front of the HTTP
server:

- a peer inside the CIDRs (the load balancer) must open with a PROXY header,
  v1 or v2 (:mod:`.proxyproto`), whole within ``--header-timeout``; the
  gate reads exactly the header's bytes and no more, so what follows (the
  client's TLS handshake, as HAProxy and cloud balancers send it, or its
  HTTP) reaches the next layer untouched. The header's address replaces
  the TCP peer as the address the client-address logic starts from, so
  ``X-Forwarded-For`` counts only if *that* address is a trusted proxy.
  LOCAL (v2), UNKNOWN (v1) and addresses that are not IP (UNSPEC, UNIX)
  keep the TCP peer. No header, or a malformed one, closes the connection.
- any other peer is served as without the option, except that a connection
  that opens with a PROXY header is closed: nobody else may say where a
  connection came from. (With TLS on, such bytes fail the TLS handshake.)

Refusals are counted in ``regiongate_bad_requests`` with a ``proxy_protocol_*``
reason and logged at most once a second, without addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
from asyncio import sslproto
from dataclasses import dataclass, field
from typing import Any, cast

from ..cidrs import CidrSet
from ..clientip import normalize
from .proxyproto import V1_PREFIX, V2_SIGNATURE, Parser, ProxyProtocolError, could_be_header
from .server import ClientConnection, Listener
from .tls import Certificates

_SNIFF = 16  # bytes enough to tell a PROXY header (v2 signature: 12) from HTTP
# A TLS connection being closed (idle, drained) waits this long for the client's close_notify
# before the socket is dropped: asyncio's default is 30 s, a descriptor held for a client that
# no longer reads.
_TLS_SHUTDOWN = 5.0


@dataclass(frozen=True, slots=True)
class Edge:
    """TLS certificates, and the peers that must send a PROXY header (``None``: nobody)."""

    tls: Certificates | None = None
    proxy_from: CidrSet | None = None
    # Connections still in a gate (header, handshake): they hold descriptors, so they count
    # against the listener's connection cap like the connections it serves.
    pending: set[Gate] = field(default_factory=set, compare=False)

    async def serve(self, listener: Listener, sock: Any) -> asyncio.AbstractServer:
        return await listener.loop.create_server(lambda: Gate(listener, self), sock=sock, backlog=2048)

    def tick(self) -> None:
        """Once a second (the listener's sweep): pick up renewed certificate files."""
        if self.tls is not None:
            self.tls.refresh()

    def must_send_header(self, peer: str | None) -> bool:
        if peer is None or self.proxy_from is None:
            return False
        try:
            ip = normalize(ipaddress.ip_address(peer.partition("%")[0]))
        except ValueError:
            return False
        return ip in self.proxy_from


class Gate(asyncio.BufferedProtocol):
    """A connection until its PROXY header is read (or it is seen not to start with one)."""

    __slots__ = ("_buf", "_header", "_sniffed", "_timer", "edge", "listener", "peer", "transport")

    def __init__(self, listener: Listener, edge: Edge) -> None:
        self.listener = listener
        self.edge = edge
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self._header: Parser | None = None
        self._sniffed = b""
        self._buf = bytearray(_SNIFF)
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        listener, pending = self.listener, self.edge.pending
        if listener.draining or len(listener.connections) + len(pending) >= listener.cap:
            transport.abort()  # over the cap before a word could be said (TLS, if on, is not up yet)
            return
        pending.add(self)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else None
        limits = listener.limits
        if self.edge.must_send_header(self.peer):
            self._header = Parser()
            self._timer = self.listener.loop.call_later(limits.header_timeout, self._timed_out)
        elif self.edge.tls is not None:
            self._upgrade(self.peer)
        else:
            self._timer = self.listener.loop.call_later(limits.idle_timeout, self._timed_out)

    def get_buffer(self, sizehint: int) -> memoryview:
        parser = self._header
        if parser is not None:
            # Exactly what the header may still hold: never a byte of what follows it.
            return memoryview(self._buf)[: min(parser.want(), _SNIFF)]
        return memoryview(self._buf)[: _SNIFF - len(self._sniffed)]

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(self._buf[:nbytes])
        if self._header is not None:
            self._read_header(self._header, data)
        else:
            self._sniff(data)

    def _read_header(self, parser: Parser, data: bytes) -> None:
        self._sniffed = self._sniffed or data[:1]  # the first byte: which refusal it was
        try:
            header = parser.feed(data)
        except ProxyProtocolError:
            started = self._sniffed in (V1_PREFIX[:1], V2_SIGNATURE[:1])
            self._refuse("proxy_protocol_malformed" if started else "proxy_protocol_missing")
            return
        if header is None:
            return
        self._stop_timer()
        self._upgrade(header.source or self.peer, parser.rest)

    def _sniff(self, data: bytes) -> None:
        self._sniffed += data
        if could_be_header(self._sniffed):
            if len(self._sniffed) >= len(V2_SIGNATURE) or self._sniffed.startswith(V1_PREFIX):
                self._refuse("proxy_protocol_unexpected")
            return
        self._stop_timer()
        self._hand_over(cast(asyncio.Transport, self.transport), self.peer, self._sniffed)

    def _upgrade(self, address: str | None, rest: bytes = b"") -> None:
        """Go on to TLS (if on) or straight to HTTP, with ``address`` as the connection's peer.

        The TLS layer is put in place synchronously, before this callback returns, so no
        byte of the handshake can reach anyone else (asyncio's ``start_tls`` would take over
        a loop turn later, and uvloop starts reading a new connection after ``connection_made``).
        """
        transport = self.transport
        assert transport is not None
        if self.edge.tls is None:
            self._hand_over(transport, address, rest)
            return
        loop = self.listener.loop
        waiter = loop.create_future()
        waiter.add_done_callback(self._handshake_over)
        tls = _ssl_protocol(loop)(
            loop,
            _Handover(self, address),
            self.edge.tls.current,
            waiter,
            server_side=True,
            ssl_handshake_timeout=self.listener.limits.header_timeout,
            ssl_shutdown_timeout=_TLS_SHUTDOWN,
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)
        if rest:
            _feed(tls, rest)

    def _handshake_over(self, waiter: asyncio.Future[None]) -> None:
        self.edge.pending.discard(self)
        if not waiter.cancelled():
            waiter.exception()  # a failed handshake closed its connection: expected, not an error to report

    def _hand_over(self, transport: asyncio.Transport, address: str | None, data: bytes = b"") -> None:
        self.edge.pending.discard(self)
        conn = ClientConnection(self.listener)
        transport.set_protocol(conn)
        conn.connection_made(transport)
        conn.peer = address
        if data and not conn.closed:
            conn.data_received(data)

    def _refuse(self, reason: str) -> None:
        self._stop_timer()
        self.listener.bad_request(reason)
        if self.transport is not None:
            self.transport.abort()

    def _timed_out(self) -> None:
        self._timer = None
        if self._header is not None:
            self._refuse("proxy_protocol_timeout")
        elif self.transport is not None:
            self.transport.abort()  # opened and said nothing

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def eof_received(self) -> bool | None:
        return None  # the connection ended before it said anything we could serve

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        self.edge.pending.discard(self)
        self.transport = None


class _Handover(asyncio.Protocol):
    """The TLS layer's first application protocol: at the end of the handshake, the connection's own."""

    def __init__(self, gate: Gate, address: str | None) -> None:
        self.gate, self.address = gate, address

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.gate._hand_over(cast(asyncio.Transport, transport), self.address)

    def connection_lost(self, exc: Exception | None) -> None:
        pass  # the handshake failed: nothing was handed over


def _ssl_protocol(loop: asyncio.AbstractEventLoop) -> Any:
    """The TLS protocol class of this loop (asyncio's or uvloop's; both take the same arguments).

    It is what ``create_server(ssl=...)`` and ``start_tls`` use inside; used here directly
    so that the TLS layer takes the connection over in the same callback as the PROXY header.
    """
    if type(loop).__module__.startswith("uvloop"):
        from uvloop.loop import SSLProtocol  # type: ignore[attr-defined]

        return SSLProtocol
    return sslproto.SSLProtocol


def _feed(protocol: Any, data: bytes) -> None:
    """Bytes read before ``protocol`` took the connection over, given to it as a read would."""
    while data:
        buf = protocol.get_buffer(len(data))
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        protocol.buffer_updated(n)
        data = data[n:]
