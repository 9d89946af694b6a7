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
by the relay's completion callback. Two steps may wait, and only requests
that need them pay for them: reading a JSON body to learn its model (a rule
that looks at the model, ``allow_models``, an upstream that renames models;
callbacks, :mod:`gateway.dataplane.bodyhold`) and asking the rate limiter
(a task, since it awaits Redis).
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
from .dataplane.bodyhold import hold
from .dataplane.failover import REGION_REFUSAL, Failover, Notices, Route, prepare
from .dataplane.limits import Limits
from .dataplane.pool import Pool
from .dataplane.relay import Relay, error_headers, send_error
from .dataplane.server import Request, header
from .errors import GatewayError
from .geo import NO_FACTS, GeoFacts
from .live.active import Active
from .modelfield import BadBody, ModelField, is_json, read_model, rename
from .policy import DENY, NEEDS_MODEL, Decision, decide, decide_model, model_refusal
from .policy.overrides import judge as judge_override
from .policy.overrides import request_key_hash
from .requestid import RequestIds
from .requestpath import BadPath, canonical
from .runtime import Runtime
from .shared.audit import entry as audit_entry
from .shared.auditbound import source_of
from .shared.ratelimit import check as check_rate
from .upstream import BadTarget, BodyFor, Upstream, UpstreamGroup

log = logging.getLogger("regiongate")


class Outcome:
    """What became of one request, for the record."""

    __slots__ = (
        "active", "attempted", "attempts", "client_gone", "decision", "error", "failovers", "model", "refused", "sent",
        "shadow", "status", "target", "ttfb",
    )  # fmt: skip

    def __init__(self, active: Active, decision: Decision) -> None:
        self.active = active  # the policy (and its upstreams) judging this request, whatever reloads meanwhile
        self.decision = decision  # final once the model is known (when the decision needs it)
        self.model: str | None = None
        self.shadow: Decision | None = None
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


