"""The request gate, in front of the admin app: token first, then a bounded body, then the app.

Pure ASGI, judged on the request head before FastAPI sees anything: every
path but the probes (:data:`OPEN_PATHS`) needs the admin bearer token,
checked before any byte of the body is read; a body is at most
:data:`MAX_BODY` bytes (``Content-Length`` checked up front, a chunked one
counted as it streams: 413), and must arrive within the header timeout (408).
A refusal closes the connection, so an unread body is never drained.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY = 1 << 20  # a candidate policy or an override; nothing the admin API takes is larger
# The probes and the scrape need no token; everything else on this port does.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def bearer(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The credentials of the first ``Authorization: Bearer`` header, as FastAPI's HTTPBearer reads them."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            return credentials.strip() if scheme.lower() == b"bearer" and credentials.strip() else None
    return None


def content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The declared body length (h11 has already refused a malformed or conflicting one)."""
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def answer(send: Send, status: int, detail: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """A JSON ``{"detail": ...}`` answer that closes the connection (what the client sent next is never read)."""
    body = orjson.dumps({"detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def refusal(token: str | None, scope: Scope) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
    """Why this request may not reach the app, judged on its head alone; None: it may."""
    if scope["path"] in OPEN_PATHS:
        return None
    if not token:
        return 404, "Not Found", []
    given = bearer(scope["headers"]) or b""
    if not hmac.compare_digest(given, token.encode()):
        return 401, "a valid admin bearer token is required", [(b"www-authenticate", b"Bearer")]
    return None


class Gate:
    """Token first, then a bounded body, then the app: in that order, whatever the route.

    FastAPI reads and parses a body before its dependencies run, so the token
    check in the admin router alone would let anyone make the control plane
    read a body. This middleware checks the token on the request head, then
    reads the body itself (bounded in bytes and time) and hands the app the
    bytes it read.
    """

    def __init__(self, app: ASGIApp, token: str | None, *, max_body: int = MAX_BODY, timeout: float = 10.0) -> None:
        self.app = app
        self.token = token or None
        self.max_body = max_body
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = refusal(self.token, scope)
        if refused is not None:
            await answer(send, *refused)
            return
        declared = content_length(scope["headers"])
        if declared is not None and declared > self.max_body:
            await answer(send, 413, f"request body larger than {self.max_body} bytes")
            return
        body = await self._body(receive)
        if isinstance(body, tuple):
            if body:
                await answer(send, *body)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _body(self, receive: Receive) -> bytes | tuple[int, str] | tuple[()]:
        """The whole body; or the refusal to answer; or () when the client left."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return ()
                    chunk: bytes = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:
                        return 413, f"request body larger than {self.max_body} bytes"
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            return 408, f"the request body did not arrive within {self.timeout:g} s"


def _replay(body: bytes, receive: Receive) -> Receive:
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # the disconnect, when it comes

    return replayed
