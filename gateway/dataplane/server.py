"""The client side of the proxy port: HTTP/1.1 parsing, framing and connection lifetime.

``httptools`` (llhttp) parses, so request smuggling defences come from a
hardened parser: ``Content-Length`` with ``Transfer-Encoding``, conflicting
lengths and bad chunk sizes are parse errors, answered with 400 and a closed
connection before anything is dispatched. What llhttp does not bound, this
module does, before memory grows: the request line (414), the head's size
and header count (431), how long a head may take to arrive, and how long a
connection may sit idle (slowloris and silent sockets are closed by one
sweep a second, so no timer is armed per request). The same sweep takes the
parser (0.9 KiB) from a connection with no message under way and still open
to more; the next byte makes a new one: an idle keep-alive connection costs
about 1.5 KiB (``bench/memory.py``).

Framing is the gateway's own in both directions: a request's body length is
what llhttp counted (``Request.length``) or chunked, and the only transfer
coding accepted is ``chunked`` (any other is a 501: passing the body on
without it would change the body). Responses are framed by :meth:`Request.head`
from a length the relay gives, or chunked, never from a header it was given.

Requests on one connection are answered in order: a pipelined request waits
(with reading paused) until the one before it is answered. HTTP/1.0 clients
never get chunked encoding: a body of known length keeps a connection the
client asked to keep (``Connection: keep-alive``), any other closes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Protocol, cast
from urllib.parse import unquote

import httptools

from .. import errors
from ..errors import ErrorReply
from .limits import Limits

log = logging.getLogger("regiongate")

Header = tuple[bytes, bytes]


def header(headers: list[Header], name: bytes) -> bytes | None:
    """The first value of a request header (names arrive lower-cased)."""
    for n, value in headers:
        if n == name:
            return value
    return None


_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_QUESTION, _HASH = ord("?"), ord("#")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BUSY = ErrorReply(503, "server_error", "gateway_busy", "The gateway has too many open connections.", True)


# Methods a request may be sent twice with (RFC 9110 §9.2.2); any other needs an Idempotency-Key.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def only_chunked(value: bytes) -> bool:
    """Whether a ``Transfer-Encoding`` value names ``chunked`` and nothing else (empty list elements aside)."""
    return [c for c in (t.strip().lower() for t in value.split(b",")) if c] == [b"chunked"]


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))


# Every known status's line, made once: a response head looks it up instead of formatting it.
_STATUS_LINES = {status: b"HTTP/1.1 %d %s\r\n" % (status, reason) for status, reason in _REASONS.items()}


class _Clock:
    """The ``Date`` header, rebuilt once a second rather than per response."""

    __slots__ = ("header", "second")

    def __init__(self) -> None:
        self.second = 0
        self.header = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.header = b"date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode() + b"\r\n"
        return self.header


_clock = _Clock()


class Request:
    """One request on a client connection, and the way to answer it.

    The head is read-only once dispatched. The body arrives through
    :meth:`read_body` callbacks (buffered until someone reads it); the answer
    goes out as one :meth:`respond` or as :meth:`head` + :meth:`send` +
    :meth:`finish` (or :meth:`abort` for a body that must not look whole).
    """

    __slots__ = (
        "_conn",
        "_on_chunk",
        "_on_end",
        "body",
        "body_bytes",
        "body_done",
        "chunked",
        "closing",
        "continue_sent",
        "dispatched",
        "expect_continue",
        "finished",
        "has_body",
        "headers",
        "http10",
        "idempotent",
        "keep_alive",
        "length",
        "method",
        "on_gone",
        "on_pause",
        "on_resume",
        "out_chunked",
        "path",
        "peer",
        "query",
        "raw_path",
        "started",
    )

    def __init__(self, conn: ClientConnection, method: str, url: bytes, headers: list[Header]) -> None:
        self._conn = conn
        self.method = method
        if url[:1] == b"/" and _QUESTION not in url and _HASH not in url:
            # Origin form with no query or fragment (nearly every request): llhttp's URL parser
            # would give the whole of it as the path, or refuse it, which leaves it whole too.
            # A URL object less per request (0.25 µs; an int's `in` is 15 ns, a bytes' 250).
            self.raw_path, self.query = url, b""
        else:
            try:
                parsed = httptools.parse_url(url)
                self.raw_path = parsed.path or b""
                self.query = parsed.query or b""
            except httptools.HttpParserInvalidURLError:  # authority form (CONNECT) and the like: refused later
                self.raw_path, self.query = url, b""
        text = self.raw_path.decode("latin-1")
        self.path = unquote(text) if "%" in text else text
        self.headers = headers
        self.peer = conn.peer
        parser = conn.parser
        assert parser is not None  # made before the bytes that made this request were fed
        # llhttp's answer, taken now (it forgets once the message is over): HTTP/1.1 unless
        # "close", HTTP/1.0 only with "Connection: keep-alive".
        self.keep_alive = parser.should_keep_alive()
        expect = False
        connection = False  # a Connection (or Proxy-Connection, which llhttp reads alike) header
        self.chunked = False
        self.has_body = False
        self.length: int | None = None  # the body's length as llhttp checked it (digits only, one value)
        # May be sent twice (RFC 9110 §9.2.2), or the client says a second copy is harmless.
        self.idempotent = method in IDEMPOTENT
        for name, value in headers:
            if name == b"transfer-encoding":
                self.chunked = self.has_body = True
                if value != b"chunked" and not only_chunked(value):
                    # "gzip, chunked" (llhttp takes it): the body would go up without its coding.
                    # The connection's fact, not a slot of every request: it is never dispatched.
                    conn.broken, conn.broken_reason = _UNSUPPORTED_CODING, "unsupported_transfer_coding"
            elif name == b"content-length":
                self.length = int(value)
                self.has_body = self.length > 0
            elif name == b"expect" and value.lower() == b"100-continue":
                expect = True
            elif name == b"idempotency-key":
                self.idempotent = True
            elif name == b"connection" or name == b"proxy-connection":
                connection = True
        # HTTP/1.0 keeps a connection only when a Connection header says keep-alive, so a kept
        # connection without one is not 1.0, and llhttp's version string (0.3 µs: it is
        # formatted per call) is asked only when it could be.
        self.http10 = (connection or not self.keep_alive) and parser.get_http_version() == "1.0"
        self.expect_continue = expect and not self.http10
        if self.chunked and self.http10:
            self.keep_alive = False  # chunked in HTTP/1.0 is not to be trusted (RFC 9112 §6.1)
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.body_done = not self.has_body
        self.continue_sent = False
        self.dispatched = False
        self.started = False
        self.finished = False
        self.closing = False
        self.out_chunked = False
        self._on_chunk: Callable[[bytes], None] | None = None
        self._on_end: Callable[[], None] | None = None
        self.on_gone: Callable[[], None] | None = None
        self.on_pause: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None

    def forget_headers(self) -> None:
        """Once forwarded, a stream that stays open for minutes need not keep the request's headers."""
        self.headers = _NO_HEADERS  # shared, never appended to

    # --- the request body ----------------------------------------------------------------

    def read_body(self, on_chunk: Callable[[bytes], None], on_end: Callable[[], None]) -> list[bytes]:
        """Start taking the body: what arrived so far is returned, the rest comes by callback.

        A client waiting on ``Expect: 100-continue`` is told to send now:
        the gateway answers the expectation itself and never forwards it.
        """
        got, self.body = self.body, []
        self.body_bytes = 0
        if self.body_done:
            return got
        self._on_chunk, self._on_end = on_chunk, on_end
        if self.expect_continue and not self.continue_sent:
            self.continue_sent = True
            self._conn.write(_CONTINUE)
        self._conn.flow(self, paused=False)
        return got

    def _chunk(self, data: bytes) -> None:
        if self._on_chunk is not None:
            self._on_chunk(data)
        elif not self.finished:
            self.body.append(data)
            self.body_bytes += len(data)
            if self.body_bytes > self._conn.limits.body_buffer:
                self._conn.flow(self, paused=True)

    def _end(self) -> None:
        self.body_done = True
        on_end, self._on_chunk, self._on_end = self._on_end, None, None
        if on_end is not None:
            on_end()

    def unread(self, chunks: list[bytes]) -> None:
        """Give back chunks taken by :meth:`read_body`: the next reader gets them first, then the rest.

        For a body looked at before it is forwarded (:mod:`.bodyhold`). The
        reader's callbacks are dropped, and reading pauses as it does for any
        body nobody is reading, once more than ``body_buffer`` is waiting.
        """
        self._on_chunk = self._on_end = None
        if chunks:
            self.body[:0] = chunks
            self.body_bytes += sum(len(c) for c in chunks)
        if not self.body_done and self.body_bytes > self._conn.limits.body_buffer:
            self._conn.flow(self, paused=True)

    @property
    def limits(self) -> Limits:
        return self._conn.limits

    def pause_body(self) -> None:
        self._conn.flow(self, paused=True)

    def resume_body(self) -> None:
        self._conn.flow(self, paused=False)

    # --- the response ----------------------------------------------------------------------

    def head(self, status: int, headers: list[Header], *, length: int | None, no_body: bool = False) -> bytes:
        """The response head; the body that follows is framed by :meth:`frame`.

        ``headers`` carry no framing: ``length`` becomes the ``content-length``
        (also for a body-less answer that states one: HEAD, 304), and an
        unknown length becomes chunked encoding for HTTP/1.1 and a
        close-delimited body for HTTP/1.0.
        """
        self.started = True
        line = _STATUS_LINES.get(status)
        parts = [line if line is not None else status_line(status), _clock.date()]
        for name, value in headers:  # joined once below: 0.15 µs less a head than a format per header
            parts += (name, b": ", value, b"\r\n")
        # Closed after this answer: asked, draining, or the client was told to wait and was
        # never asked for the body (its framing is unknown). Inline: one call less per response.
        close = (
            not self.keep_alive
            or self._conn.draining
            or (not self.body_done and self.expect_continue and not self.continue_sent)
        )
        if length is not None:
            parts.append(b"content-length: %d\r\n" % length)
        elif not no_body:
            if self.http10:
                close = True
            else:
                self.out_chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
        if close:
            self.closing = True
            parts.append(b"connection: close\r\n")
        elif self.http10:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def frame(self, data: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(data), data) if self.out_chunked else data

    def tail(self) -> bytes:
        return b"0\r\n\r\n" if self.out_chunked else b""

    @property
    def write_paused(self) -> bool:
        return self._conn.write_paused

    def send(self, data: bytes) -> None:
        self._conn.write(data)

    def respond(self, status: int, headers: list[Header], body: bytes) -> None:
        """A whole response at once (the gateway's own answers)."""
        head = self.head(status, headers, length=len(body))
        self._conn.write(head + body if self.method != "HEAD" else head)
        self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._conn.request_done(self)

    def abort(self) -> None:
        """End the response so that it cannot pass for a whole one: close the connection."""
        self.finished = True
        self.closing = True
        self._conn.request_done(self)


