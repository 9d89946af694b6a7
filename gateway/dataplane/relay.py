"""One forwarded request: the client's request up, the upstream's response down.

Callbacks, not a task: a response's bytes are framed and written to the
client in the same loop turn that read them from the upstream, one write per
upstream read (an SSE event that arrived as one segment leaves as one).

The promises kept here: the four timeouts (connect in :mod:`.pool`; first
byte, idle between reads, total: one timer, moved lazily), a 502/504 before
the response started and a final error event (event streams) or a cut-off
body (anything else) after; backpressure both ways (a slow client pauses
reading from the upstream, a slow upstream pauses reading from the client);
a client that leaves aborts the upstream request, so a chunked upload cut
short never reaches the upstream with a terminator; and a request sent on a
pooled connection that the upstream had just closed is sent once more on a
new one when nothing of the response arrived and the body was in hand.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from .. import errors
from ..errors import GatewayError
from ..upstream import response_headers
from .pool import ConnectTimeout, Pool, UpstreamConnection
from .server import Header, Request

_NO_BODY_STATUS = frozenset({204, 304})


class Outcome(Protocol):
    attempted: bool
    client_gone: bool
    status: int
    sent: int
    error: str | None
    ttfb: float | None


def send_error(request: Request, error: GatewayError, request_id: bytes, policy: Header) -> None:
    """The gateway's own OpenAI-shaped answer, before any upstream byte went out."""
    headers = error_headers(request_id, error.retry, policy)
    headers += error.headers
    request.respond(error.status, headers, error.body())


def error_headers(request_id: bytes, retry: bool, policy: Header) -> list[Header]:
    """``policy`` names the policy that judged the request (``x-regiongate-policy``)."""
    return [
        (b"content-type", b"application/json"),
        (b"x-should-retry", b"true" if retry else b"false"),
        (b"x-request-id", request_id),
        (b"x-regiongate-request-id", request_id),
        policy,
    ]


