"""The request path's own answers, OpenAI-shaped (:class:`gateway.errors.ErrorReply`).

A method outside ``--allow-method`` gets a 405 (``TRACE`` would echo the
injected upstream key) naming the allowed ones; a path with no canonical form
(:mod:`gateway.requestpath`) a 400; a model outside the deciding rule's
``allow_models`` a 403 the SDKs raise as ``PermissionDeniedError``. The data
plane's replies (a malformed request, an upstream that failed) are
:mod:`gateway.errors`'; how any of them is written, :func:`.dataplane.relay.send_error`.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ErrorReply, bad_request
from ..requestpath import BadPath, canonical


def method_not_allowed(method: str, allowed: Iterable[str]) -> ErrorReply:
    allow = ", ".join(sorted(allowed))
    return ErrorReply(
        405,
        "invalid_request_error",
        "method_not_allowed",
        f"The method {method[:32]!r} is not allowed here; allowed: {allow}.",
        headers=((b"allow", allow.encode()),),
    )


def model_not_allowed(model: str | None) -> ErrorReply:
    """OpenAI-shaped, so the SDKs raise ``PermissionDeniedError`` (403)."""
    if model is None:
        message = "The request's model could not be read, and only some models are available in your region."
    else:
        message = f"The model {model[:200]!r} is not available in your country, region, or territory."
    return ErrorReply(403, "invalid_request_error", "model_not_allowed_in_region", message)


def request_target(method: str, raw_path: bytes, allowed: frozenset[str]) -> str | ErrorReply:
    """The canonical path, or the 400/405 that answers a request that has none."""
    if method not in allowed:
        return method_not_allowed(method, allowed)
    try:
        return canonical(raw_path)
    except BadPath as e:
        return bad_request(str(e), "invalid_path")


NO_UPSTREAM = ErrorReply(503, "server_error", "no_upstream", "No upstream is configured for this request.", retry=False)
INTERNAL = ErrorReply(500, "server_error", "gateway_error", "The gateway failed to handle this request.", True)
# The codes of a request refused before the policy was asked (counted as bad requests).
BAD_REQUEST_CODES = frozenset({"invalid_path", "method_not_allowed"})