class ClientConnection(asyncio.Protocol):
    """One client socket: parser callbacks in, responses out, in request order."""

    # Slots: thousands of these are held at once, one per open stream.
    __slots__ = (
        "_advancing",
        "_head_bytes",
        "_head_fresh",
        "_headers",
        "_in_head",
        "_paused_by",
        "_url",
        "broken",
        "broken_reason",
        "closed",
        "current",
        "deadline",
        "draining",
        "last",
        "limits",
        "listener",
        "parser",
        "peer",
        "queue",
        "receiving",
        "transport",
        "write_paused",
    )

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.limits = listener.limits
        # llhttp's parser is 0.9 KiB: a connection with no message under way gives it back (the
        # sweep drops it, see Listener._sweep) and makes a new one (0.3 µs) when bytes arrive.
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.current: Request | None = None  # being answered
        self.receiving: Request | None = None  # being parsed (its body may still arrive)
        self.last: Request | None = None
        # Pipelined, waiting: a list (a deque's block is 600 bytes a connection), and a shared empty
        # one until a request waits (56 bytes a connection; see _wait).
        self.queue: list[Request] = _NONE_WAITING
        self.deadline = 0.0  # when the sweep closes this connection (0: never)
        self.draining = False
        self.broken: ErrorReply | None = None
        self.broken_reason = ""
        self.closed = False
        self.write_paused = False
        self._paused_by: list[int] = _NOT_PAUSED  # the same: a list of its own on the first pause
        self._url = b""
        self._headers: list[Header] = _NO_HEADERS
        self._head_bytes = 0
        self._head_fresh = False
        self._in_head = False
        self._advancing = False

    # --- connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else None
        if not self.listener.admit(self):
            self.closed = True
            body = _BUSY.body()
            transport.write(
                status_line(503) + b"content-type: application/json\r\ncontent-length: %d\r\nx-should-retry: true\r\n"
                b"connection: close\r\n\r\n" % len(body) + body
            )
            transport.close()
            return
        transport.set_write_buffer_limits(high=self.limits.write_high_water)
        self.deadline = self.listener.loop.time() + self.limits.idle_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.forget(self)
        self.transport = None
        current = self.current
        if current is not None and not current.finished:
            current.finished = True
            if current.on_gone is not None:
                current.on_gone()
        self.queue = _NONE_WAITING

    def pause_writing(self) -> None:
        self.write_paused = True
        current = self.current
        if current is not None and current.on_pause is not None:
            current.on_pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        current = self.current
        if current is not None and current.on_resume is not None:
            current.on_resume()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def flow(self, who: Any, *, paused: bool) -> None:
        """Reading pauses while anyone wants it paused (a pipelined request, a full buffer)."""
        if self.transport is None:
            return
        key = id(who)
        if paused:
            if not self._paused_by:
                self.transport.pause_reading()
                self._paused_by = []
            if key not in self._paused_by:
                self._paused_by.append(key)
        elif key in self._paused_by:
            self._paused_by.remove(key)
            if not self._paused_by:
                self._paused_by = _NOT_PAUSED
                self.transport.resume_reading()

    # --- parsing -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.broken is not None:
            return
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An upgrade (or CONNECT) is not followed: the request is answered as a plain
            # one, and what the client sends after its head cannot be framed, so the
            # connection closes after the answer.
            if self.last is not None:
                self.last.keep_alive = False
            self.flow(_STOPPED, paused=True)
        except httptools.HttpParserError as e:
            self._bad(self.broken or errors.bad_request(f"Malformed HTTP request: {_parser_message(e)}"), "malformed")
        if self.broken is None and self._in_head:
            # A head still open after a whole feed: count all of it, so a header that never
            # ends is refused after max_header_bytes, not after it has filled memory.
            if self._head_fresh:
                self._head_fresh = False
            else:
                self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._bad(_HEADERS_TOO_LARGE, "headers_too_large")
        # Requests read whole before a bad one are still answered, in order, before the error.
        self._advance()

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_fresh = True
        self._head_bytes = 0
        self._url = b""
        self._headers = []
        if self.current is None:
            self.deadline = self.listener.loop.time() + self.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if len(self._url) > self.limits.max_request_line:
            self.broken, self.broken_reason = _URI_TOO_LONG, "uri_too_long"
            raise _Refuse

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a chunked body's trailers are not forwarded
        self._headers.append((name.lower(), value))
        self._head_bytes += len(name) + len(value) + 4
        if len(self._headers) > self.limits.max_headers:
            self.broken, self.broken_reason = _TOO_MANY_HEADERS, "too_many_headers"
            raise _Refuse
        if self._head_bytes > self.limits.max_header_bytes:
            self.broken, self.broken_reason = _HEADERS_TOO_LARGE, "headers_too_large"
            raise _Refuse

    def on_headers_complete(self) -> None:
        self._in_head = False
        assert self.parser is not None  # it is feeding us
        method = self.parser.get_method().decode("latin-1")
        request = Request(self, method, self._url, self._headers)
        self._url, self._headers = b"", _NO_HEADERS
        if self.broken is not None:  # a transfer coding besides chunked (Request's check)
            raise _Refuse
        self.receiving = self.last = request
        if self.current is None and not self.queue:
            self.current = request
            self.deadline = 0.0
        else:
            if self.queue is _NONE_WAITING:
                self.queue = []
            self.queue.append(request)
            self.flow(_PIPELINE, paused=True)

    def on_body(self, body: bytes) -> None:
        if self.receiving is not None:
            self.receiving._chunk(body)

    def on_message_complete(self) -> None:
        request, self.receiving = self.receiving, None
        if request is not None:
            request._end()
            if request.finished and request is self.current:
                self._next()

    # --- answering in order ------------------------------------------------------------

    def _advance(self) -> None:
        """Dispatch the current request once its head is in (after a whole feed, so a small body is in too)."""
        if self._advancing:
            return
        self._advancing = True
        try:
            while (request := self.current) is not None and not request.dispatched and not self.closed:
                request.dispatched = True
                self.listener.handler(request)
                if self.current is request:
                    break
        finally:
            self._advancing = False

    def request_done(self, request: Request) -> None:
        if request is not self.current or self.closed:
            return
        if request.closing:
            self.close()
            return
        if request.body_done or request is not self.receiving:
            # Reading paused for this request's body (a full buffer, an upstream not yet connected)
            # ends with it: a body that ended in the read that filled the buffer is never read again.
            self.flow(request, paused=False)
            self._next()
        else:
            request._on_chunk = request._on_end = None
            self.flow(request, paused=False)  # read and drop the rest of the body, then go on
            self.deadline = self.listener.loop.time() + self.limits.idle_timeout

    def _next(self) -> None:
        if self.last is self.current:
            self.last = None  # an answered request is not kept by an idle connection (0.5 KiB with its lists)
        self.current = None
        if self.queue:
            self.current = self.queue.pop(0)
            if not self.queue:
                self.flow(_PIPELINE, paused=False)
            if not self.current.dispatched:
                self._advance()
            return
        if self.broken is not None:
            self._answer_broken()
        elif self.listener.draining:
            self.close()
        else:
            self.deadline = self.listener.loop.time() + self.limits.idle_timeout

    def _bad(self, error: ErrorReply, reason: str) -> None:
        """A request that cannot be parsed: answered after the ones before it, then the connection closes."""
        if self.broken is None:
            self.broken = error
        self.broken_reason = self.broken_reason or reason
        self.flow(_STOPPED, paused=True)
        # The unreadable request itself is never dispatched; one being sent on (its body
        # turned out bad) is aborted upstream, so the upstream never sees it completed.
        self.queue = [r for r in self.queue if r is not self.receiving] or _NONE_WAITING
        current = self.current
        if current is not None and current is self.receiving:
            self.current = None
            current.keep_alive = False
            if current.dispatched and not current.finished:
                current.finished = True
                if current.on_gone is not None:
                    current.on_gone()
                if current.started:
                    self.close()
                    return
        if self.current is None or self.current.finished:
            self._answer_broken()

    def _answer_broken(self) -> None:
        error = self.broken
        assert error is not None
        self.listener.bad_request(self.broken_reason or "malformed")
        body = error.body()
        self.write(
            status_line(error.status)
            + _clock.date()
            + b"content-type: application/json\r\ncontent-length: %d\r\nx-should-retry: false\r\n"
            b"connection: close\r\n\r\n" % len(body) + body
        )
        self.close()

    def idle_parser(self) -> bool:
        """Whether the parser stands between two messages, holding nothing: it can be dropped and made anew."""
        return (
            self.parser is not None
            and not self._in_head
            and self.receiving is None
            and not self._paused_by  # an upgrade or an error stops reading: that parser is not fresh
            # After "Connection: close" (or HTTP/1.0 without keep-alive) llhttp refuses whatever
            # follows; a fresh parser would take it, so that one stays until the connection closes.
            and (self.last is None or self.last.keep_alive)
            and self.broken is None
            and not self.closed
        )

    def timed_out(self) -> None:
        """The sweep found this connection past its deadline."""
        if self._in_head and self.current is None:
            self.broken, self.broken_reason = _HEADER_TIMEOUT, "header_timeout"
            self._answer_broken()
        elif self.current is None or self.current.finished:
            self.close()  # silent, or answered and still trickling a body nobody reads


