"""Where allowed requests go, and which of the client's headers go with them.

An upstream is a base URL; a request's path and query are appended to it and
nothing else about the request (request line, ``Host``, absolute-form URL)
can change the scheme, host or port. The target is checked again after it is
built, because that check is cheaper than being wrong once. How the bytes
travel (keep-alive pools, TLS, no cookies, bodies untouched, redirects passed
back to the client) is :mod:`gateway.dataplane`'s.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from yarl import URL

from .policy import Timeouts, UpstreamSpec

# Headers that describe one connection, not the message (RFC 9110 §7.6.1),
# plus the ones the gateway sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)
# Headers in which a caller can claim an address. An upstream that reads any
# of them would be fooled by what the client wrote, so none goes up as sent:
# X-Forwarded-For is extended with the peer (the usual chain), and the one
# address the gateway decided on travels in CLIENT_IP_HEADER.
ADDRESS_HEADERS = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"akamai-client-ip",
        b"x-client-ip",
        b"client-ip",
        b"x-cluster-client-ip",
        b"x-original-forwarded-for",
        b"x-forwarded",
        b"forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-port",
        b"x-proxyuser-ip",
        b"x-envoy-external-address",
        b"x-regiongate-client-ip",
    }
)
CLIENT_IP_HEADER = "X-Regiongate-Client-IP"
_CLIENT_IP_HEADER_BYTES = CLIENT_IP_HEADER.lower().encode()
# The gateway answers "Expect: 100-continue" itself and then holds the body;
# passing it on would make the upstream wait for a 100 that nobody sends.
_REQUEST_DROP = HOP_BY_HOP | ADDRESS_HEADERS | {b"expect"}
# The server in front of the client writes its own Date.
_RESPONSE_DROP = HOP_BY_HOP | {b"date"}


class UpstreamConfigError(Exception):
    pass


class BadTarget(ValueError):
    """A request path that cannot be forwarded safely."""



@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: URL
    base: str
    authorization: str | None
    timeouts: Timeouts

    def target(self, path: str, query: bytes) -> URL:
        """The upstream URL for a canonical request path (:func:`requestpath.canonical`).

        The path was already refused if it could climb out of the base path;
        the host check is kept because it is cheaper than being wrong once.
        """
        text = self.base + path
        if query:
            text += "?" + query.decode("latin-1")
        url = URL(text, encoded=True)
        if url.host != self.url.host or url.port != self.url.port or url.scheme != self.url.scheme:
            raise BadTarget("request target would leave the configured upstream")
        return url


def build_upstreams(specs: Mapping[str, UpstreamSpec], env: Mapping[str, str] = os.environ) -> dict[str, Upstream]:
    """Resolve API keys from the environment now, so a missing one fails at startup."""
    out: dict[str, Upstream] = {}
    for name, spec in specs.items():
        auth = None
        if spec.api_key_env:
            key = env.get(spec.api_key_env)
            if not key:
                raise UpstreamConfigError(
                    f"upstream {name!r}: api_key_env {spec.api_key_env!r} is not set in the environment"
                )
            auth = f"Bearer {key}"
        url = URL(spec.url)
        out[name] = Upstream(
            name=name,
            url=url,
            base=str(url).rstrip("/"),
            authorization=auth,
            timeouts=spec.timeouts,
        )
    return out


def forward_headers(
    headers: Iterable[tuple[bytes, bytes]], peer: str | None, client_ip: str | None, upstream: Upstream
) -> list[tuple[bytes, bytes]]:
    """The client's headers as the upstream should see them, byte for byte.

    Hop-by-hop headers (and any the client's ``Connection`` names) and every
    address header are dropped, and so is ``Expect``: the gateway answers
    ``100-continue`` itself and holds the body. The peer is appended to
    ``X-Forwarded-For``, the decided client address is set in
    :data:`CLIENT_IP_HEADER`, and the client's ``Authorization`` is replaced
    when the upstream has its own key. Names arrive lower-cased; values are
    never re-encoded.
    """
    out: list[tuple[bytes, bytes]] = []
    drop = _REQUEST_DROP
    xff = None
    for name, value in headers:
        if name in drop:
            if name == b"connection":
                extra = {t.strip().lower() for t in value.split(b",")}
                drop = drop | extra
                if b"x-forwarded-for" in extra:
                    xff = None
                out = [(n, v) for n, v in out if n not in extra]
            continue
        if name == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
            continue
        if name == b"authorization" and upstream.authorization is not None:
            continue
        out.append((name, value))
    if peer:
        xff = peer.encode() if xff is None else xff + b", " + peer.encode()
    if xff is not None:
        out.append((b"x-forwarded-for", xff))
    if client_ip is not None:
        out.append((_CLIENT_IP_HEADER_BYTES, client_ip.encode()))
    if upstream.authorization is not None:
        out.append((b"authorization", upstream.authorization.encode("latin-1")))
    return out


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    connection_named: set[bytes] = set()
    out = []
    for name, value in raw:
        lname = name.lower()
        if lname == b"connection":
            connection_named = {t.strip().lower() for t in value.split(b",")}
            continue
        if lname in _RESPONSE_DROP:
            continue
        out.append((lname, value))
    if connection_named:
        out = [(n, v) for n, v in out if n not in connection_named]
    return out
