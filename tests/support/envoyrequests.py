"""Requests shaped exactly as Envoy's ext_authz filter sends them, gRPC and HTTP.

:func:`check_request` fills an ``envoy.service.auth.v3.CheckRequest`` field by field as Envoy's
``ext_authz`` filter does (source/common ``CheckRequestUtils``): the downstream and local
addresses, ``request.time``, and ``request.http`` with the stream id, method, ``path`` raw with its
query, ``host``, ``scheme``, ``protocol``, ``size`` (the body's length, or -1 when unknown), every
header lower-case with the pseudo-headers among them (``:authority``, ``:method``, ``:path``,
``:scheme``) and Envoy's own (``x-forwarded-proto``, ``x-request-id``, and
``x-envoy-external-address`` when Envoy is the edge and the client external), and, with
``with_request_body`` and ``pack_as_bytes``, the body in ``raw_body``.

:func:`http_check` gives the request Envoy's HTTP service mode makes: the original method, the
``path_prefix`` followed by the original path, only ``Host``, ``Content-Length``,
``Authorization`` and the headers ``allowed_headers`` names, the body, and the headers Envoy's own
HTTP client adds, among them an ``X-Forwarded-For`` that names Envoy itself (envoyproxy/envoy#21519).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf import timestamp_pb2

ENVOY_ADDRESS = "10.0.0.5"  # Envoy's own address, as its HTTP client writes it into X-Forwarded-For
# What the shipped envoy-http.yaml lets through (authorization_request.allowed_headers).
HTTP_ALLOWED = ("x-envoy-external-address", "content-type")


def _socket(address: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=address, port_value=port))


def check_request(
    method: str,
    path: str,
    client: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    edge: bool = True,
    host: str = "api.example.com",
) -> external_auth_pb2.CheckRequest:
    """A CheckRequest for ``method path`` from ``client`` (the downstream address Envoy resolved)."""
    request_id = str(uuid.uuid4())
    sent: dict[str, str] = {
        ":authority": host,
        ":method": method,
        ":path": path,
        ":scheme": "http",
        "user-agent": "OpenAI/Python 1.40.0",
        "x-forwarded-proto": "http",
        "x-request-id": request_id,
    }
    if edge:
        sent["x-envoy-external-address"] = client
    if body is not None:
        sent["content-length"] = str(len(body))
    for name, value in (headers or {}).items():
        sent[name.lower()] = value  # Envoy lower-cases every name (HTTP/1 and HTTP/2 alike)
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id=str(abs(hash(request_id))),
        method=method,
        headers=sent,
        path=path,
        host=host,
        scheme="http",
        protocol="HTTP/1.1",
        size=len(body) if body is not None else -1,
    )
    if body is not None:
        http.raw_body = body  # with_request_body + pack_as_bytes
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            source=attribute_context_pb2.AttributeContext.Peer(address=_socket(client, 50321)),
            destination=attribute_context_pb2.AttributeContext.Peer(address=_socket("10.0.0.5", 8080)),
            request=attribute_context_pb2.AttributeContext.Request(time=now, http=http),
        )
    )


@dataclass(frozen=True, slots=True)
class HttpCheck:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


def http_check(
    method: str,
    path: str,
    client: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    prefix: str = "/authz/envoy",
    host: str = "api.example.com",
) -> HttpCheck:
    """The request Envoy's HTTP service mode sends for ``method path`` from an external ``client``."""
    original = {"x-envoy-external-address": client, **{k.lower(): v for k, v in (headers or {}).items()}}
    sent = {name: original[name] for name in HTTP_ALLOWED if name in original}
    if "authorization" in original:
        sent["authorization"] = original["authorization"]
    sent.update(
        {
            "host": host,
            "content-length": str(len(body)),
            # Added by Envoy's own HTTP client to the check request: they describe Envoy, not the client.
            "x-forwarded-for": ENVOY_ADDRESS,
            "x-envoy-internal": "true",
            "x-envoy-expected-rq-timeout-ms": "250",
            "x-forwarded-proto": "http",
        }
    )
    return HttpCheck(method, prefix + path, sent, body)