# Reasons to stop reading a connection, besides a request's own (a full body buffer).
_PIPELINE = object()  # a request waits behind the one being answered
_STOPPED = object()  # nothing after this point can be parsed


# Shared empty lists, never appended to: most connections never wait, pause or hold a head for long.
_NONE_WAITING: list[Request] = []
_NO_HEADERS: list[Header] = []
_NOT_PAUSED: list[int] = []


class _Refuse(Exception):
    """Raised inside a parser callback to stop parsing; the reason is in ``broken``."""


_URI_TOO_LONG = ErrorReply(414, "invalid_request_error", "uri_too_long", "The request target is too long.")
_HEADERS_TOO_LARGE = ErrorReply(431, "invalid_request_error", "headers_too_large", "The request headers are too large.")
_TOO_MANY_HEADERS = ErrorReply(431, "invalid_request_error", "too_many_headers", "The request has too many headers.")
_UNSUPPORTED_CODING = ErrorReply(
    501, "invalid_request_error", "unsupported_transfer_coding", "Only the chunked transfer coding is supported."
)
_HEADER_TIMEOUT = ErrorReply(408, "invalid_request_error", "header_timeout", "The request headers took too long.")


def _parser_message(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text if text.isprintable() and len(text) < 100 else "invalid request"


class Front(Protocol):
    """What stands between the socket and the connections when there is one (:class:`.edge.Edge`:
    TLS, PROXY protocol). A protocol, so that this module does not import the one that imports it."""

    async def serve(self, listener: Listener, sock: Any) -> asyncio.AbstractServer: ...
    def tick(self) -> None: ...


class Listener:
    """The proxy port: admits connections up to a cap, sweeps slow ones, drains on shutdown."""

    def __init__(
        self,
        handler: Callable[[Request], None],
        limits: Limits,
        cap: int,
        on_bad_request: Callable[[str], None],
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.cap = cap
        self.on_bad_request = on_bad_request
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.server: asyncio.AbstractServer | None = None
        self.loop = asyncio.get_running_loop()
        self._sweeper: asyncio.TimerHandle | None = None
        self._edge: Front | None = None
        self._bad_logged_at = 0.0
        self._bad_suppressed = 0
        self._drained = asyncio.Event()

    async def start(self, sock: Any, edge: Front | None = None) -> None:
        """Serve ``sock``; with ``edge`` (TLS, PROXY protocol), connections pass through it first (:mod:`.edge`)."""
        if edge is None:
            self.server = await self.loop.create_server(lambda: ClientConnection(self), sock=sock, backlog=2048)
        else:
            self._edge = edge
            self.server = await edge.serve(self, sock)
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def admit(self, conn: ClientConnection) -> bool:
        if self.draining or len(self.connections) >= self.cap:
            return False
        self.connections.add(conn)
        return True

    def forget(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if self.draining and not self.connections:
            self._drained.set()

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            if conn.deadline and conn.deadline <= now:
                conn.timed_out()
            elif conn.idle_parser():
                conn.parser = None
        if self._edge is not None:
            self._edge.tick()
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def bad_request(self, reason: str) -> None:
        """Count every unparseable request; log at most one line a second about them (no addresses)."""
        self.on_bad_request(reason)
        now = self.loop.time()
        if now - self._bad_logged_at >= 1.0:
            more = f" (and {self._bad_suppressed} more since the last line)" if self._bad_suppressed else ""
            log.warning("bad request on the proxy port: %s%s", reason, more)
            self._bad_logged_at = now
            self._bad_suppressed = 0
        else:
            self._bad_suppressed += 1

    async def shutdown(self) -> None:
        """Stop accepting, close idle connections, let in-flight answers finish up to the grace period."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.draining = True
            if conn.current is None:
                conn.close()
        if self.connections:
            try:
                await asyncio.wait_for(self._drained.wait(), self.limits.grace)
            except TimeoutError:
                log.warning(
                    "shutdown: closing %d connections still busy after %.0f s", len(self.connections), self.limits.grace
                )
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
