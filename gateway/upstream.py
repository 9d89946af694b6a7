"""Where allowed requests go, and the one HTTP client that takes them there.

An upstream is a base URL; a request's path and query are appended to it and
nothing else about the request (request line, ``Host``, absolute-form URL)
can change the scheme, host or port. The target is checked again after it is
built, because that check is cheaper than being wrong once.

The client is one ``aiohttp`` session per worker: a keep-alive pool, no
cookie jar (cookies of one caller must never reach another), no automatic
decompression (bytes pass through with their ``content-encoding``), no
redirects followed (a redirect is the upstream's answer to the client).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import aiohttp
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
_REQUEST_DROP = HOP_BY_HOP | {b"expect"}
# The server in front of the client writes its own Date.
_RESPONSE_DROP = HOP_BY_HOP | {b"date"}
# aiohttp would otherwise add its own values when the client sent none.
SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


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
    client_timeout: aiohttp.ClientTimeout

    def target(self, raw_path: bytes, query: bytes) -> URL:
        """The upstream URL for a request, or :class:`BadTarget`.

        Dot segments are refused rather than resolved: an upstream with a
        base path (``https://host/openai``) must not be escaped with ``..``.
        """
        if not raw_path.startswith(b"/"):
            raise BadTarget("request target must be an absolute path")
        if b"." in raw_path or b"%" in raw_path or b"\\" in raw_path:
            _check_segments(raw_path)
        text = self.base + raw_path.decode("latin-1")
        if query:
            text += "?" + query.decode("latin-1")
        url = URL(text, encoded=True)
        if url.host != self.url.host or url.port != self.url.port or url.scheme != self.url.scheme:
            raise BadTarget("request target would leave the configured upstream")
        return url


_DOT_SEGMENTS = frozenset({b".", b"..", b"%2e", b"%2e%2e", b".%2e", b"%2e."})


def _check_segments(raw_path: bytes) -> None:
    lowered = raw_path.lower()
    if b"\\" in lowered or b"%5c" in lowered:
        raise BadTarget("backslashes are not allowed in the request path")
    for segment in lowered.split(b"/"):
        if segment in _DOT_SEGMENTS:
            raise BadTarget("'.' and '..' path segments are not allowed")


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
            client_timeout=aiohttp.ClientTimeout(total=None, sock_connect=spec.timeouts.connect),
        )
    return out


def forward_headers(
    headers: Iterable[tuple[bytes, bytes]], peer: str | None, upstream: Upstream
) -> list[tuple[bytes, bytes]]:
    """The client's headers as the upstream should see them, byte for byte.

    Hop-by-hop headers (and any the client's ``Connection`` names) are
    dropped, and so is ``Expect``: the gateway answers ``100-continue``
    itself and holds the body. The peer is appended to ``X-Forwarded-For``,
    and the client's ``Authorization`` is replaced when the upstream has
    its own key. Names arrive lower-cased; values are never re-encoded.
    """
    out: list[tuple[bytes, bytes]] = []
    drop = _REQUEST_DROP
    xff = None
    for name, value in headers:
        if name in drop:
            if name == b"connection":
                extra = {t.strip().lower() for t in value.split(b",")}
                drop = drop | extra
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
    if upstream.authorization is not None:
        out.append((b"authorization", upstream.authorization.encode("latin-1")))
    return out


def request_headers(
    headers: Iterable[tuple[bytes, bytes]], peer: str | None, upstream: Upstream
) -> list[tuple[str, str]]:
    """:func:`forward_headers` as text, for aiohttp (the ``asgi`` data plane)."""
    named = {b"x-forwarded-for": "X-Forwarded-For", b"authorization": "Authorization"}
    return [
        (named.get(n) or n.decode("latin-1"), v.decode("latin-1")) for n, v in forward_headers(headers, peer, upstream)
    ]


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


def new_session(pool_size: int = 0) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=pool_size, keepalive_timeout=30, ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=SKIP_AUTO_HEADERS,
    )
