"""The proxy port's request path, one straight line per request:

    address  ->  geo facts  ->  decision  ->  refuse or forward  ->  record

Everything that decides is a pure function in another module
(:func:`clientip.resolve`, :meth:`geo.Geo.lookup`, :func:`policy.decide`);
how bytes move is :mod:`gateway.dataplane`'s. This file joins them and
keeps the promises about the gateway's own answers: they are OpenAI-shaped
JSON, a method outside :data:`ALLOWED_METHODS` gets a 405 (``TRACE`` would
echo the injected upstream key), a path that could escape the upstream's
base gets a 400, and every request is recorded once, when its answer is over.

``handle`` is called by the server for each request, in the loop turn that
read its head: no task per request. A forwarded request's record is written
by the relay's completion callback.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

from . import errors
from .clientip import PUBLIC, ClientAddress, resolve
from .dataplane.limits import Limits
from .dataplane.pool import Pool
from .dataplane.relay import Relay, error_headers, send_error
from .dataplane.server import Request
from .errors import GatewayError
from .geo import NO_FACTS, GeoFacts
from .policy import DENY, Decision, decide
from .runtime import Runtime
from .upstream import BadTarget, forward_headers

log = logging.getLogger("regiongate")

# What OpenAI-compatible APIs use. TRACE would echo the upstream key back,
# CONNECT and the WebDAV family have no business here.
ALLOWED_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class Outcome:
    """What became of one request, for the record."""

    __slots__ = ("attempted", "client_gone", "error", "sent", "status", "ttfb")

    def __init__(self) -> None:
        self.attempted = False
        self.client_gone = False
        self.status = 0
        self.sent = 0
        self.error: str | None = None
        self.ttfb: float | None = None


class Gateway:
    def __init__(self, runtime: Runtime, metrics: Any, limits: Limits) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.limits = limits
        self.pools: dict[str, Pool] = {}
        prefix = os.urandom(4).hex()
        self._ids = (f"rg-{prefix}{n:08x}" for n in itertools.count())

    def open(self, bound: int) -> None:
        """One keep-alive pool per upstream (inside the running loop)."""
        self.pools = {name: Pool(up, self.limits, bound) for name, up in self.runtime.upstreams.items()}

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def handle(self, request: Request) -> None:
        started = time.perf_counter()
        rt = self.runtime
        policy = rt.policy
        request_id = next(self._ids)

        # 1. Who is asking.
        client = resolve(request.peer, request.headers, rt.clientip)
        # 2. Where they are.
        facts = rt.geo.lookup(client.ip) if client.kind == PUBLIC else NO_FACTS  # type: ignore[arg-type]
        # 3. What the policy says.
        path = request.path
        decision = decide(policy, client, facts, path if "//" not in path else _squash_slashes(path))
        # 4. Refuse or forward; 5. record, now or when the answer is over.
        outcome = Outcome()

        def record() -> None:
            self.record(request, request_id, client, facts, decision, outcome, time.perf_counter() - started)

        rid = request_id.encode()
        try:
            if decision.verdict == DENY:
                block = policy.spec.block
                request.respond(block.status, error_headers(rid, False), policy.block_body)
                outcome.status, outcome.sent = block.status, len(policy.block_body)
                record()
            else:
                self.forward(request, decision, rid, outcome, record)
        except Exception:
            # A bug of ours must still give the client an OpenAI-shaped answer.
            log.exception("request %s failed", request_id)
            if not request.started:
                self.fail(request, errors.INTERNAL, rid, outcome, record)
            else:
                request.abort()
                outcome.error = outcome.error or errors.INTERNAL.code
                record()

    def forward(self, request: Request, decision: Decision, rid: bytes, outcome: Outcome, record: Any) -> None:
        pool = self.pools.get(decision.upstream or "")
        if pool is None:
            self.fail(request, errors.NO_UPSTREAM, rid, outcome, record)
            return
        if request.method not in ALLOWED_METHODS:
            self.fail(request, METHOD_NOT_ALLOWED, rid, outcome, record)
            return
        upstream = pool.upstream
        try:
            url = upstream.target(request.raw_path, request.query)
        except BadTarget as e:
            self.fail(request, errors.bad_request(str(e), "invalid_path"), rid, outcome, record)
            return
        headers = forward_headers(request.headers, request.peer, upstream)
        Relay(request, pool, url.raw_path_qs.encode("latin-1"), headers, rid, outcome, record).start()

    def fail(self, request: Request, error: GatewayError, rid: bytes, outcome: Outcome, record: Any) -> None:
        body = error.body()
        outcome.status, outcome.error, outcome.sent = error.status, error.code, len(body)
        send_error(request, error, rid)
        record()

    def record(
        self,
        request: Request,
        request_id: str,
        client: ClientAddress,
        facts: GeoFacts,
        decision: Decision,
        ex: Outcome,
        seconds: float,
    ) -> None:
        country = facts.country or (client.kind if client.kind != PUBLIC else "unknown")
        m = self.metrics
        m.decision(decision.verdict, decision.rule, country)
        m.request(decision.verdict, seconds)
        for rule in decision.shadow:
            m.shadow_match(rule)
        if ex.attempted and not (ex.client_gone and ex.ttfb is None):
            # The upstream's own status if it answered, else 0 ("error": unreachable, timed out).
            m.upstream(decision.upstream or "", ex.status if ex.ttfb is not None else 0, ex.ttfb)
        log_ = self.runtime.access_log
        if not log_.enabled:
            return
        entry: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "method": request.method,
            "path": request.path,
            "client": log_.redact(client.ip),
            "client_via": client.via,
            "decision": decision.verdict,
            "action": decision.action,
            "rule": decision.rule,
            "country": facts.country,
            "upstream": decision.upstream if decision.verdict != DENY else None,
            "status": ex.status,
            "duration_ms": round(seconds * 1000, 3),
            "bytes": ex.sent,
        }
        if facts.subdivisions:
            entry["subdivisions"] = facts.subdivisions
        if facts.asn is not None:
            entry["asn"] = facts.asn
        if facts.anonymizer:
            entry["anonymizer"] = sorted(facts.anonymizer)
        if client.problem:
            entry["client_problem"] = client.problem
        if decision.shadow:
            entry["shadow"] = decision.shadow
        if ex.ttfb is not None:
            entry["ttfb_ms"] = round(ex.ttfb * 1000, 3)
        if ex.error:
            entry["error"] = ex.error
        log_.write(entry)


METHOD_NOT_ALLOWED = GatewayError(
    405, "invalid_request_error", "method_not_allowed", "This method is not allowed through the gateway."
)


def _squash_slashes(path: str) -> str:
    while "//" in path:
        path = path.replace("//", "/")
    return path
