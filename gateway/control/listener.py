"""The control plane's listener: its own thread and event loop, and bounds on what a peer can make it hold.

The proxy's event loop serves model traffic and nothing else. uvicorn and
FastAPI run on a second event loop, in a thread of the same process, so that
reading, parsing and answering an admin request (a 1 MiB candidate policy,
the OpenAPI document, a metrics exposition, a diff over a large probe space)
holds the proxy back only for the interpreter's thread switch interval (5 ms)
at a time, when both want the CPU, never for the length of the admin call. What an admin route
reads or changes on the proxy's side (the override store and its Redis
connection, the live reloader, the geo lookup cache) runs there through
:class:`ProxyLoop`, as calls as short as the proxy's own work.

What one peer can make the control plane hold, each bounded before memory or
descriptors grow with the input:

- connections: at most :data:`MAX_CONNECTIONS`, accepted one at a time,
  within the descriptors ``dataplane.limits`` keeps back from the proxy port
  (``FD_RESERVE``). At the cap the connection idle longest is closed to make
  room (so 300 idle connections cannot keep a probe out), and with none idle
  the newcomer gets a 503;
- a request head: at most :data:`MAX_HEAD` bytes (more is a 400 from h11) and
  complete within the header timeout of the connection or of its first byte;
- an idle keep-alive connection: closed after the idle timeout;
- every path but the probes needs the admin bearer token, checked on the
  request head before any byte of the body is read; a body is at most
  :data:`~gateway.control.gate.MAX_BODY` bytes (``Content-Length`` checked up
  front, a chunked one counted as it streams: 413), and must arrive within the
  header timeout (408): :mod:`gateway.control.gate`, in front of the app.
  A refusal closes the connection, so an unread body is never drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from ..dataplane.limits import FD_RESERVE

log = logging.getLogger("regiongate")

# Of the 64 descriptors kept back from the proxy port, about 30 go to the
# interpreter, both event loops, the listening sockets, the access log, the
# geo databases, Redis and the metrics files; 24 connections (plus the one
# being accepted) fit in the rest, for probes, scrapes and an operator.
MAX_CONNECTIONS = 24
assert MAX_CONNECTIONS + 32 < FD_RESERVE
MAX_HEAD = 64 * 1024  # request line and headers, as on the proxy port
# When accept() itself fails (the process's file limit reached by something else), retry after this long.
_ACCEPT_RETRY = 0.1


# --- the connection: uvicorn's h11 protocol with a head deadline and an eviction order ---


class ControlConfig(uvicorn.Config):
    def __init__(self, app: Any, *, header_timeout: float, max_connections: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections


# When each connection last became idle, as a sequence rather than a clock: no two are ever equal.
_IDLE_ORDER = itertools.count()


class ControlProtocol(H11Protocol):
    """One control-plane connection: its request head must come whole within the header timeout.

    uvicorn closes a keep-alive connection that stays silent (``timeout_keep_alive``)
    but not one that never speaks, nor one that trickles a head; this one does.
    """

    config: ControlConfig

    def __init__(
        self,
        config: ControlConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.head_deadline: asyncio.TimerHandle | None = None
        self.idle_since = next(_IDLE_ORDER)

    def busy(self) -> bool:
        """A request is in flight (its head is in, its response not yet all written)."""
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.busy():
            self._disarm()
        elif self.head_deadline is None and self.timeout_keep_alive_task is None:
            self._arm()  # the first bytes of a request after a keep-alive pause

    def on_response_complete(self) -> None:
        self.idle_since = next(_IDLE_ORDER)
        self._disarm()  # from here uvicorn's keep-alive timeout governs
        super().on_response_complete()
        if self.busy():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def close(self) -> None:
        """Close now (evicted or timed out); a request in flight is abandoned."""
        self.connections.discard(self)  # counted out at once, not when the loop gets to connection_lost
        self._disarm()
        if not self.transport.is_closing():
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self.head_deadline = self.loop.call_later(self.config.header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_too_slow(self) -> None:
        self.head_deadline = None
        if not self.busy():
            self.close()


# --- accepting: one at a time, within the cap ------------------------------------------

_FULL = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class Acceptor:
    """Accepts on the control-plane socket one connection at a time, never holding more than the cap.

    An ``asyncio`` server accepts whatever the backlog holds in one go, each
    one a descriptor, before any protocol code can count them; so this loop
    accepts, makes room (closing the connection idle longest) or refuses,
    and only then accepts the next.
    """

    def __init__(
        self, sock: socket.socket, factory: Callable[[], ControlProtocol], state: ServerState, cap: int
    ) -> None:
        self.sock = sock
        self.factory = factory
        self.state = state
        self.cap = cap
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.sock.setblocking(False)  # asyncio's sock_accept needs it (uvloop copes either way)
        self.task = asyncio.get_running_loop().create_task(self._accept())

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def wait_closed(self) -> None:
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def make_room(self) -> bool:
        """True once a new connection fits: the idle one waiting longest is closed if need be."""
        if len(self.state.connections) < self.cap:
            return True
        idle = [c for c in self.state.connections if isinstance(c, ControlProtocol) and not c.busy()]
        if not idle:
            return False
        min(idle, key=lambda c: c.idle_since).close()
        return True

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        complained = False
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                if not complained:
                    log.warning("control plane: cannot accept a connection: %s", e.strerror)
                    complained = True
                await asyncio.sleep(_ACCEPT_RETRY)
                continue
            complained = False
            if not self.make_room():
                with contextlib.suppress(OSError):
                    conn.send(_FULL)
                conn.close()
                continue
            try:
                await loop.connect_accepted_socket(self.factory, conn)
            except OSError:
                conn.close()
            # Let the transports closed above release their descriptors before the next accept.
            await asyncio.sleep(0)


class ControlServer(uvicorn.Server):
    """uvicorn, with its own accept loop, in a thread that leaves signals to the proxy's."""

    config: ControlConfig

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        assert sockets, "the control plane serves the socket bound before the fork"
        await self.lifespan.startup()
        config = self.config
        loop = asyncio.get_running_loop()

        def protocol() -> ControlProtocol:
            return ControlProtocol(config, self.server_state, self.lifespan.state, loop)

        acceptors = [Acceptor(sock, protocol, self.server_state, config.max_connections) for sock in sockets]
        for a in acceptors:
            a.start()
        self.servers = acceptors  # type: ignore[assignment]  # close() and wait_closed() are all uvicorn uses
        self.started = True


