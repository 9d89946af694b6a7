"""Where allowed requests go, and which of the client's headers go with them (and come back).

An upstream is a base URL; a request's path and query are appended to it and
nothing else about the request (request line, ``Host``, absolute-form URL)
can change the scheme, host or port. The target is checked again after it is
built, because that check is cheaper than being wrong once. How the bytes
travel (keep-alive pools, TLS, no cookies, bodies untouched, redirects passed
back to the client) is the rest of :mod:`gateway.dataplane`'s. Built from the
policy's upstream specs by :mod:`gateway.proxy.upstreams`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from yarl import URL

from .limits import HealthSettings, UpstreamTimeouts

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
# How a message's body is delimited. The relay writes these itself, in both
# directions, from what the parser counted (dataplane/relay.py): a peer's own
# copies never pass, so no Connection token can take framing away and no
# spelling of it can add a second one.
FRAMING = frozenset({b"content-length", b"transfer-encoding"})
# The gateway answers "Expect: 100-continue" itself and then holds the body;
# passing it on would make the upstream wait for a 100 that nobody sends.
_REQUEST_DROP = HOP_BY_HOP | ADDRESS_HEADERS | FRAMING | {b"expect"}
# The server in front of the client writes its own Date.
_RESPONSE_DROP = HOP_BY_HOP | FRAMING | {b"date"}
# The gateway's own response headers: an upstream's copy would pass for the gateway's word.
_OWN_PREFIX = b"x-regiongate-"
# The bytes "_" and ".", as integers: `95 in name` is a byte search (40 ns), `b"_" in name` takes
# the needle's buffer first (240 ns), and both run for nearly every header, both ways.
_UNDERSCORE, _DOT = ord("_"), ord(".")
# A name with "_" or "." is the same header to a server that maps names to CGI-style
# variables (Content_Length and Content-Length both become CONTENT_LENGTH): such a
# spelling of a header the gateway drops or sets is dropped too.
_SPELLING = bytes.maketrans(b"_.", b"--")


_DEFAULT_HEALTH = HealthSettings()


class BadTarget(ValueError):
    """A request path that cannot be forwarded safely."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """One URL of a configured upstream: a keep-alive pool's key, and the unit of passive health.

    ``target`` is its place in the group ("0", "1", ...), the metrics label: never the URL.
    ``auth`` is the (lower-case name, value) header that replaces the client's; never logged.
    """

    name: str
    target: str
    url: URL
    base: str
    timeouts: UpstreamTimeouts
    auth: tuple[bytes, bytes] | None = field(default=None, repr=False)
    forward_client: bool = True
    health: HealthSettings = _DEFAULT_HEALTH
    # Derived once: what forward_headers drops, the log and metrics label, the hash (a pool lookup per request).
    drop: frozenset[bytes] = field(init=False, compare=False, repr=False)
    label: str = field(init=False, compare=False, repr=False)
    _hash: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        drop = _REQUEST_DROP
        if self.auth is not None:
            drop = drop | {b"authorization", self.auth[0]}
        if not self.forward_client:
            drop = drop | {b"x-forwarded-for"}
        set_ = object.__setattr__
        set_(self, "drop", drop)
        set_(self, "label", f"{self.name}/{self.target}")
        set_(self, "_hash", hash((self.name, self.target, self.base, self.timeouts, self.auth, self.forward_client)))

    def __hash__(self) -> int:
        return self._hash

    def target_url(self, path: str, query: bytes) -> URL:
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


@dataclass(frozen=True, slots=True)
class UpstreamGroup:
    """One configured upstream (what a rule's ``upstream:`` names): its URLs, model map and fallbacks.

    ``chain`` is every URL a request to it may try, in order: its own, then each fallback's
    chain, each URL once. Passive health decides which of them are skipped.
    """

    name: str
    members: tuple[Upstream, ...]
    models: Mapping[str, str]
    fallback: tuple[str, ...]
    chain: tuple[Upstream, ...] = ()


# The bytes a held request body becomes for one upstream (its model renamed by that upstream's map).
BodyFor = Callable[[UpstreamGroup], bytes]


def forward_headers(
    headers: Iterable[tuple[bytes, bytes]],
    peer: str | None,
    client_ip: str | None,
    upstream: Upstream,
) -> list[tuple[bytes, bytes]]:
    """The client's headers as the upstream should see them, byte for byte.

    Hop-by-hop headers (and any the client's ``Connection`` names) and every
    address header are dropped, and so is ``Expect``: the gateway answers
    ``100-continue`` itself and holds the body. So are the framing headers
    (:data:`FRAMING`): the relay writes its own, after these, so nothing
    here can remove or add one. A name that a CGI-style server would read as
    one of the dropped ones (``Content_Length``, ``X_Forwarded_For``) is
    dropped as well. The peer is appended to ``X-Forwarded-For`` and the
    decided client address is set in :data:`CLIENT_IP_HEADER`, unless the
    upstream is told nothing about the client (``client_address: drop``:
    then neither goes, nor the client's own ``X-Forwarded-For``). An
    upstream with its own key gets it in its auth header, and neither the
    client's ``Authorization`` nor its copy of that header. Names arrive
    lower-cased; values are never re-encoded.
    """
    out: list[tuple[bytes, bytes]] = []
    drop = upstream.drop
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
        if (_UNDERSCORE in name or _DOT in name) and _spelled_as(name, drop):
            continue
        out.append((name, value))
    if upstream.forward_client:
        if peer:
            xff = peer.encode() if xff is None else xff + b", " + peer.encode()
        if xff is not None:
            out.append((b"x-forwarded-for", xff))
        if client_ip is not None:
            out.append((_CLIENT_IP_HEADER_BYTES, client_ip.encode()))
    if upstream.auth is not None:
        out.append(upstream.auth)
    return out


def _spelled_as(name: bytes, drop: frozenset[bytes]) -> bool:
    """Whether ``name`` (holding ``_`` or ``.``) is another spelling of a dropped or gateway-set header."""
    spelled = name.translate(_SPELLING)
    return spelled in drop or spelled == b"x-forwarded-for" or spelled.startswith(_OWN_PREFIX)


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers as the client should see them: lower-cased names, values untouched.

    Hop-by-hop headers (and any the upstream's ``Connection`` names), framing
    (the relay writes its own: :data:`FRAMING`), ``Date`` and the gateway's
    own ``x-regiongate-*`` headers are dropped, with every ``_``/``.`` spelling
    of them.
    """
    connection_named: set[bytes] = set()
    out = []
    for name, value in raw:
        lname = name.lower()
        if lname == b"connection":
            connection_named = {t.strip().lower() for t in value.split(b",")}
            continue
        if lname in _RESPONSE_DROP or lname.startswith(_OWN_PREFIX):
            continue
        if (_UNDERSCORE in lname or _DOT in lname) and _spelled_as(lname, _RESPONSE_DROP):
            continue
        out.append((lname, value))
    if connection_named:
        out = [(n, v) for n, v in out if n not in connection_named]
    return out
