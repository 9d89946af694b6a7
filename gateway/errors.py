"""Error replies shaped like OpenAI's, so SDKs raise the right exception.

Every response the gateway itself writes (refusal, bad request, upstream
failure) has the body ``{"error": {"message", "type", "param", "code"}}``
and ``x-should-retry`` telling the SDKs whether retrying can help: a region
refusal or a malformed request will fail the same way again, a timeout may not.

An :class:`ErrorReply` is a value that is sent, never raised. This module holds
the shape and the data plane's own replies (a malformed request, an upstream
that failed); the request path's refusals are :mod:`gateway.proxy.replies`'.
It imports nothing of the gateway's, so every plane can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """One OpenAI-shaped error answer: status, body fields and extra headers (a value, not an exception)."""

    status: int
    type: str
    code: str
    message: str
    retry: bool = False
    headers: tuple[tuple[bytes, bytes], ...] = ()
    param: str | None = None  # the request field at fault, as OpenAI names it (``max_tokens``)

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        )

    def sse_event(self) -> bytes:
        """The same error as one server-sent event, for a stream that cannot change its status any more."""
        return b"data: " + self.body() + b"\n\n"


def bad_request(message: str, code: str = "invalid_request") -> ErrorReply:
    return ErrorReply(400, "invalid_request_error", code, message)


UPSTREAM_UNREACHABLE = ErrorReply(
    502, "upstream_error", "upstream_unreachable", "The upstream API could not be reached.", retry=True
)
UPSTREAM_BAD_RESPONSE = ErrorReply(
    502, "upstream_error", "upstream_bad_response", "The upstream API sent an invalid response.", retry=True
)
UPSTREAM_CONNECT_TIMEOUT = ErrorReply(
    504, "upstream_error", "upstream_connect_timeout", "Connecting to the upstream API timed out.", retry=True
)
UPSTREAM_TIMEOUT = ErrorReply(
    504, "upstream_error", "upstream_timeout", "The upstream API did not answer in time.", retry=True
)
UPSTREAM_STREAM_CUT = ErrorReply(
    502, "upstream_error", "upstream_stream_interrupted", "The upstream API ended the stream early.", retry=True
)
UPSTREAM_IDLE_TIMEOUT = ErrorReply(
    504, "upstream_error", "upstream_idle_timeout", "The upstream API stopped sending data.", retry=True
)
UPSTREAM_TOTAL_TIMEOUT = ErrorReply(
    504, "upstream_error", "upstream_total_timeout", "The upstream response took longer than allowed.", retry=True
)
# A streamed upload that stopped arriving (Limits.body_read_timeout); the connection is closed after it.
REQUEST_BODY_TIMEOUT = ErrorReply(
    408, "invalid_request_error", "request_body_timeout", "The request body stopped arriving.", retry=False
)
