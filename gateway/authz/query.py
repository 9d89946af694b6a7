"""What a proxy asks the decision service, and what it is answered: two frozen values.

A :class:`Query` is the request as the calling proxy describes it (method,
target as the client sent it, the headers the proxy forwarded, the proxy's own
address, which header carries the client, and the body when the contract sends
one). An :class:`Answer` is the verdict: the proxy port's own refusal (status,
headers, the exact OpenAI body) or an allow, with the decision's facts as
``x-regiongate-*`` headers either way. Neither knows about sockets, so the HTTP
listener and the gRPC server build and read the same two values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import httptools

Header = tuple[bytes, bytes]

# The contracts of the decision service (the proxy port is "proxy"; see gateway.proxy.exchange.Via).
Contract = Literal["forward", "nginx", "envoy_http", "envoy_grpc", "haproxy"]
CONTRACTS: tuple[Contract, ...] = ("forward", "nginx", "envoy_http", "envoy_grpc", "haproxy")

# The facts an answer carries, for the proxy to copy to the upstream (or route on).
DECISION = b"x-regiongate-decision"
RULE = b"x-regiongate-rule"
COUNTRY = b"x-regiongate-country"
SUBDIVISION = b"x-regiongate-subdivision"
UPSTREAM = b"x-regiongate-upstream"
ASN = b"x-regiongate-asn"
FACT_HEADERS = (DECISION, RULE, COUNTRY, SUBDIVISION, UPSTREAM, ASN)


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Path and query of a request target, split as the proxy port's server splits its request line."""
    try:
        parsed = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:  # not origin-form: judged (and refused) as the proxy port would
        return target, b""
    return parsed.path or b"", parsed.query or b""


@dataclass(frozen=True, slots=True)
class Query:
    """One request, as the calling proxy forwarded it.

    ``target`` is the path with its query, raw, as the client sent it (it is
    canonicalised exactly as on the proxy port). ``peer`` is the calling
    proxy's address, which is trusted: the client is read from
    ``client_header`` (walked from the right past ``--trusted-proxy`` hops).
    ``body`` is None when the contract sends no body (the model is then
    unknown, ``body.unknown_model``).
    """

    via: Contract
    method: str
    target: bytes
    headers: tuple[Header, ...]
    peer: str | None
    client_header: str = "x-forwarded-for"
    body: bytes | None = None
    raw_path: bytes = field(init=False)
    query: bytes = field(init=False)

    def __post_init__(self) -> None:
        path, query = split_target(self.target)
        object.__setattr__(self, "raw_path", path)
        object.__setattr__(self, "query", query)


@dataclass(frozen=True, slots=True)
class Answer:
    """The verdict on one query.

    ``allowed``: the proxy sends the request on (``status`` 200, ``headers``
    the request ids and the policy header). Otherwise ``status``, ``headers``
    and ``body`` are exactly what the proxy port would have answered the client
    (the OpenAI-shaped refusal, a 429 with ``retry-after``, a 400 for a path
    with no canonical form), policy header included. ``facts`` are the
    ``x-regiongate-*`` headers of the decision (decision, rule, country,
    subdivision, upstream, asn; only the ones known), for both.
    """

    allowed: bool
    status: int
    headers: tuple[Header, ...]
    body: bytes
    facts: tuple[Header, ...]
    request_id: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        for n, v in self.facts:
            if n == name:
                return v
        return None
