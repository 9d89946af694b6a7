"""One request on its way through the gateway: what was asked, decided and done, in one object.

Made once per request by :meth:`.path.Gateway.handle`, it is the one argument
every step of the request path takes, the record the relay fills in
(:class:`gateway.dataplane.relay.RelayRecord`), and what
:class:`.record.Record` writes out once the answer is over. Slotted, with
no default factories: the request path allocates this object and nothing
else per request beyond what its steps did before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Protocol

from ..clientip import ClientAddress
from ..dataplane.failover import Failover
from ..dataplane.relay import BodyTap
from ..dataplane.server import Header
from ..dataplane.upstream import BodyFor, Upstream
from ..geo import GeoFacts
from ..policy import Decision
from ..usage import Usage

if TYPE_CHECKING:  # live.active imports proxy.upstreams: at run time this would be a circle
    from ..live.active import Active
    from ..shared.budgets import Held


# Who asked for the decision: the proxy port itself, or a contract of the decision service
# (:mod:`gateway.authz`); the ``via`` label of ``regiongate_decisions_total``.
Via = Literal["proxy", "forward", "nginx", "envoy_http", "envoy_grpc", "haproxy"]


class Asked(Protocol):
    """What the request path and the record read of a request: the proxy port's
    :class:`gateway.dataplane.server.Request`, or a decision service's query (:mod:`gateway.authz.query`)."""

    @property
    def method(self) -> str: ...
    @property
    def raw_path(self) -> bytes: ...
    @property
    def query(self) -> bytes: ...
    @property
    def headers(self) -> Sequence[Header]: ...
    @property
    def peer(self) -> str | None: ...


class Meter(Protocol):
    """What measures one forwarded response's tokens (:class:`.tokens.Metered`): settled once, when it is over."""

    @property
    def tap(self) -> BodyTap: ...
    def over(self, ex: Exchange) -> None: ...


class Recorder(Protocol):
    """Writes one finished exchange out (:class:`.record.Record`)."""

    def write(self, ex: Exchange) -> None: ...


class Exchange:
    """What became of one request: asked (request, path), judged (client, facts, decision), done (the rest)."""

    __slots__ = (
        "active", "attempted", "attempts", "body", "body_for", "caller", "client", "client_gone", "decision",
        "error", "facts", "failovers", "held", "meter", "model", "path", "recorder", "refused", "request",
        "request_id", "rid", "sent", "shadow", "started", "status", "target", "ttfb", "usage", "via",
    )  # fmt: skip

    def __init__(
        self,
        recorder: Recorder,
        request: Asked,
        request_id: str,
        started: float,
        active: Active,
        path: str,
        client: ClientAddress,
        facts: GeoFacts,
        decision: Decision,
        via: Via = "proxy",
    ) -> None:
        self.recorder = recorder
        self.request = request
        self.request_id = request_id
        self.rid = request_id.encode()  # as sent in x-request-id
        self.started = started  # time.perf_counter() when its head was read
        self.active = active  # the policy (and its upstreams) judging this request, whatever reloads meanwhile
        # The canonical path, judged and forwarded; "" for a request refused before the policy (REJECTED).
        self.path = path
        self.client = client
        self.facts = facts
        self.decision = decision  # final once the model is known (when the decision needs it)
        self.shadow: Decision | None = None
        self.model: str | None = None  # the body's model; None: not read, or none found (logged alike)
        self.body_for: BodyFor | None = None  # the held body per upstream; None: the client's streams
        self.body: bytes | None = None  # the held body as the client sent it (a token budget reads it)
        # The client key's name when client keys are in force on this request (checked), else None:
        # the caller of rate limits, token budgets, the access log and the audit (never the token).
        self.caller: str | None = None
        self.meter: Meter | None = None  # the response's usage tap and what settling needs (.tokens)
        self.held: Held | None = None  # what a token budget reserved for this request, until it is settled
        self.usage: Usage | None = None  # the tokens this request used (reported or estimated), once over
        self.attempted = False
        self.attempts = 0  # sent to an upstream this many times (failovers and stale-connection retries)
        self.target: Upstream | None = None  # the URL that answered (or was tried last)
        self.failovers: list[Failover] | None = None
        self.refused: str | None = None  # an upstream's region refusal, passed on
        self.client_gone = False
        self.status = 0
        self.sent = 0
        self.error: str | None = None
        self.ttfb: float | None = None
        self.via = via

    def record(self) -> None:
        """The answer is over: usage settled (when metered), then metrics, audit and access log, once
        (the relay's completion callback, or the gateway's own answer)."""
        meter = self.meter
        if meter is not None:
            self.meter = None  # settled once, whichever way the request ended
            meter.over(self)
        self.recorder.write(self)

    def __repr__(self) -> str:
        return (
            f"<Exchange {self.request_id} {self.request.method} {self.path!r} {self.decision.verdict}"
            f" status={self.status} attempts={self.attempts}>"
        )
