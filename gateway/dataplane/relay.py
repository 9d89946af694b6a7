"""One forwarded request: the client's request up, the upstream's response down.

Callbacks, not a task: a response's bytes are framed and written to the
client in the same loop turn that read them from the upstream, one write per
upstream read (an SSE event that arrived as one segment leaves as one).

Framing is the relay's, both ways, decided once per message from what a
parser counted, never from a header it was given (no header that says
how a body ends is forwarded either way: :data:`gateway.dataplane.upstream.FRAMING`).
Up: ``content-length`` from the held body or from llhttp's count of the
client's, or ``chunked`` written here. Down: the upstream's length, or
chunked (close-delimited for HTTP/1.0), and none on a 204; a transfer
coding besides ``chunked`` is taken off (:mod:`.codings`). One response per
request: bytes after it close that upstream connection (:mod:`.pool`).

The promises kept here: the four timeouts (connect in :mod:`.pool`; first
byte, idle between reads, total: one place on the gateway's timer wheel,
:mod:`.timers`, moved lazily, so a timeout fires at most 50 ms late), a 502/504 before
the response started and a final error event (event streams) or a cut-off
body (anything else) after; backpressure both ways (a slow client pauses
reading from the upstream, a slow upstream pauses reading from the client);
a client that leaves aborts the upstream request, so a chunked upload cut
short never reaches the upstream with a terminator; a streamed upload that
stops arriving for ``Limits.body_read_timeout`` (while nothing on the
gateway's side holds it back) gets a 408 and a closed connection; and a
request sent on a pooled connection that the upstream had just closed is
sent once more on a new one when nothing of the response arrived, the body
was in hand and a second copy is harmless (an idempotent method, or an
``Idempotency-Key``: a POST's body may have been read before the close).

Failover (:mod:`.failover`), when the request has more than one URL to try:
a failed connect, a 502/503, a 504 (for a request that may be sent twice:
a 504 says nothing of whether the upstream acted on it) or an upstream's
region refusal moves the request to the next URL, but only while no byte of the response has reached
the client, and only when the body can be sent again: the gateway's own
(``body``, given per upstream) or a client's that was wholly held (a
streamed upload, larger than ``Limits.body_buffer``, is never sent twice).
Each attempt runs on its URL's timeouts from the moment it starts. A 403 is
read (bounded) before it is passed on, to tell a region refusal apart; every
other answer streams as before. The plain request (one URL, no fallback)
pays for none of this beyond a ``None`` check and its URL's health counter.

A :class:`BodyTap` (given by the request path, for a request whose usage it reads)
sees every decoded byte of a 2xx response body in order, and what it gives back is
what the client gets; what it held back comes out when the body is whole. A tap
that strips (``BodyTap.strips``: it may leave bytes out) has its body framed here,
chunked, never with the upstream's length; an observing tap (it never changes a
byte) keeps the upstream's framing and passes on the very bytes objects it was
given. A request without a tap pays a ``None`` check per upstream read (and one at its
head and one at its end).

An attempt's life is its :class:`Phase` (connecting, sending, sniffing a 403,
streaming, complete, done), changed only by ``Relay._enter``; the flags left
are facts that hold across phases (the upload's progress, backpressure, the
response's framing, a retry already spent).
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from enum import IntEnum
from typing import Protocol

from .. import errors
from ..errors import ErrorReply
from .codings import Decoder, UnsupportedCoding, decoder
from .failover import CONNECT_ERROR, CONNECT_TIMEOUT, REGION_REFUSAL, SNIFF_LIMIT, STATUS_REASONS, Failover, Route
from .failover import region_refusal as read_refusal
from .pool import ConnectTimeout, Pool, UpstreamConnection
from .server import Header, Request
from .timers import Slot
from .upstream import Upstream, response_headers

_NO_BODY_STATUS = frozenset({204, 304})
_UNHEALTHY = frozenset(STATUS_REASONS)  # 502, 503, 504: the upstream itself says it could not serve


class Phase(IntEnum):
    """Where one attempt of a relay is; ordered, and changed in one place (:meth:`Relay._enter`).

    A failover or a stale-connection retry goes back to ``CONNECTING``; ``DONE`` is final.
    """

    CONNECTING = 0  # waiting for a connection from the pool
    SENDING = 1  # the head went up (the body may still be going): waiting for the response head
    SNIFFING = 2  # a 403's head is in: its body is read (bounded) before anything is passed on
    STREAMING = 3  # the response head was passed on (or is being): its body flows to the client
    COMPLETE = 4  # the upstream's response is whole (a sniffed 403's too): what is left is to pass it on
    DONE = 5  # answered, failed, cut or the client left: nothing more happens


CONNECTING, SENDING, SNIFFING, STREAMING, COMPLETE, DONE = Phase  # global loads on the hot path


class BodyTap(Protocol):
    """Reads a 2xx response body as it is relayed (:class:`gateway.usage.tap.UsageTap` is one).

    ``strips``: whether :meth:`feed` may give back other bytes than it was given (leave some out, hold
    some back). A tap that never does (``strips`` false) gets every piece back as the same object and
    :meth:`end` gives nothing: the upstream's framing (its content-length) is kept. A stripping tap's
    body is framed here, chunked.
    """

    strips: bool

    def feed(self, data: bytes) -> bytes:
        """``data`` seen; what to send on in its place (``data`` itself when nothing changed)."""
        ...

    def end(self) -> bytes:
        """The body is whole: what the tap held back, to send last."""
        ...


class RelayRecord(Protocol):
    """What the relay writes down about its request, for the record (:class:`gateway.proxy.Exchange`)."""

    attempted: bool
    client_gone: bool
    status: int
    sent: int
    error: str | None
    ttfb: float | None
    target: Upstream | None  # the URL of the last attempt (the one that answered)
    failovers: list[Failover] | None
    refused: str | None  # the upstream's message, when its region refusal was passed on
    attempts: int  # times the request went to an upstream (failovers and stale-connection retries included)


def send_error(request: Request, error: ErrorReply, request_id: bytes, policy: Header) -> None:
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
        "body",
        "body_paused",
        "body_rx",
        "body_sent",
        "cancel_wait",
        "clock",
        "conn",
        "decoder",
        "done",
        "first_byte_at",
        "head",
        "held",
        "held_bytes",
        "idle_timer",
        "last_rx",
        "no_body",
        "out",
        "outcome",
        "paused",
        "pending",
        "pending_bytes",
        "phase",
        "policy",
        "pool",
        "request",
        "request_id",
        "retried",
        "route",
        "slot",
        "sniff",
        "sse",
        "tap",
        "tapping",
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
        outcome: RelayRecord,
        done: Callable[[], None],
        route: Route | None = None,
        body: bytes | None = None,
        tap: BodyTap | None = None,
    ) -> None:
        """``body``: the whole request body, read by the gateway (sent with its own content-length,
        which ``headers`` carry); None streams the client's. ``route``: the URLs left to try.
        ``tap``: reads (and may change) a 2xx response body on its way (:class:`BodyTap`)."""
        self.request = request
        self.pool = pool
        self.request_id = request_id
        self.policy = policy
        self.outcome = outcome
        self.done = done
        self.route = route
        self.tap = tap
        self.tapping: BodyTap | None = None  # the tap, once a 2xx response with a body is being relayed
        self.conn: UpstreamConnection | None = None
        self.cancel_wait: Callable[[], None] | None = None
        self.body = body  # with it, whether the body goes up chunked: None and request.chunked (not a slot)
        self.head = self._head(target, headers)
        request.forget_headers()
        if body is None:
            self.pending: list[bytes] = []
            self.held: list[bytes] | None = []  # the body so far, kept for a second attempt while it is small
            self.held_bytes = 0
            self.body_sent = not request.has_body
        else:
            self.pending = [body]
            self.held = [body]
            self.held_bytes = len(body)
            self.body_sent = True
        self.pending_bytes = 0
        self.body_rx = self.pool.loop.time()  # the last read of a streamed body (for Limits.body_read_timeout)
        self.body_paused = False  # the gateway holds the upload back (no connection yet, a slow upstream)
        self.decoder: Decoder | None = None
        self.sniff: _Sniff | None = None  # a 403 being read before anything is passed on
        self.out: list[bytes] = []
        self.phase = CONNECTING
        # Independent of the phase: the timer moved from the first-byte deadline to the idle and total
        # ones (a response over in the read that started it never moves it); the client's reading is
        # paused (backpressure, any phase); this attempt's request was sent again on a new connection.
        self.idle_timer = False
        self.paused = False
        self.retried = False
        self.sse = False
        self.until_close = False
        self.no_body = request.method == "HEAD"
        self.slot: Slot | None = None  # where on the timer wheel this relay waits (:mod:`.timers`)
        self.clock = 0.0
        self.last_rx = 0.0
        self.total_at = 0.0
        self.first_byte_at = 0.0

    def _head(self, target: bytes, headers: list[Header]) -> bytes:
        """The request head for one upstream, framed here: ``headers`` carry no framing of the client's."""
        request = self.request
        parts = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (request.method.encode(), target, self.pool.host_header)]
        parts += [b"%s: %s\r\n" % h for h in headers]
        if self.body is not None:  # the gateway's own bytes (held, maybe renamed)
            parts.append(b"content-length: %d\r\n" % len(self.body))
        elif request.chunked:  # the client's body, streamed, came chunked: it goes up chunked
            parts.append(b"transfer-encoding: chunked\r\n")
        elif request.length is not None:
            parts.append(b"content-length: %d\r\n" % request.length)
        parts.append(b"\r\n")
        return b"".join(parts)

    def _enter(self, phase: Phase) -> None:
        """The one place the phase changes; ``DONE`` is final (a body that failed to decode while
        the response completed must not look complete again)."""
        if self.phase is not DONE:
            self.phase = phase

    def __repr__(self) -> str:
        request = self.request
        facts = [
            self.phase.name,
            f"{request.method} {self.pool.upstream.label}",
            f"attempts={self.outcome.attempts}",
            f"sent={self.outcome.sent}",
        ]
        facts += [
            name
            for name in ("body_sent", "paused", "body_paused", "retried", "sse", "until_close")
            if getattr(self, name)
        ]
        if self.route is not None:
            facts.append("failover")
        return f"<Relay {' '.join(facts)}>"

    # --- start -------------------------------------------------------------------------

    def start(self) -> None:
        request = self.request
        self._deadlines()
        request.on_gone = self._client_gone
        request.on_pause = self._client_paused
        request.on_resume = self._client_resumed
        self.outcome.attempted = True
        self.outcome.target = self.pool.upstream
        if not self.body_sent:
            first = request.read_body(self._client_chunk, self._client_end)
            for chunk in first:
                self._client_chunk(chunk)
            if request.body_done:
                self._client_end()
        self.cancel_wait = self.pool.acquire(self._connected)

    def _deadlines(self) -> None:
        """An attempt's timeouts, from now: its URL's first-byte and total ones."""
        timeouts = self.pool.upstream.timeouts
        now = self.pool.loop.time()
        self.total_at = now + timeouts.total
        self.first_byte_at = min(now + timeouts.first_byte, self.total_at)
        if self.slot is not None:  # a failover's: the last attempt's deadline no longer holds
            self.slot.discard(self)
        # The stalled-upload deadline, as _body_due gives it (inline: one call less per request).
        body_at = math.inf if self.body_sent else self.body_rx + self.pool.limits.body_read_timeout
        self.slot = self.pool.wheel.add(min(self.first_byte_at, body_at), self)
        self.clock = time.perf_counter()

    def _wait(self, at: float) -> None:
        """Be told (:meth:`expired`) at ``at`` (loop time), and no longer at the earlier deadline."""
        if self.slot is not None:
            self.slot.discard(self)
        self.slot = self.pool.wheel.add(at, self)

    def _body_due(self) -> float:
        """When a streamed upload that stopped arriving is given up on (never, once it is all in)."""
        return math.inf if self.body_sent else self.body_rx + self.pool.limits.body_read_timeout

    def _connected(self, conn: UpstreamConnection | None, error: Exception | None) -> None:
        self.cancel_wait = None
        if self.phase is DONE:
            if conn is not None:
                self.pool.release(conn, unused=True)
            return
        if conn is None:
            timed_out = isinstance(error, ConnectTimeout)
            self.pool.health.failed()
            # Nothing went up: whatever of the body was read is still pending, so it can go elsewhere.
            if self.route is not None and self._failover(CONNECT_TIMEOUT if timed_out else CONNECT_ERROR, 0):
                return
            self._fail(errors.UPSTREAM_CONNECT_TIMEOUT if timed_out else errors.UPSTREAM_UNREACHABLE)
            return
        self.conn = conn
        conn.receiver = self
        self._enter(SENDING)
        data = [self.head, *self.pending]
        if self.retried:
            self.head = b""  # sent for the last time
        self.pending = []
        self.pending_bytes = 0
        if self.body_sent and self.body is None and self.request.chunked:
            data.append(b"0\r\n\r\n")
        conn.write(b"".join(data))
        self.outcome.attempts += 1
        if not self.body_sent:
            self.body_paused = False
            self.body_rx = self.pool.loop.time()
            self.request.resume_body()

    # --- the request body, from the client -----------------------------------------------

    def _client_chunk(self, data: bytes) -> None:
        if not data:
            return
        self.body_rx = self.pool.loop.time()
        framed = b"%x\r\n%b\r\n" % (len(data), data) if self.request.chunked else data  # the client's body, streamed
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
                self.body_paused = True
                self.request.pause_body()

    def _client_end(self) -> None:
        if self.body_sent:
            return
        self.body_sent = True
        if self.conn is not None and self.request.chunked:  # the client's body, streamed (body is None)
            self.conn.write(b"0\r\n\r\n")

    def upstream_write_paused(self, paused: bool) -> None:
        self.body_paused = paused
        self.body_rx = self.pool.loop.time()
        if paused:
            self.request.pause_body()
        else:
            self.request.resume_body()

    # --- the response, from the upstream -------------------------------------------------

    def upstream_head(self, status: int, raw: list[Header]) -> None:
        health = self.pool.health
        if status in _UNHEALTHY:
            health.failed()
            if (
                self.route is not None
                and self.held is not None
                and (status != 504 or self.request.idempotent)  # a 504's upstream may have acted on it
                and self._failover(STATUS_REASONS[status], status)
            ):
                return
        elif health.failures:
            health.ok()
        self.outcome.ttfb = time.perf_counter() - self.clock
        self.head = b""  # an answer arrived: no retry on this connection
        if self.route is None or status != 403:
            self.held = None  # nothing to keep for another attempt
        self.outcome.status = status
        self._enter(STREAMING)
        self.last_rx = self.pool.loop.time()
        self.no_body = self.no_body or status in _NO_BODY_STATUS
        # Framing, from what llhttp checked (one content-length of digits, never with transfer-encoding),
        # decided before any header is filtered: no Connection token of the upstream's can change it.
        length: int | None = None
        chunked = False
        for name, value in raw:
            lname = name.lower()
            if lname == b"content-length":
                length = int(value)
            elif lname == b"transfer-encoding":
                if value == b"chunked":
                    chunked = True
                else:
                    try:
                        self.decoder, chunked = decoder(value)
                    except UnsupportedCoding:
                        self._fail(errors.UPSTREAM_BAD_RESPONSE)
                        return
            elif lname == b"content-type":
                self.sse = value.startswith(b"text/event-stream")
        self.until_close = not (self.no_body or length is not None or chunked)
        if status == 204 or (self.until_close and not self.no_body):
            length = None  # none on a 204 (RFC 9110 §8.6); a body to the close is framed here
        if self.tap is not None and 200 <= status < 300 and not self.no_body:
            self.tapping = self.tap
            if self.tap.strips:
                length = None  # the tap may leave bytes out: framed here
        headers = response_headers(raw)
        headers.append((b"x-regiongate-request-id", self.request_id))
        headers.append(self.policy)
        if status == 403 and not self.no_body:
            # Maybe the upstream refusing the gateway's region: read it before passing anything on.
            encoding = next((v for n, v in raw if n.lower() == b"content-encoding"), None)
            self.sniff = _Sniff(status, headers, length, encoding)
            self._enter(SNIFFING)
            return
        self.route = None  # the answer is this one: the client's headers need not be kept
        self.out.append(self.request.head(status, headers, length=length, no_body=self.no_body))
        if self.request.method == "HEAD":
            # The parser would wait for the body a HEAD response announces but never sends.
            self._enter(COMPLETE)
            if self.conn is not None:
                self.conn.abort()
                self.conn = None

    def upstream_body(self, data: bytes) -> None:
        if self.no_body:
            return
        if self.decoder is not None:
            try:
                data = self.decoder.feed(data)
            except zlib.error:
                self._bad_coding()
                return
            if not data:
                return
        sniff = self.sniff
        if sniff is not None:
            sniff.chunks.append(data)
            sniff.size += len(data)
            self.last_rx = self.pool.loop.time()
            if sniff.size > SNIFF_LIMIT:
                self._pass_sniffed()  # too long to be a refusal
            return
        tap = self.tapping
        if tap is not None:
            data = tap.feed(data)
            if not data:  # held back by the tap (an event not yet whole)
                self.last_rx = self.pool.loop.time()
                return
        self.out.append(self.request.frame(data))
        self.outcome.sent += len(data)
        self.last_rx = self.pool.loop.time()

    def upstream_complete(self) -> None:
        if self.decoder is not None and not self.no_body:
            decoder, self.decoder = self.decoder, None
            try:
                rest = decoder.end()
            except zlib.error:
                self._bad_coding()
                return
            if rest:
                self.upstream_body(rest)
        self._enter(COMPLETE)
        if not self.no_body and self.sniff is None:
            tap = self.tapping
            if tap is not None:
                rest = tap.end()
                if rest:
                    self.out.append(self.request.frame(rest))
                    self.outcome.sent += len(rest)
            self.out.append(self.request.tail())

    def _bad_coding(self) -> None:
        """A transfer-coded body that does not decode: nothing more of it can be passed on as whole."""
        self.decoder = None
        if self.request.started:
            self._cut(errors.UPSTREAM_STREAM_CUT)
        else:
            self._fail(errors.UPSTREAM_BAD_RESPONSE)

    def upstream_fed(self) -> None:
        """The end of one upstream read: what it produced goes to the client in one write."""
        phase = self.phase
        if phase is DONE:
            return  # ended inside the read (a body that would not decode)
        if self.sniff is not None and phase is COMPLETE and self._judge_403():
            return  # another attempt is under way
        out = self.out
        if out:
            self.request.send(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.phase is COMPLETE:
            self._finish(reusable=self.body_sent)
        elif self.phase >= SNIFFING and not self.idle_timer:
            # A body still to come: from the first-byte deadline to the idle and total ones.
            # (Not done for a response that is over in the read that started it: most are.)
            self.idle_timer = True
            self._wait(min(self.last_rx + self.pool.upstream.timeouts.idle, self.total_at))

    def upstream_lost(self, error: Exception | None) -> None:
        conn, self.conn = self.conn, None
        phase = self.phase
        if phase is DONE:
            return
        if phase is COMPLETE:
            self.upstream_fed()
            return
        if phase < SNIFFING:
            quiet = error is None or isinstance(error, OSError)  # closed or reset, not a bad response
            stale = conn is not None and conn.reused and not conn.got_bytes and quiet
            # Sent again only if a second copy is harmless: the upstream may have read (and acted
            # on) all of it before it closed, and nothing tells the two cases apart.
            if stale and self.body_sent and self.held is not None and not self.retried and self.request.idempotent:
                self._retry()
                return
            self._fail(errors.UPSTREAM_BAD_RESPONSE)
        elif self.until_close and error is None:
            self.upstream_complete()
            self.upstream_fed()
        elif self.sniff is not None:
            self._fail(errors.UPSTREAM_BAD_RESPONSE)  # a 403 cut short: nothing of it was passed on
        else:
            self.upstream_fed()
            self._cut(errors.UPSTREAM_STREAM_CUT)

    def _retry(self) -> None:
        """A pooled connection closed under the request before any answer: once more, on a new one."""
        self.retried = True
        self._enter(CONNECTING)
        self.pending = list(self.held or [])
        if self.route is None:
            self.held = None
        self.cancel_wait = self.pool.acquire(self._connected, fresh=True)

    # --- another URL, before anything reached the client ---------------------------------

    def _judge_403(self) -> bool:
        """A whole 403 is in: a region refusal goes to the next URL if there is one, else it is passed on."""
        assert self.sniff is not None
        message = read_refusal(b"".join(self.sniff.chunks), self.sniff.encoding)
        if message is not None:
            if self.route is not None and self.held is not None and self._failover(REGION_REFUSAL, 403, message):
                return True
            self.outcome.refused = message
        self._pass_sniffed()
        return False

    def _pass_sniffed(self) -> None:
        """The 403 read so far goes to the client as it came (framed for it), and the rest streams on."""
        sniff, self.sniff = self.sniff, None
        assert sniff is not None
        status, headers, length = sniff.status, sniff.headers, sniff.length
        self.held = self.route = None
        request = self.request
        out = self.out
        out.append(request.head(status, headers, length=length))
        for data in sniff.chunks:
            out.append(request.frame(data))
            self.outcome.sent += len(data)
        if self.phase is COMPLETE:
            out.append(request.tail())
        else:
            self._enter(STREAMING)

    def _failover(self, reason: str, status: int, message: str | None = None) -> bool:
        """Start the next attempt, if there is a URL left and nothing reached the client."""
        route = self.route
        if route is None or self.request.started or self.phase is DONE:
            return False
        step = route.next()
        if step is None:
            return False
        pool, target, headers, body = step
        o = self.outcome
        if o.failovers is None:
            o.failovers = []
        o.failovers.append(Failover(self.pool.upstream, pool.upstream, reason, status, message))
        conn, self.conn = self.conn, None
        if self.cancel_wait is not None:
            self.cancel_wait()
            self.cancel_wait = None
        if conn is not None:
            if self.phase is COMPLETE and self.body_sent:
                self.pool.release(conn)  # a whole answer (a refusal) on a sound connection
            else:
                conn.abort()
        self.pool = pool
        if body is not None:
            self.body = body
            self.pending, self.held, self.held_bytes = [body], [body], len(body)
        elif status:  # the last URL had (some of) the body: all of it again, from what was held
            assert self.held is not None
            self.pending = list(self.held)
        self.head = self._head(target, headers)
        self.pending_bytes = sum(map(len, self.pending))
        self._enter(CONNECTING)
        self.idle_timer = self.retried = self.sse = False
        self.until_close = False
        self.no_body = self.request.method == "HEAD"
        self.sniff = self.decoder = None
        self.out.clear()
        o.status, o.ttfb, o.target = 0, None, pool.upstream
        self._deadlines()
        self.cancel_wait = pool.acquire(self._connected)
        return True

    # --- backpressure: a slow client pauses the upstream --------------------------------

    def _client_paused(self) -> None:
        self.paused = True
        if self.conn is not None:
            self.conn.pause_reading()

    def _client_resumed(self) -> None:
        self.paused = False
        self.last_rx = self.pool.loop.time()
        if self.conn is not None:
            self.conn.resume_reading()

    # --- time ------------------------------------------------------------------------------

    def expired(self) -> None:
        """The timer wheel's call: a deadline may have passed (:mod:`.timers`; never before it)."""
        self.slot = None
        if self.phase is DONE:
            return
        now = self.pool.loop.time()
        if self.body_paused:
            self.body_rx = now  # the gateway holding the upload back is not the client being slow
        body_at = self._body_due()
        if now >= body_at:
            self._body_timeout()
            return
        if self.phase < SNIFFING:
            if now >= self.first_byte_at:
                self._fail(errors.UPSTREAM_TIMEOUT)
                return
            self.slot = self.pool.wheel.add(min(self.first_byte_at, body_at), self)
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
        self.slot = self.pool.wheel.add(min(idle_at, self.total_at, body_at), self)

    def _body_timeout(self) -> None:
        """A streamed upload stopped arriving: the upstream never gets it whole, the client a 408 and a close."""
        self.request.keep_alive = False  # the rest of the body will never be read: its framing is lost
        if self.request.started:
            self._cut(errors.REQUEST_BODY_TIMEOUT)
        else:
            self._fail(errors.REQUEST_BODY_TIMEOUT)

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

    def _fail(self, error: ErrorReply) -> None:
        """Before the response started: the gateway's own answer."""
        self._stop()
        self._drop_upstream()
        o = self.outcome
        o.status, o.error = error.status, error.code
        o.sent = len(error.body())
        send_error(self.request, error, self.request_id, self.policy)
        self.done()

    def _cut(self, error: ErrorReply) -> None:
        """After the response started: a final error event for a stream, else a body that cannot look whole."""
        if not self.request.started:  # the upstream's answer was still being read (a 403): nothing passed on
            self._fail(error)
            return
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
        if self.phase is DONE:
            return
        self._stop()
        self._drop_upstream()
        o = self.outcome
        o.client_gone, o.status, o.error = True, 499, "client_disconnected"
        self.done()

    def _stop(self) -> None:
        self._enter(DONE)
        if self.slot is not None:
            self.slot.discard(self)
            self.slot = None
        self.request.on_gone = self.request.on_pause = self.request.on_resume = None

    def _drop_upstream(self) -> None:
        if self.cancel_wait is not None:
            self.cancel_wait()
            self.cancel_wait = None
        if self.conn is not None:
            self.conn.abort()
            self.conn = None


class _Sniff:
    """A 403 read before anything of it is passed on (made only for a 403): its head, and its body so far."""

    __slots__ = ("chunks", "encoding", "headers", "length", "size", "status")

    def __init__(self, status: int, headers: list[Header], length: int | None, encoding: bytes | None) -> None:
        self.status = status
        self.headers = headers
        self.length = length
        self.encoding = encoding
        self.chunks: list[bytes] = []
        self.size = 0
