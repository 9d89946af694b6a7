"""The upstream side: one keep-alive pool per upstream URL, TLS with verification.

A connection is handed to one relay at a time and comes back when its
response was read to the end and the upstream did not ask to close. Idle
connections are closed before the upstream's own keep-alive timeout would
close them under a request (``Limits.upstream_idle``); the number of
connections per upstream is bounded, and requests beyond the bound wait for
one to come back (their first-byte timeout runs while they wait).

One request, one response: bytes after the final response to a request
(a second response in the same read, or anything while the connection is
idle) close the connection, and are never passed on as an answer to
anything. A pooled connection cannot be desynchronised by an upstream that
says more than it was asked.

TLS is ``ssl``'s default context: certificates are verified against the
system store (or ``SSL_CERT_FILE``) and the host name is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Callable, Collection
from typing import Protocol, cast

import httptools

from .health import Health
from .limits import Limits
from .timers import Wheel
from .upstream import Upstream


class ConnectTimeout(Exception):
    """TCP or TLS connect to the upstream did not finish in time."""


class _Extra(Exception):
    """A message began after the final response to the request on this connection."""


class Receiver(Protocol):
    """What an upstream connection reports to the relay that is using it."""

    def upstream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    def upstream_body(self, data: bytes) -> None: ...
    def upstream_complete(self) -> None: ...
    def upstream_fed(self) -> None: ...
    def upstream_lost(self, error: Exception | None) -> None: ...
    def upstream_write_paused(self, paused: bool) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One socket to an upstream; its response parser reports to the current receiver."""

    __slots__ = (
        "_answered",
        "_headers",
        "_in_head",
        "_reusable",
        "_status",
        "closed",
        "counted",
        "got_bytes",
        "idle_since",
        "in_idle",
        "parser",
        "pool",
        "receiver",
        "reused",
        "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.receiver: Receiver | None = None
        self.reused = False
        self.counted = True  # holds one of the pool's slots
        self.in_idle = False
        self.idle_since = 0.0
        self.got_bytes = False
        self.closed = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_head = True
        self._status = 0
        self._reusable = False
        self._answered = False  # the request written last has had its final response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=self.pool.limits.write_high_water)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        receiver, self.receiver = self.receiver, None
        self.pool.uncount(self)
        if receiver is not None:
            receiver.upstream_lost(exc)

    def eof_received(self) -> bool | None:
        return False  # close; a response still being read is ended by connection_lost

    def data_received(self, data: bytes) -> None:
        receiver = self.receiver
        if receiver is None:
            self.abort()  # bytes nobody asked for: this connection cannot be trusted again
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self._answered:  # more after the answer: pass on the answer, never reuse the connection
                self._reusable = False
                if self.receiver is receiver:
                    receiver.upstream_fed()
                self.abort()
                return
            if self.receiver is receiver:
                self.receiver = None
                self.abort()
                receiver.upstream_lost(e)
            return
        receiver.upstream_fed()

    def pause_writing(self) -> None:
        if self.receiver is not None:
            self.receiver.upstream_write_paused(True)

    def resume_writing(self) -> None:
        if self.receiver is not None:
            self.receiver.upstream_write_paused(False)

    # parser callbacks
    def on_message_begin(self) -> None:
        if self._answered:
            raise _Extra  # stops the parser: nothing of this message reaches anyone
        self._reusable = False
        self._headers = []
        self._in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._status = self.parser.get_status_code()
        if self._status >= 200 and self.receiver is not None:
            self.receiver.upstream_head(self._status, self._headers)
        self._headers = []

    def on_body(self, body: bytes) -> None:
        if self.receiver is not None:
            self.receiver.upstream_body(body)

    def on_message_complete(self) -> None:
        if self._status < 200:
            return  # 1xx: the real response follows
        self._reusable = self.parser.should_keep_alive()  # llhttp forgets it once the message is over
        self._answered = True
        if self.receiver is not None:
            self.receiver.upstream_complete()

    # use
    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def keep_alive(self) -> bool:
        return not self.closed and self._reusable

    def abort(self) -> None:
        self.receiver = None
        if self.transport is not None:
            self.transport.abort()


Ready = Callable[[UpstreamConnection | None, Exception | None], None]


class Pool:
    """Connections to one upstream: idle ones reused newest first, new ones up to a bound."""

    def __init__(self, upstream: Upstream, limits: Limits, bound: int, wheel: Wheel | None = None) -> None:
        """``wheel``: where its relays' timeouts wait, shared by every pool of a gateway (:class:`Pools`)."""
        self.upstream = upstream
        self.health = Health(upstream.health)  # kept while the URL stays configured
        self.limits = limits
        self.bound = bound
        self.loop = asyncio.get_running_loop()
        self.wheel = wheel if wheel is not None else Wheel(self.loop)
        url = upstream.url
        self.host = url.raw_host or ""
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if url.scheme == "https" else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if url.is_default_port() else f"{host}:{self.port}").encode("idna")
        self.idle: list[UpstreamConnection] = []
        self.waiters: deque[Ready] = deque()
        self.total = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    def acquire(self, ready: Ready, *, fresh: bool = False) -> Callable[[], None]:
        """Call ``ready`` with a connection (maybe at once); the returned function cancels the wait."""
        if not fresh:
            now = self.loop.time()
            while self.idle:
                conn = self.idle.pop()
                conn.in_idle = False
                if conn.closed or now - conn.idle_since >= self.limits.upstream_idle:
                    conn.abort()
                    continue
                conn.reused = True
                ready(conn, None)
                return _nothing
        if self.total < self.bound:
            self.total += 1
            task = self.loop.create_task(self._connect(ready))
            return lambda: _cancel(task)
        if fresh and self.idle:  # make room: an idle connection gives its slot to a fresh one
            oldest = self.idle.pop(0)
            oldest.in_idle = False
            oldest.abort()
            self.uncount(oldest)
            return self.acquire(ready, fresh=True)
        self.waiters.append(ready)
        return lambda: self._forget_waiter(ready)

    def _forget_waiter(self, ready: Ready) -> None:
        with contextlib.suppress(ValueError):
            self.waiters.remove(ready)

    async def _connect(self, ready: Ready) -> None:
        conn = UpstreamConnection(self)
        try:
            async with asyncio.timeout(self.upstream.timeouts.connect):
                await self.loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except asyncio.CancelledError:
            conn.abort()
            self.uncount(conn)
            raise
        except TimeoutError:
            conn.abort()
            self.uncount(conn)
            ready(None, ConnectTimeout())
            return
        except OSError as e:  # refused, unreachable, DNS, TLS verification (ssl.SSLError)
            conn.abort()
            self.uncount(conn)
            ready(None, e)
            return
        ready(conn, None)

    def release(self, conn: UpstreamConnection, *, unused: bool = False) -> None:
        """A connection whose response was read to the end (or that was never used) comes back here."""
        conn.receiver = None
        if conn.closed or self._closed or not (unused or conn.keep_alive()):
            conn.abort()
            return
        conn.got_bytes = False
        conn._answered = False  # nothing may arrive until the next request is written (data_received aborts)
        if self.waiters:
            conn.reused = True
            self.waiters.popleft()(conn, None)
            return
        conn.idle_since = self.loop.time()
        conn.in_idle = True
        self.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.limits.upstream_idle, self._sweep)

    def uncount(self, conn: UpstreamConnection) -> None:
        """Give back the slot of a connection that closed or never opened."""
        if not conn.counted:
            return
        conn.counted = False
        self.total -= 1
        if conn.in_idle:
            conn.in_idle = False
            self.idle.remove(conn)
        self._wake()

    def _wake(self) -> None:
        """A slot came free: the oldest waiter gets a new connection."""
        if self.waiters and self.total < self.bound and not self._closed:
            ready = self.waiters.popleft()
            self.total += 1
            self.loop.create_task(self._connect(ready))

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        keep = []
        for conn in self.idle:
            if now - conn.idle_since >= self.limits.upstream_idle:
                conn.in_idle = False
                conn.abort()
            else:
                keep.append(conn)
        self.idle[:] = keep
        if self.idle:
            oldest = min(c.idle_since for c in self.idle)
            self._sweeper = self.loop.call_at(oldest + self.limits.upstream_idle, self._sweep)

    def close(self) -> None:
        self._closed = True
        for conn in self.idle:
            conn.in_idle = False
            conn.abort()
        self.idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()


