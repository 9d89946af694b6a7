"""The proxy port's request path, one straight line per request:

    address  ->  geo facts  ->  decision  ->  refuse or forward  ->  record

Everything that decides is a pure function in another module
(:func:`clientip.resolve`, :meth:`geo.Geo.lookup`, :func:`policy.decide`);
how bytes move is :mod:`gateway.dataplane`'s. This file joins them and
keeps the promises about the gateway's own answers: they are OpenAI-shaped
JSON, a method outside ``--allow-method`` gets a 405 (``TRACE`` would echo
the injected upstream key), the path is judged, forwarded and logged in one
canonical form (:mod:`gateway.requestpath`) and one that has none gets a 400,
every answer names the policy that judged it, and every request is recorded
once, when its answer is over.

``handle`` is called by the server for each request, in the loop turn that
read its head: no task per request. A forwarded request's record is written
by the relay's completion callback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any

from . import errors
from .clientip import MISSING, PUBLIC, ClientAddress, resolve
from .dataplane.limits import Limits
from .dataplane.pool import Pool
from .dataplane.relay import Relay, error_headers, send_error
from .dataplane.server import Request
from .errors import GatewayError
from .geo import NO_FACTS, GeoFacts
from .live.active import Active
from .policy import DENY, Decision, decide
from .requestid import RequestIds
from .requestpath import BadPath, canonical
from .runtime import Runtime
from .shared.audit import entry as audit_entry
from .shared.overrides import judge as judge_override
from .shared.overrides import request_key_hash
from .shared.ratelimit import check as check_rate
from .upstream import BadTarget, Upstream, forward_headers

log = logging.getLogger("regiongate")


class Outcome:
    """What became of one request, for the record."""

    __slots__ = ("active", "attempted", "client_gone", "error", "sent", "shadow", "status", "ttfb")

    def __init__(self, active: Active) -> None:
        self.active = active  # the policy (and its upstreams) judging this request, whatever reloads meanwhile
        self.shadow: Decision | None = None
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
        self.bound = 1
        self.pools: dict[Upstream, Pool] = {}
        self._ids = RequestIds()

    def open(self, bound: int) -> None:
        """Keep-alive pools are made per upstream as requests need them (inside the running loop)."""
        self.bound = bound

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def retire_upstreams(self, old: Mapping[str, Upstream], new: Mapping[str, Upstream]) -> None:
        """After a reload: pools of upstreams no longer configured close as their requests end."""
        keep = set(new.values())
        for upstream in set(old.values()) - keep:
            pool = self.pools.pop(upstream, None)
            if pool is not None:
                pool.close()  # idle connections now; busy ones when released

    def handle(self, request: Request) -> None:
        started = time.perf_counter()
        rt = self.runtime
        active = rt.active
        policy = active.policy
        request_id = next(self._ids)

        # 0. What is asked, in the one form that is both judged and forwarded.
        path, bad = _request_target(request.method, request.raw_path, rt.allow_methods)
        # 1. Who is asking.
        client = resolve(request.peer, request.headers, rt.clientip)
        # 2. Where they are.
        facts = rt.geo.lookup(client.ip) if client.kind == PUBLIC else NO_FACTS  # type: ignore[arg-type]
        # 3. What an operator's runtime override says (gateway.shared), else what the policy says
        #    (and a shadow policy, judged too, never enforced).
        ov = rt.overrides
        override = judge_override(ov.compiled, client, facts, request_key_hash(ov.compiled, ov.key, request.headers))
        decision = REJECTED if path is None else override or decide(policy, client, facts, path)
        outcome = Outcome(active)
        if active.shadow is not None and path is not None:
            outcome.shadow = decide(active.shadow, client, facts, path)
        # 4. Refuse or forward; 5. record, now or when the answer is over.

        def record() -> None:
            self.record(request, path, request_id, client, facts, decision, outcome, time.perf_counter() - started)

        rid = request_id.encode()
        try:
            if bad is not None:
                self.fail(request, bad, rid, outcome, record)
            elif decision.verdict == DENY:
                block = policy.spec.block
                request.respond(block.status, error_headers(rid, False, active.header), policy.block_body)
                outcome.status, outcome.sent = block.status, len(policy.block_body)
                record()
            elif decision.limit is not None:
                # 3b. The deciding rule's rate limit: the one step that may wait (on Redis), with a
                # callback like every other step (answered when the batch of checks is).
                self.limited(request, path, client, facts, decision, rid, outcome, record)  # type: ignore[arg-type]
            else:
                self.forward(request, path, client, decision, rid, outcome, record)  # type: ignore[arg-type]
        except Exception:
            self.crashed(request, rid, outcome, record)

    def limited(
        self,
        request: Request,
        path: str,
        client: ClientAddress,
        facts: GeoFacts,
        decision: Decision,
        rid: bytes,
        outcome: Outcome,
        record: Callable[[], None],
    ) -> None:
        """Forward unless the deciding rule's rate limit says no (a 429; Redis trouble follows ``on_error``)."""
        assert decision.limit is not None
        on_error = outcome.active.policy.spec.redis.on_error
        # A partial, not a closure: fewer objects per waiting request for the garbage collector to count.
        then = partial(self.checked, request, path, client, decision, rid, outcome, record)
        check_rate(self.runtime.overrides, decision.limit, client, facts, request.headers, on_error, then)

    def checked(
        self,
        request: Request,
        path: str,
        client: ClientAddress,
        decision: Decision,
        rid: bytes,
        outcome: Outcome,
        record: Callable[[], None],
        refused: GatewayError | None,
    ) -> None:
        """The rate limit's answer: forward, or the 429 (or 503)."""
        try:
            if refused is not None:
                self.fail(request, refused, rid, outcome, record)
            else:
                self.forward(request, path, client, decision, rid, outcome, record)
        except Exception:
            self.crashed(request, rid, outcome, record)

    def forward(
        self,
        request: Request,
        path: str,
        client: ClientAddress,
        decision: Decision,
        rid: bytes,
        outcome: Outcome,
        record: Callable[[], None],
    ) -> None:
        upstream = outcome.active.upstreams.get(decision.upstream or "")
        if upstream is None:
            self.fail(request, errors.NO_UPSTREAM, rid, outcome, record)
            return
        try:
            url = upstream.target(path, request.query)
        except BadTarget as e:
            self.fail(request, errors.bad_request(str(e), "invalid_path"), rid, outcome, record)
            return
        pool = self.pools.get(upstream)
        if pool is None:
            pool = self.pools[upstream] = Pool(upstream, self.limits, self.bound)
        # A missing client's address is its proxy's: no client address to vouch for.
        decided = str(client.ip) if client.ip is not None and client.kind != MISSING else None
        headers = forward_headers(request.headers, request.peer, decided, upstream)
        target = url.raw_path_qs.encode("latin-1")
        Relay(request, pool, target, headers, rid, outcome.active.header, outcome, record).start()

    def crashed(self, request: Request, rid: bytes, outcome: Outcome, record: Callable[[], None]) -> None:
        """A bug of ours must still give the client an OpenAI-shaped answer (or a cut, once it started)."""
        log.exception("request %s failed", rid.decode())
        if not request.started:
            self.fail(request, errors.INTERNAL, rid, outcome, record)
        else:
            request.abort()
            outcome.error = outcome.error or errors.INTERNAL.code
            record()

    def fail(
        self, request: Request, error: GatewayError, rid: bytes, outcome: Outcome, record: Callable[[], None]
    ) -> None:
        body = error.body()
        outcome.status, outcome.error, outcome.sent = error.status, error.code, len(body)
        send_error(request, error, rid, outcome.active.header)
        record()

    def record(
        self,
        request: Request,
        path: str | None,
        request_id: str,
        client: ClientAddress,
        facts: GeoFacts,
        decision: Decision,
        ex: Outcome,
        seconds: float,
    ) -> None:
        country = facts.country or (client.kind if client.kind != PUBLIC else "unknown")
        m = self.metrics
        if ex.error is not None and ex.error in _BAD_REQUEST_CODES:
            m.bad_request(ex.error)
        if decision is not REJECTED:
            m.decision(decision.verdict, decision.rule, country)
        m.request(decision.verdict, seconds)
        for rule in decision.shadow:
            m.shadow_match(rule)
        shadow = ex.shadow
        if shadow is not None and shadow.verdict != decision.verdict:
            m.shadow_disagreement(decision.verdict, shadow.verdict, shadow.rule)
        if ex.attempted and not (ex.client_gone and ex.ttfb is None):
            # The upstream's own status if it answered, else 0 ("error": unreachable, timed out).
            m.upstream(decision.upstream or "", ex.status if ex.ttfb is not None else 0, ex.ttfb)
        log_ = self.runtime.access_log
        # The audit stream (gateway.shared): refusals, or every decision; queued, never waited for.
        audit = self.runtime.audit
        verdict = "rate_limited" if ex.error == "rate_limit_exceeded" else decision.verdict
        if audit.enabled and audit.wants(verdict):
            audit.put(
                audit_entry(
                    request_id, verdict, decision.rule,
                    facts.country, facts.subdivisions, facts.asn, path, ex.active.policy.sha256, log_.redact(client.ip),
                )
            )  # fmt: skip
        if not log_.enabled:
            return
        entry: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "method": request.method[:32],
            # The path as judged and forwarded; a refused one as the client sent it.
            "path": path if path is not None else request.raw_path[:2048].decode("latin-1"),
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
            "policy": ex.active.tag,
        }
        if facts.subdivisions:
            entry["subdivisions"] = facts.subdivisions
        if facts.asn is not None:
            entry["asn"] = facts.asn
        if facts.anonymizer:
            entry["anonymizer"] = sorted(facts.anonymizer)
        if client.problem:
            entry["client_problem"] = log_.redact_text(client.problem)
        if decision.shadow:
            entry["shadow"] = decision.shadow
        if shadow is not None and shadow.verdict != decision.verdict:
            entry["shadow_decision"] = {"decision": shadow.verdict, "rule": shadow.rule, "policy": ex.active.shadow_tag}
        if ex.ttfb is not None:
            entry["ttfb_ms"] = round(ex.ttfb * 1000, 3)
        if ex.error:
            entry["error"] = ex.error
        log_.write(entry)


_BAD_REQUEST_CODES = frozenset({"invalid_path", "method_not_allowed"})
# The decision recorded for a request refused before the policy was asked
# (a method not allowed, a path that cannot be forwarded safely).
REJECTED = Decision("rejected", "rejected", "invalid_request", "refused before the policy: bad method or path", None)


def _request_target(
    method: str, raw_path: bytes, allowed: frozenset[str]
) -> tuple[str | None, GatewayError | None]:
    """The canonical path, or the 400/405 that answers a request that has none."""
    if method not in allowed:
        return None, errors.method_not_allowed(method, allowed)
    try:
        return canonical(raw_path), None
    except BadPath as e:
        return None, errors.bad_request(str(e), "invalid_path")
