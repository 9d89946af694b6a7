"""The decision service's core: the proxy port's judging steps, with an answer where the proxy forwards.

:class:`Judge` is the proxy port's :class:`gateway.proxy.path.Gateway` with
its terminal steps replaced: ``judge`` (method and path, client address,
geo, override, decision, shadow, model from the body, rate limit) is the very
same code; ``forward`` answers "allowed" with the decision's facts instead of
relaying, and ``block`` / ``fail`` / ``crashed`` answer the refusal the proxy
port would have sent, byte for byte. A rule's ``token_limit`` and
``max_concurrent`` reserve nothing here (``budgeted`` goes straight to
``forward``): the service never sees the response, so it could never settle
or release what it reserved; it enforces request limits only. Metrics, audit and access log are written
by the same recorder, with ``via`` naming the contract.

One Judge per contract and worker, made on the worker's event loop; :meth:`Judge.ask`
is called on that loop's thread. Its callback is called once per query, on the
same thread: before ``ask`` returns when nothing has to wait, later when the
deciding rule's rate limit asks Redis.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..cidrs import CidrSet
from ..clientip import PUBLIC, AddressError, ClientIPConfig, parse_address, resolve
from ..dataplane.limits import Limits
from ..dataplane.relay import error_headers
from ..dataplane.server import header
from ..errors import ErrorReply
from ..modelfield import is_json
from ..policy import DENY
from ..proxy.exchange import Exchange, Via
from ..proxy.path import Gateway
from ..proxy.record import Metrics
from ..proxy.replies import INTERNAL
from .query import ASN, COUNTRY, DECISION, RULE, SUBDIVISION, UPSTREAM, Answer, Contract, Header, Query

if TYPE_CHECKING:  # runtime imports proxy.upstreams, which runs the proxy package's __init__
    from ..runtime import Runtime

log = logging.getLogger("regiongate")

Then = Callable[[Answer], None]

# Calling proxies are few (a fleet's addresses); past this many, the trust cache starts afresh.
_MAX_PEERS = 4096


class Asking:
    """One query on its way through the steps: what :class:`gateway.proxy.exchange.Asked` reads, and whom to answer."""

    __slots__ = ("answered", "body", "headers", "method", "peer", "query", "raw_path", "then")

    def __init__(self, query: Query, then: Then) -> None:
        self.method = query.method
        self.raw_path = query.raw_path
        self.query = query.query
        self.headers: Sequence[Header] = query.headers
        self.peer = query.peer
        self.body = query.body
        self.then = then
        self.answered = False


def _text(value: str) -> bytes:
    """A header value from policy or geo text: visible ASCII kept, anything else percent-encoded (RFC 3986)."""
    raw = value.encode()
    if all(0x20 < b < 0x7F and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes([b]) if 0x20 < b < 0x7F and b != 0x25 else b"%%%02X" % b for b in raw)


def facts_of(ex: Exchange) -> tuple[Header, ...]:
    """The decision's facts as ``x-regiongate-*`` headers (those known)."""
    decision, facts, client = ex.decision, ex.facts, ex.client
    country = facts.country or (client.kind if client.kind != PUBLIC else "unknown")
    out: list[Header] = [(DECISION, decision.verdict.encode()), (RULE, _text(decision.rule)), (COUNTRY, _text(country))]
    if facts.subdivisions:
        out.append((SUBDIVISION, _text(",".join(facts.subdivisions))))
    if decision.upstream and decision.verdict != DENY:
        out.append((UPSTREAM, _text(decision.upstream)))
    if facts.asn is not None:
        out.append((ASN, b"%d" % facts.asn))
    return tuple(out)


class Judge(Gateway):
    """The proxy port's steps for one contract, answering instead of forwarding."""

    def __init__(self, runtime: Runtime, metrics: Metrics, limits: Limits, via: Contract) -> None:
        super().__init__(runtime, metrics, limits)
        self.via: Via = via
        self._trust: dict[tuple[str | None, str], ClientIPConfig] = {}

    def ask(self, query: Query, then: Then) -> None:
        """Judge ``query``; ``then(answer)`` is called once, on this thread (now, or when Redis answers)."""
        started = time.perf_counter()
        asking = Asking(query, then)
        self.judge(asking, resolve(query.peer, query.headers, self._config(query.peer, query.client_header)), started)

    def _config(self, peer: str | None, client_header: str) -> ClientIPConfig:
        """``--trusted-proxy`` plus the calling proxy itself: it vouches for the client in ``client_header``."""
        key = (peer, client_header)
        config = self._trust.get(key)
        if config is None:
            trusted = self.runtime.clientip.trusted
            networks: list[str] = [str(n) for n in trusted.networks]
            if peer is not None:
                # Normalised, as resolve() will compare it; not an address: resolve() reports it invalid.
                with contextlib.suppress(AddressError):
                    networks.append(str(parse_address(peer)))
            if len(self._trust) >= _MAX_PEERS:
                self._trust.clear()
            config = self._trust[key] = ClientIPConfig(CidrSet(networks), client_header)
        return config

    # --- the terminal steps, answering ---------------------------------------------------

    def read_model(self, ex: Exchange) -> None:
        """The model of the body the contract sent (JSON only, at most ``body.max_bytes``); none: unknown."""
        asking: Asking = ex.request  # type: ignore[assignment]  # a Judge's exchanges hold an Asking
        body = asking.body
        spec = ex.active.policy.spec.body
        if body is None or len(body) > spec.max_bytes or not is_json(header(list(asking.headers), b"content-type")):
            self.with_model(ex, None)
        else:
            self.with_model(ex, body)

    def budgeted(self, ex: Exchange) -> None:
        """Token limits are the proxy port's alone: no response passes a decision service, so it could reserve
        but never settle or release. It reserves nothing (no tap, no slot) and answers (docs/edges)."""
        self.forward(ex)

    def forward(self, ex: Exchange) -> None:
        headers = ((b"x-request-id", ex.rid), (b"x-regiongate-request-id", ex.rid), ex.active.header)
        self._answer(ex, Answer(True, 200, headers, b"", facts_of(ex), ex.rid))

    def block(self, ex: Exchange) -> None:
        policy = ex.active.policy
        headers = tuple(error_headers(ex.rid, False, ex.active.header))
        self._answer(ex, Answer(False, policy.spec.block.status, headers, policy.block_body, facts_of(ex), ex.rid))

    def fail(self, ex: Exchange, reply: ErrorReply) -> None:
        ex.error = reply.code
        headers = (*error_headers(ex.rid, reply.retry, ex.active.header), *reply.headers)
        self._answer(ex, Answer(False, reply.status, headers, reply.body(), facts_of(ex), ex.rid))

    def crashed(self, ex: Exchange) -> None:
        log.exception("decision %s failed", ex.request_id)
        asking: Asking = ex.request  # type: ignore[assignment]  # a Judge's exchanges hold an Asking
        if not asking.answered:
            self.fail(ex, INTERNAL)

    def _answer(self, ex: Exchange, answer: Answer) -> None:
        asking: Asking = ex.request  # type: ignore[assignment]  # a Judge's exchanges hold an Asking
        if asking.answered:
            return
        asking.answered = True
        ex.status, ex.sent = answer.status, len(answer.body)
        try:
            asking.then(answer)
        finally:
            ex.record()