def _nothing() -> None:
    return None


class Pools:
    """Every upstream URL's pool, made as requests need them (inside the running loop).

    A URL configured exactly as before a reload keeps its pool and what its health
    learnt; :meth:`retire` closes the others as their requests end.
    """

    __slots__ = ("bound", "limits", "made", "wheel")

    def __init__(self, limits: Limits, bound: int = 1) -> None:
        self.limits = limits
        self.bound = bound  # connections per upstream URL, in use and idle together
        self.made: dict[Upstream, Pool] = {}  # a URL without a pool yet has never failed
        self.wheel: Wheel | None = None  # made with the first pool, inside the running loop

    def pool(self, upstream: Upstream) -> Pool:
        pool = self.made.get(upstream)
        if pool is None:
            if self.wheel is None:
                self.wheel = Wheel(asyncio.get_running_loop())
            pool = self.made[upstream] = Pool(upstream, self.limits, self.bound, self.wheel)
        return pool

    def retire(self, keep: Collection[Upstream]) -> None:
        """Pools of URLs not in ``keep`` close: idle connections now, busy ones when released."""
        for upstream in [u for u in self.made if u not in keep]:
            self.made.pop(upstream).close()

    def close(self) -> None:
        for pool in self.made.values():
            pool.close()
        if self.wheel is not None:
            self.wheel.close()