class ControlPlane:
    """The control-plane server on its own thread and loop; started and stopped from the proxy's."""

    def __init__(
        self,
        app: ASGIApp,
        sock: socket.socket,
        *,
        header_timeout: float,
        idle_timeout: float,
        log_level: str,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        config = ControlConfig(
            app,
            header_timeout=header_timeout,
            max_connections=max_connections,
            loop="none",
            http=ControlProtocol,
            h11_max_incomplete_event_size=MAX_HEAD,
            lifespan="off",
            access_log=False,
            log_level=log_level,
            proxy_headers=False,  # the gateway does its own, stricter reading of forwarding headers
            server_header=False,
            timeout_keep_alive=max(1, round(idle_timeout)),
            timeout_graceful_shutdown=10,
        )
        self.server = ControlServer(config)
        self.sock = sock
        self._thread = threading.Thread(target=self._run, name="regiongate-control", daemon=True)
        self._ended: Callable[[], None] = lambda: None

    def start(self, ended: Callable[[], None]) -> None:
        """Serve; ``ended`` is called (from the control plane's thread) when it stops, for whatever reason."""
        self._ended = ended
        self._thread.start()

    def stop(self) -> None:
        self.server.should_exit = True  # read by uvicorn's main loop every 0.1 s

    async def wait(self) -> None:
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        # Signals are the proxy loop's business: this thread never takes one.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        try:
            try:
                import uvloop

                uvloop.run(self.server.serve([self.sock]))
            except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
                asyncio.run(self.server.serve([self.sock]))
        except BaseException:
            log.exception("the control plane stopped")
        finally:
            self._ended()
