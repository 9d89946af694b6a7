"""Read a request body whole before deciding, when (and only when) the decision needs what is in it.

A rule about the request's ``model`` needs the body, but most requests
never come here: they keep the relay's streaming path, untouched. A held
body is bounded twice. By size: a ``content-length`` above the limit is
given up on before a byte is read (no ``100 Continue`` is sent for it), and
a body that grows past the limit is given back to the request
(:meth:`Request.unread`) so that a relay started afterwards streams what
was read, then the rest, byte for byte, with backpressure as usual. By
time: a body still incomplete after ``Limits.body_timeout`` is given back
the same way, so a client trickling its body cannot hold a connection here
with no timer running (once relayed, the upstream's timeouts bound it).

While the body is held, reading is not paused: memory is bounded by the
limit plus one read.

A client that leaves (or sends a malformed chunk) before the body is whole:
the hold drops what it read, cancels its timer and calls the
``request.on_gone`` that was set when :func:`hold` was called (the server's
usual signal; set it first to record the request); ``done`` is never called.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .server import Request, header

Done = Callable[[bytes | None], None]


def hold(request: Request, limit: int, done: Done) -> None:
    """``done(body)`` once the whole body is in and at most ``limit`` bytes; else ``done(None)``.

    ``done(None)`` means the body was too large (declared or found so) or
    too slow, and every byte read was given back to ``request``. ``done``
    may be called before this returns.
    """
    if request.body_done and not request.body:
        done(b"")  # no body, or an empty one
        return
    declared = declared_length(request)
    if declared is not None and declared > limit:
        done(None)
        return
    _Hold(request, limit, done).start()


def declared_length(request: Request) -> int | None:
    """The ``content-length`` (already checked by the parser), None for a chunked body."""
    value = None if request.chunked else header(request.headers, b"content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


class _Hold:
    __slots__ = ("chunks", "done", "limit", "on_gone", "request", "size", "timer")

    def __init__(self, request: Request, limit: int, done: Done) -> None:
        self.request = request
        self.limit = limit
        self.done: Done | None = done
        self.on_gone = request.on_gone
        self.chunks: list[bytes] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        request = self.request
        request.on_gone = self._gone
        first = request.read_body(self._chunk, self._end)
        self.chunks = first
        self.size = sum(len(c) for c in first)
        if self.size > self.limit:
            self._give_back()
        elif request.body_done:
            self._end()
        else:
            self.timer = asyncio.get_running_loop().call_later(request.limits.body_timeout, self._give_back)

    def _chunk(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > self.limit:
            self._give_back()

    def _end(self) -> None:
        body = b"".join(self.chunks)
        self._over()(body)

    def _give_back(self) -> None:
        self.request.unread(self.chunks)
        self._over()(None)

    def _gone(self) -> None:
        on_gone = self.on_gone
        self._over()
        if on_gone is not None:
            on_gone()

    def _over(self) -> Done:
        """Let go of everything; the caller's ``done`` (once) and ``on_gone`` are back in its hands."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.request.on_gone = self.on_gone
        done, self.done, self.on_gone, self.chunks = self.done, None, None, []
        assert done is not None
        return done