class Relay:
    __slots__ = (
        "body_sent",
        "cancel_wait",
        "chunked_up",
        "clock",
        "complete",
        "conn",
        "done",
        "finished",
        "first_byte_at",
        "head",
        "held",
        "held_bytes",
        "idle_timer",
        "last_rx",
        "loop",
        "no_body",
        "out",
        "outcome",
        "paused",
        "pending",
        "pending_bytes",
        "policy",
        "pool",
        "request",
        "request_id",
        "response_started",
        "retried",
        "sse",
        "timer",
        "total_at",
        "until_close",
    )

    def __init__(
        self,
        request: Request,
        pool: Pool,
        target: bytes,
        headers: list[Header],
        request_id: bytes,
        policy: Header,
        outcome: Outcome,
        done: Callable[[], None],
    ) -> None:
        self.request = request
        self.pool = pool
        self.loop = pool.loop
        self.request_id = request_id
        self.policy = policy
        self.outcome = outcome
        self.done = done
        self.conn: UpstreamConnection | None = None
        self.cancel_wait: Callable[[], None] | None = None
        self.chunked_up = request.chunked
        parts = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (request.method.encode(), target, pool.host_header)]
        parts += [b"%s: %s\r\n" % h for h in headers]
        if self.chunked_up:
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        self.head = b"".join(parts)
        request.forget_headers()
        self.pending: list[bytes] = []
        self.held: list[bytes] | None = []  # the body so far, kept for one retry while it is small
        self.held_bytes = 0
        self.pending_bytes = 0
        self.body_sent = not request.has_body
        self.out: list[bytes] = []
        self.response_started = False
        self.idle_timer = False
        self.complete = False
        self.finished = False
        self.paused = False
        self.retried = False
        self.sse = False
        self.until_close = False
        self.no_body = request.method == "HEAD"
        self.timer: asyncio.TimerHandle | None = None
        self.clock = 0.0
        self.last_rx = 0.0
        self.total_at = 0.0
        self.first_byte_at = 0.0

    # --- start -------------------------------------------------------------------------

    def start(self) -> None:
        request = self.request
        timeouts = self.pool.upstream.timeouts
        now = self.loop.time()
        self.total_at = now + timeouts.total
        self.first_byte_at = min(now + timeouts.first_byte, self.total_at)
        self.timer = self.loop.call_at(self.first_byte_at, self._on_timer)
        self.clock = time.perf_counter()
        request.on_gone = self._client_gone
        request.on_pause = self._client_paused
        request.on_resume = self._client_resumed
        self.outcome.attempted = True
        if request.has_body:
            first = request.read_body(self._client_chunk, self._client_end)
            for chunk in first:
                self._client_chunk(chunk)
            if request.body_done:
                self._client_end()
        self.cancel_wait = self.pool.acquire(self._connected)

    def _connected(self, conn: UpstreamConnection | None, error: Exception | None) -> None:
        self.cancel_wait = None
        if self.finished:
            if conn is not None:
                self.pool.release(conn, unused=True)
            return
        if conn is None:
            timed_out = isinstance(error, ConnectTimeout)
            self._fail(errors.UPSTREAM_CONNECT_TIMEOUT if timed_out else errors.UPSTREAM_UNREACHABLE)
            return
        self.conn = conn
        conn.receiver = self
        data = [self.head, *self.pending]
        if self.retried:
            self.head = b""  # sent for the last time
        self.pending = []
        self.pending_bytes = 0
        if self.body_sent and self.chunked_up:
            data.append(b"0\r\n\r\n")
        conn.write(b"".join(data))
        if not self.body_sent:
            self.request.resume_body()

    # --- the request body, from the client -----------------------------------------------

    def _client_chunk(self, data: bytes) -> None:
        if not data:
            return
        framed = b"%x\r\n%b\r\n" % (len(data), data) if self.chunked_up else data
        if self.held is not None:
            self.held_bytes += len(framed)
            if self.held_bytes <= self.pool.limits.body_buffer:
                self.held.append(framed)
            else:
                self.held = None  # too big to keep: this request cannot be sent twice
        if self.conn is not None:
            self.conn.write(framed)
        else:
            self.pending.append(framed)
            self.pending_bytes += len(framed)
            if self.pending_bytes > self.pool.limits.body_buffer:
                self.request.pause_body()

    def _client_end(self) -> None:
        if self.body_sent:
            return
        self.body_sent = True
        if self.conn is not None and self.chunked_up:
            self.conn.write(b"0\r\n\r\n")

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self.request.pause_body()
        else:
            self.request.resume_body()

    # --- the response, from the upstream -------------------------------------------------

    def upstream_head(self, status: int, raw: list[Header]) -> None:
        self.outcome.ttfb = time.perf_counter() - self.clock
        self.head, self.held = b"", None  # an answer arrived: no retry, nothing to keep
        self.outcome.status = status
        self.response_started = True
        self.last_rx = self.loop.time()
        self.no_body = self.no_body or status in _NO_BODY_STATUS
        length = chunked = False
        for name, value in raw:
            lname = name.lower()
            if lname == b"content-length":
                length = True
            elif lname == b"transfer-encoding":
                chunked = True
            elif lname == b"content-type":
                self.sse = value.startswith(b"text/event-stream")
        length_known = self.no_body or (length and not chunked)
        self.until_close = not (self.no_body or length or chunked)
        headers = response_headers(raw)
        headers.append((b"x-regiongate-request-id", self.request_id))
        headers.append(self.policy)
        self.out.append(self.request.head(status, headers, length_known=length_known, no_body=self.no_body))
        if self.request.method == "HEAD":
            # The parser would wait for the body a HEAD response announces but never sends.
            self.complete = True
            if self.conn is not None:
                self.conn.abort()
                self.conn = None

    def upstream_body(self, data: bytes) -> None:
        if self.no_body:
            return
        self.out.append(self.request.frame(data))
        self.outcome.sent += len(data)
        self.last_rx = self.loop.time()

    def upstream_complete(self) -> None:
        self.complete = True
        if not self.no_body:
            self.out.append(self.request.tail())

    def upstream_fed(self) -> None:
        """The end of one upstream read: what it produced goes to the client in one write."""
        out = self.out
        if out:
            self.request.send(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.complete:
            self._finish(reusable=self.body_sent)
        elif self.response_started and not self.idle_timer:
            # A body still to come: from the first-byte deadline to the idle and total ones.
            # (Not done for a response that is over in the read that started it: most are.)
            self.idle_timer = True
            if self.timer is not None:
                self.timer.cancel()
            idle_at = self.last_rx + self.pool.upstream.timeouts.idle
            self.timer = self.loop.call_at(min(idle_at, self.total_at), self._on_timer)

    def upstream_lost(self, error: Exception | None) -> None:
        conn, self.conn = self.conn, None
        if self.finished:
            return
        if self.complete:
            self.upstream_fed()
            return
        if not self.response_started:
            quiet = error is None or isinstance(error, OSError)  # closed or reset, not a bad response
            stale = conn is not None and conn.reused and not conn.got_bytes and quiet
            if stale and self.body_sent and self.held is not None and not self.retried:
                self._retry()
                return
            self._fail(errors.UPSTREAM_BAD_RESPONSE)
        elif self.until_close and error is None:
            self.upstream_complete()
            self.upstream_fed()
        else:
            self.upstream_fed()
            self._cut(errors.UPSTREAM_STREAM_CUT)

    def _retry(self) -> None:
        """A pooled connection closed under the request before any answer: once more, on a new one."""
        self.retried = True
        self.pending, self.held = list(self.held or []), None
        self.cancel_wait = self.pool.acquire(self._connected, fresh=True)

    # --- backpressure: a slow client pauses the upstream --------------------------------

    def _client_paused(self) -> None:
        self.paused = True
        if self.conn is not None:
            self.conn.pause_reading()

    def _client_resumed(self) -> None:
        self.paused = False
        self.last_rx = self.loop.time()
        if self.conn is not None:
            self.conn.resume_reading()

    # --- time ------------------------------------------------------------------------------

    def _on_timer(self) -> None:
        self.timer = None
        if self.finished:
            return
        now = self.loop.time()
        if not self.response_started:
            if now >= self.first_byte_at:
                self._fail(errors.UPSTREAM_TIMEOUT)
                return
            self.timer = self.loop.call_at(self.first_byte_at, self._on_timer)
            return
        if now >= self.total_at:
            self._cut(errors.UPSTREAM_TOTAL_TIMEOUT)
            return
        if self.paused:
            self.last_rx = now  # waiting on the client is not the upstream being idle
        idle_at = self.last_rx + self.pool.upstream.timeouts.idle
        if now >= idle_at:
            self._cut(errors.UPSTREAM_IDLE_TIMEOUT)
            return
        self.timer = self.loop.call_at(min(idle_at, self.total_at), self._on_timer)

    # --- endings ---------------------------------------------------------------------------

    def _finish(self, *, reusable: bool) -> None:
        self._stop()
        conn, self.conn = self.conn, None
        if conn is not None:
            if reusable:
                self.pool.release(conn)
            else:
                conn.abort()
        self.request.finish()
        self.done()

    def _fail(self, error: GatewayError) -> None:
        """Before the response started: the gateway's own answer."""
        self._stop()
        self._drop_upstream()
        o = self.outcome
        o.status, o.error = error.status, error.code
        o.sent = len(error.body())
        send_error(self.request, error, self.request_id, self.policy)
        self.done()

    def _cut(self, error: GatewayError) -> None:
        """After the response started: a final error event for a stream, else a body that cannot look whole."""
        self._stop()
        self._drop_upstream()
        self.outcome.error = error.code
        request = self.request
        if self.sse and not self.no_body:
            event = error.sse_event()
            request.send(request.frame(event) + request.tail())
            self.outcome.sent += len(event)
            request.finish()
        else:
            request.abort()
        self.done()

    def _client_gone(self) -> None:
        if self.finished:
            return
        self._stop()
        self._drop_upstream()
        o = self.outcome
        o.client_gone, o.status, o.error = True, 499, "client_disconnected"
        self.done()

    def _stop(self) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.request.on_gone = self.request.on_pause = self.request.on_resume = None

    def _drop_upstream(self) -> None:
        if self.cancel_wait is not None:
            self.cancel_wait()
            self.cancel_wait = None
        if self.conn is not None:
            self.conn.abort()
            self.conn = None
