"""Where a request goes when its upstream fails before answering: the next URL of its chain.

A request to an upstream may try every URL of its chain
(:attr:`gateway.dataplane.upstream.UpstreamGroup.chain`: the group's URLs, then each
fallback's) in order, skipping the ones passive health has ejected. When
every URL of the chain is ejected they are all tried anyway, in order: an
ejection is a guess about the future, a refusal without trying is certain.

Whether a failed attempt may be followed by another is the relay's to judge
(only while nothing of the response reached the client and the body can be
sent again); what counts as a failure that another URL may not share is
here: no connection, 502/503/504, and an upstream's refusal of the
gateway's own region (a 403 whose body carries OpenAI's
``unsupported_country_region_territory``). That body is read before
anything is passed on, up to :data:`SNIFF_LIMIT`; a compressed one is
inflated when it is gzip or deflate (any other coding is passed on unread).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from .pool import Pool, Pools
from .server import Header
from .upstream import BadTarget, BodyFor, Upstream, UpstreamGroup, forward_headers

REGION_REFUSAL_CODE = "unsupported_country_region_territory"
CONNECT_ERROR, CONNECT_TIMEOUT, REGION_REFUSAL = "connect_error", "connect_timeout", "region_refusal"
STATUS_REASONS = {502: "status_502", 503: "status_503", 504: "status_504"}
SNIFF_LIMIT = 16 * 1024  # a 403 body longer than this is no refusal of ours: passed on as it comes
_MESSAGE_LIMIT = 500


@dataclass(frozen=True, slots=True)
class Failover:
    """One failed attempt that another one followed, for the record."""

    source: Upstream
    dest: Upstream
    reason: str  # connect_error, connect_timeout, status_50x, region_refusal
    status: int  # the source's answer; 0 when it gave none
    message: str | None = None  # the upstream's own words, for a region refusal


def prepare(
    upstream: Upstream,
    path: str,
    query: bytes,
    headers: list[Header],
    peer: str | None,
    decided: str | None,
) -> tuple[bytes, list[Header]]:
    """The request target and headers for one URL (raises :class:`gateway.dataplane.upstream.BadTarget`).

    No framing header is among them: the relay writes its own (:mod:`.relay`).
    """
    url = upstream.target_url(path, query)
    return url.raw_path_qs.encode("latin-1"), forward_headers(headers, peer, decided, upstream)


class Route:
    """The URLs one request may still try, and how to address each (made only when there are several)."""

    __slots__ = (
        "at", "body_for", "chain", "decided", "everyone", "groups", "headers", "path", "peer", "pools", "query",
    )  # fmt: skip

    def __init__(
        self,
        chain: tuple[Upstream, ...],
        groups: Mapping[str, UpstreamGroup],
        pools: Pools,
        headers: list[Header],
        peer: str | None,
        decided: str | None,
        path: str,
        query: bytes,
        body_for: BodyFor | None,
    ) -> None:
        self.chain = chain
        self.groups = groups
        self.pools = pools
        self.headers = headers  # the client's, kept (the request forgets its own) until an answer is passed on
        self.peer = peer
        self.decided = decided
        self.path = path
        self.query = query
        self.body_for = body_for
        self.at = -1
        self.everyone = False

    def first(self) -> Upstream:
        i = self._pick(0)
        if i is None:  # all ejected: try them all, in order
            self.everyone, i = True, 0
        self.at = i
        return self.chain[i]

    def body(self, upstream: Upstream) -> bytes | None:
        return None if self.body_for is None else self.body_for(self.groups[upstream.name])

    def next(self) -> tuple[Pool, bytes, list[Header], bytes | None] | None:
        """The next URL's pool, target, headers and body (when the body is the gateway's); None: no more."""
        while True:
            i = self._pick(self.at + 1)
            if i is None:
                return None
            self.at = i
            upstream = self.chain[i]
            body = self.body(upstream)
            try:
                target, headers = prepare(upstream, self.path, self.query, self.headers, self.peer, self.decided)
            except BadTarget:
                continue
            return self.pools.pool(upstream), target, headers, body

    def _pick(self, start: int) -> int | None:
        chain = self.chain
        if self.everyone:
            return start if start < len(chain) else None
        now = time.monotonic()
        pools = self.pools.made  # a URL without a pool yet has never failed
        for i in range(start, len(chain)):
            pool = pools.get(chain[i])
            if pool is None or not pool.health.ejected(now):
                return i
        return None


def region_refusal(body: bytes, encoding: bytes | None) -> str | None:
    """The upstream's message when this 403 body is OpenAI's refusal of the caller's region, else None."""
    if encoding:
        coding = encoding.strip().lower()
        if coding not in (b"gzip", b"x-gzip", b"deflate"):
            return None
        try:
            inflate = zlib.decompressobj(47 if coding != b"deflate" else 15)  # 47: gzip or zlib header
            body = inflate.decompress(body, SNIFF_LIMIT)
        except zlib.error:
            return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or error.get("code") != REGION_REFUSAL_CODE:
        return None
    message = error.get("message")
    return message[:_MESSAGE_LIMIT] if isinstance(message, str) else ""


class Notices:
    """At most one warning per minute per key (an upstream refusing every request must not flood the log)."""

    __slots__ = ("every", "last")

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self.last: dict[str, float] = {}

    def due(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        last = self.last.get(key)
        if last is not None and now - last < self.every:
            return False
        self.last[key] = now
        return True
