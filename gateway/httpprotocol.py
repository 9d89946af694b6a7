"""uvicorn's HTTP/1.1 protocol for the proxy port, with the gateway's answer to bad bytes.

uvicorn answers a request its parser (llhttp) rejects with a ``text/plain``
400 and a warning line on stderr for every one, unlogged and uncounted.
Here that answer is OpenAI-shaped JSON, counted in
``regiongate_bad_requests_total{reason}``, and logged at most once a minute
per reason. An unsupported ``Upgrade`` is ignored the same quiet way (the
request is served as plain HTTP, and ``Upgrade`` never reaches the upstream).
"""

from __future__ import annotations

from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import errors

# llhttp's error classes, mapped to a bounded set of metric labels.
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (httptools.HttpParserInvalidMethodError, "invalid_method"),
    (httptools.HttpParserInvalidURLError, "invalid_url"),
)


def reason_for(exc: Exception) -> str:
    for cls, reason in _REASONS:
        if isinstance(exc, cls):
            return reason
    return "malformed_request"


class ProxyHttpProtocol(HttpToolsProtocol):
    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._reject(reason_for(e), str(e))
        except httptools.HttpParserUpgrade:
            self._note("upgrade", "ignored an Upgrade request header (only plain HTTP/1.1 is proxied)")

    def _unsupported_upgrade_warning(self) -> None:
        self._note("upgrade", "ignored an Upgrade request header (only plain HTTP/1.1 is proxied)")

    def _note(self, reason: str, detail: str) -> None:
        hook = getattr(self.app, "parser_error", None)
        if hook is not None:
            hook(reason, detail, count=False)

    def _reject(self, reason: str, detail: str) -> None:
        hook: Any = getattr(self.app, "parser_error", None)
        if hook is not None:
            hook(reason, detail, count=True)
        error = errors.bad_request(f"The request could not be parsed as HTTP/1.1: {detail[:200]}", reason)
        body = error.body()
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\n"
            b"content-type: application/json\r\n"
            b"content-length: %d\r\n"
            b"x-should-retry: false\r\n"
            b"connection: close\r\n\r\n" % len(body) + body
        )
        self.transport.close()