class Gateway:
    def __init__(self, runtime: Runtime, metrics: Any, limits: Limits) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.limits = limits
        self.bound = 1
        self.pools: dict[Upstream, Pool] = {}
        self._ids = RequestIds()
        self._refusal_notices = Notices()

    def open(self, bound: int) -> None:
        """Keep-alive pools are made per upstream as requests need them (inside the running loop)."""
        self.bound = bound

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def retire_upstreams(self, old: Mapping[str, UpstreamGroup], new: Mapping[str, UpstreamGroup]) -> None:
        """After a reload: pools (and passive health) of URLs no longer configured close as their requests end.

        A URL configured exactly as before keeps its pool and what its health learnt. Any other pool
        goes, including one a request that started before the last reload made when it failed over.
        """
        keep = {m for g in new.values() for m in g.members}
        for upstream in [u for u in self.pools if u not in keep]:
            self.pools.pop(upstream).close()  # idle connections now; busy ones when released

    def pool_for(self, upstream: Upstream) -> Pool:
        pool = self.pools.get(upstream)
        if pool is None:
            pool = self.pools[upstream] = Pool(upstream, self.limits, self.bound)
        return pool

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
        outcome = Outcome(active, decision)
        if active.shadow is not None and path is not None:
            outcome.shadow = decide(active.shadow, client, facts, path)
        # 4. Refuse or forward; 5. record, now or when the answer is over.

        def record() -> None:
            self.record(request, path, request_id, client, facts, outcome, time.perf_counter() - started)

        rid = request_id.encode()
        try:
            if bad is not None:
                self.fail(request, bad, rid, outcome, record)
            elif decision is NEEDS_MODEL or decision.allow_models is not None or decision.upstream in active.renaming:
                # 3a. The decision needs the request's model: read the body (JSON only, bounded), then go on.
                self.read_model(request, path, client, facts, rid, outcome, record)  # type: ignore[arg-type]
            else:
                self.proceed(request, path, client, facts, rid, outcome, record, None)  # type: ignore[arg-type]
        except Exception:
            self.crashed(request, rid, outcome, record)

    def proceed(
        self,
        request: Request,
        path: str,
        client: ClientAddress,
        facts: GeoFacts,
        rid: bytes,
        outcome: Outcome,
        record: Callable[[], None],
        body_for: BodyFor | None,
    ) -> None:
        """Refuse, or forward (after the rate limit when the deciding rule has one)."""
        decision = outcome.decision
        if decision.verdict == DENY:
            if decision.model_refused:
                self.metrics.model_refused(decision.rule)
                self.fail(request, errors.model_not_allowed(outcome.model), rid, outcome, record)
                return
            policy = outcome.active.policy
            block = policy.spec.block
            request.respond(block.status, error_headers(rid, False, outcome.active.header), policy.block_body)
            outcome.status, outcome.sent = block.status, len(policy.block_body)
            record()
        elif decision.limit is not None:
            # 3b. The deciding rule's rate limit: the one step that may wait (on Redis), with a
            # callback like every other step (answered when the batch of checks is).
            self.limited(request, path, client, facts, decision, rid, outcome, record, body_for)
        else:
            self.forward(request, path, client, decision, rid, outcome, record, body_for)

    def read_model(
        self,
        request: Request,
        path: str,
        client: ClientAddress,
        facts: GeoFacts,
        rid: bytes,
        outcome: Outcome,
        record: Callable[[], None],
    ) -> None:
        """Learn the model from a JSON body of at most ``body.max_bytes``, then decide with it.

        Any other body (not JSON, too large, none) is streamed untouched and its model
        is unknown (``body.unknown_model``). A held body goes up as bytes, renamed for
        the upstream that gets it; it can then be sent again on failover.
        """
        spec = outcome.active.policy.spec.body
        if not request.has_body or not is_json(header(request.headers, b"content-type")):
            self.with_model(request, path, client, facts, rid, outcome, record, None)
            return

        def held(body: bytes | None) -> None:
            request.on_gone = None
            try:
                self.with_model(request, path, client, facts, rid, outcome, record, body)
            except Exception:
                self.crashed(request, rid, outcome, record)

        def gone() -> None:  # left before the body was whole: nothing was sent anywhere
            outcome.client_gone, outcome.status, outcome.error = True, 499, "client_disconnected"
            if outcome.decision is NEEDS_MODEL:  # recorded as for a request whose model is unknown
                outcome.decision = decide_model(outcome.active.policy, client, facts, path, None)
            record()

        request.on_gone = gone
        hold(request, spec.max_bytes, held)

    def with_model(
        self,
        request: Request,
        path: str,
        client: ClientAddress,
        facts: GeoFacts,
        rid: bytes,
        outcome: Outcome,
        record: Callable[[], None],
        body: bytes | None,
    ) -> None:
        field: ModelField | None = None
        if body:  # an empty body has no model; a body too large or too slow was given back (None)
            try:
                field = read_model(body)
            except BadBody as e:
                self.fail(request, errors.bad_request(e.message, "invalid_body"), rid, outcome, record)
                return
        model = field.model if field is not None else None
        active = outcome.active
        decision = outcome.decision
        if decision is NEEDS_MODEL:
            decision = decide(active.policy, client, facts, path, model)
        outcome.decision = model_refusal(active.policy, decision, model) or decision
        outcome.model = model
        if active.shadow is not None:
            outcome.shadow = decide_model(active.shadow, client, facts, path, model)
        body_for: BodyFor | None = None
        if body is not None:
            body_for = _renamer(body, field)
        self.proceed(request, path, client, facts, rid, outcome, record, body_for)

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
        body_for: BodyFor | None,
    ) -> None:
        """Forward unless the deciding rule's rate limit says no (a 429; Redis trouble follows ``on_error``)."""
        assert decision.limit is not None
        on_error = outcome.active.policy.spec.redis.on_error
        # A partial, not a closure: fewer objects per waiting request for the garbage collector to count.
        then = partial(self.checked, request, path, client, decision, rid, outcome, record, body_for)
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
        body_for: BodyFor | None,
        refused: GatewayError | None,
    ) -> None:
        """The rate limit's answer: forward, or the 429 (or 503)."""
        try:
            if refused is not None:
                self.fail(request, refused, rid, outcome, record)
            else:
                self.forward(request, path, client, decision, rid, outcome, record, body_for)
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
        body_for: BodyFor | None = None,
    ) -> None:
        """Send the request to ``decision.upstream``'s first URL that is not ejected (see :mod:`.dataplane.failover`).

        ``body_for``: the whole body was read already; it gives the bytes to send to each upstream.
        """
        groups = outcome.active.upstreams
        group = groups.get(decision.upstream or "")
        if group is None:
            self.fail(request, errors.NO_UPSTREAM, rid, outcome, record)
            return
        # A missing client's address is its proxy's: no client address to vouch for.
        decided = str(client.ip) if client.ip is not None and client.kind != MISSING else None
        chain = group.chain
        route = None
        if len(chain) == 1:
            upstream = chain[0]
        else:
            route = Route(
                chain, groups, self.pools, self.pool_for,
                request.headers, request.peer, decided, path, request.query, body_for,
            )  # fmt: skip
            upstream = route.first()
        body = None if body_for is None else body_for(groups[upstream.name])
        try:
            target, headers = prepare(upstream, path, request.query, request.headers, request.peer, decided)
        except BadTarget as e:
            self.fail(request, errors.bad_request(str(e), "invalid_path"), rid, outcome, record)
            return
        pool = self.pools.get(upstream)
        if pool is None:
            pool = self.pool_for(upstream)
        Relay(request, pool, target, headers, rid, outcome.active.header, outcome, record, route, body).start()

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
        ex: Outcome,
        seconds: float,
    ) -> None:
        decision = ex.decision
        country = facts.country or (client.kind if client.kind != PUBLIC else "unknown")
        m = self.metrics
        if ex.error is not None and ex.error in _BAD_REQUEST_CODES:
            m.bad_request(ex.error)
        if decision is not REJECTED:
            m.decision(decision.verdict, decision.rule, country, decision.upstream or "")
        m.request(decision.verdict, seconds)
        for rule in decision.shadow:
            m.shadow_match(rule)
        shadow = ex.shadow
        if shadow is NEEDS_MODEL and ex.active.shadow is not None and path is not None:
            # Only the shadow policy looks at the model: it is judged as unknown (the body was not read for it).
            shadow = ex.shadow = decide_model(ex.active.shadow, client, facts, path, None)
        if shadow is not None and shadow.verdict != decision.verdict:
            m.shadow_disagreement(decision.verdict, shadow.verdict, shadow.rule)
        target = ex.target
        if ex.failovers:
            self.record_failovers(ex.failovers)
        if target is not None and not (ex.client_gone and ex.ttfb is None):
            # The upstream's own status if it answered, else 0 ("error": unreachable, timed out).
            m.upstream(target.name, target.target, ex.status if ex.ttfb is not None else 0, ex.ttfb)
            if ex.refused is not None:
                self.region_refused(target, ex.refused)
        log_ = self.runtime.access_log
        # The audit stream (gateway.shared): refusals, or every decision; queued, never waited for.
        audit = self.runtime.audit
        verdict = "rate_limited" if ex.error == "rate_limit_exceeded" else decision.verdict
        if audit.enabled and audit.wants(verdict):
            audit.put(
                audit_entry(
                    request_id, verdict, decision.rule,
                    facts.country, facts.subdivisions, facts.asn, path, ex.active.policy.sha256, log_.redact(client.ip),
                    ex.model,
                ),
                source_of(client.ip),
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
            "target": target.label if target is not None else None,
            "status": ex.status,
            "duration_ms": round(seconds * 1000, 3),
            "bytes": ex.sent,
            "policy": ex.active.tag,
        }
        if ex.model is not None:
            entry["model"] = ex.model[:256]
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
        if ex.attempts:
            entry["attempts"] = ex.attempts
        if ex.ttfb is not None:
            entry["ttfb_ms"] = round(ex.ttfb * 1000, 3)
        if ex.error:
            entry["error"] = ex.error
        if ex.failovers:
            entry["failovers"] = [
                {"from": f.source.label, "to": f.dest.label, "reason": f.reason} for f in ex.failovers
            ]
        log_.write(entry)

    def record_failovers(self, failovers: list[Failover]) -> None:
        """Each attempt that another followed: counted as a request to its URL, and as a failover."""
        m = self.metrics
        for f in failovers:
            m.upstream(f.source.name, f.source.target, f.status, None)
            m.failover(f.source.label, f.dest.label, f.reason)
            if f.reason == REGION_REFUSAL:
                self.region_refused(f.source, f.message or "")

    def region_refused(self, upstream: Upstream, message: str) -> None:
        """The upstream refuses the gateway's own region: not the client's doing, so the operator is told."""
        self.metrics.region_refusal(upstream.name)
        if self._refusal_notices.due(upstream.name):
            log.warning(
                "upstream %s (%s) refuses the gateway's region: %r (at most one warning a minute per upstream)",
                upstream.name, upstream.label, message,
            )  # fmt: skip


_BAD_REQUEST_CODES = frozenset({"invalid_path", "method_not_allowed"})
# The decision recorded for a request refused before the policy was asked
# (a method not allowed, a path that cannot be forwarded safely).
REJECTED = Decision("rejected", "rejected", "invalid_request", "refused before the policy: bad method or path", None)


def _renamer(body: bytes, field: ModelField | None) -> BodyFor:
    """The bytes each upstream gets: the body with only its model renamed, if that upstream maps it."""
    model = field.model if field is not None else None

    def body_for(group: UpstreamGroup) -> bytes:
        new = group.models.get(model) if model is not None else None
        if new is None or field is None:
            return body
        return rename(body, field, new)

    return body_for


def _request_target(method: str, raw_path: bytes, allowed: frozenset[str]) -> tuple[str | None, GatewayError | None]:
    """The canonical path, or the 400/405 that answers a request that has none."""
    if method not in allowed:
        return None, errors.method_not_allowed(method, allowed)
    try:
        return canonical(raw_path), None
    except BadPath as e:
        return None, errors.bad_request(str(e), "invalid_path")
