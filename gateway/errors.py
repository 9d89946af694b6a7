"""Errors shaped like OpenAI's, so SDKs raise the right exception.

Every response the gateway itself writes (refusal, bad request, upstream
failure) has the body ``{"error": {"message", "type", "param", "code"}}``
and ``x-should-retry`` telling the SDKs whether retrying can help: a region
refusal or a malformed request will fail the same way again, a timeout may not.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import orjson


@dataclass(frozen=True, slots=True)
class GatewayError:
    status: int
    type: str
    code: str
    message: str
    retry: bool = False
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}})

    def sse_event(self) -> bytes:
        """The same error as one server-sent event, for a stream that cannot change its status any more."""
        return b"data: " + self.body() + b"\n\n"


def bad_request(message: str, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, "invalid_request_error", code, message)


def method_not_allowed(method: str, allowed: Iterable[str]) -> GatewayError:
    allow = ", ".join(sorted(allowed))
    return GatewayError(
        405,
        "invalid_request_error",
        "method_not_allowed",
        f"The method {method[:32]!r} is not allowed here; allowed: {allow}.",
        headers=((b"allow", allow.encode()),),
    )


def model_not_allowed(model: str | None) -> GatewayError:
    """OpenAI-shaped, so the SDKs raise ``PermissionDeniedError`` (403)."""
    if model is None:
        message = "The request's model could not be read, and only some models are available in your region."
    else:
        message = f"The model {model[:200]!r} is not available in your country, region, or territory."
    return GatewayError(403, "invalid_request_error", "model_not_allowed_in_region", message)


UPSTREAM_UNREACHABLE = GatewayError(
    502, "upstream_error", "upstream_unreachable", "The upstream API could not be reached.", retry=True
)
UPSTREAM_BAD_RESPONSE = GatewayError(
    502, "upstream_error", "upstream_bad_response", "The upstream API sent an invalid response.", retry=True
)
UPSTREAM_CONNECT_TIMEOUT = GatewayError(
    504, "upstream_error", "upstream_connect_timeout", "Connecting to the upstream API timed out.", retry=True
)
UPSTREAM_TIMEOUT = GatewayError(
    504, "upstream_error", "upstream_timeout", "The upstream API did not answer in time.", retry=True
)
UPSTREAM_STREAM_CUT = GatewayError(
    502, "upstream_error", "upstream_stream_interrupted", "The upstream API ended the stream early.", retry=True
)
UPSTREAM_IDLE_TIMEOUT = GatewayError(
    504, "upstream_error", "upstream_idle_timeout", "The upstream API stopped sending data.", retry=True
)
UPSTREAM_TOTAL_TIMEOUT = GatewayError(
    504, "upstream_error", "upstream_total_timeout", "The upstream response took longer than allowed.", retry=True
)
NO_UPSTREAM = GatewayError(
    503, "server_error", "no_upstream", "No upstream is configured for this request.", retry=False
)
INTERNAL = GatewayError(500, "server_error", "gateway_error", "The gateway failed to handle this request.", True)
# A streamed upload that stopped arriving (Limits.body_read_timeout); the connection is closed after it.
REQUEST_BODY_TIMEOUT = GatewayError(
    408, "invalid_request_error", "request_body_timeout", "The request body stopped arriving.", retry=False
)
