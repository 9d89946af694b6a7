"""Every request recorded once, when its answer is over: metrics, the audit stream, the access log.

What is written comes from the :class:`.exchange.Exchange` alone, so the
request path and the relay only fill it in. The wording and fields of each
line are a contract with dashboards and log pipelines: byte for byte as
before.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from ..clientip import PUBLIC
from ..dataplane.failover import REGION_REFUSAL, Failover, Notices
from ..dataplane.upstream import Upstream
from ..policy import DENY, NEEDS_MODEL, Decision, decide_model
from ..shared.audit import entry as audit_entry
from ..shared.auditbound import source_of
from .exchange import Exchange
from .replies import BAD_REQUEST_CODES

if TYPE_CHECKING:  # runtime imports proxy.upstreams, which runs this package's __init__
    from ..runtime import Runtime

log = logging.getLogger("regiongate")

# The decision recorded for a request refused before the policy was asked
# (a method not allowed, a path that cannot be forwarded safely).
REJECTED = Decision("rejected", "rejected", "invalid_request", "refused before the policy: bad method or path", None)


class Metrics(Protocol):
    """What the request path counts (:class:`gateway.metrics.Metrics` is the Prometheus one)."""

    def bad_request(self, reason: str) -> None: ...
    def decision(self, verdict: str, rule: str, country: str, upstream: str, via: str) -> None: ...
    def request(self, verdict: str, seconds: float) -> None: ...
    def shadow_match(self, rule: str) -> None: ...
    def shadow_disagreement(self, active: str, shadow: str, rule: str) -> None: ...
    def model_refused(self, rule: str) -> None: ...
    def upstream(self, name: str, target: str, status: int, ttfb: float | None) -> None: ...
    def failover(self, source: str, dest: str, reason: str) -> None: ...
    def region_refusal(self, upstream: str) -> None: ...


class Record:
    """Writes each finished exchange out (one per worker, shared by its requests)."""

    __slots__ = ("_refusal_notices", "metrics", "runtime")

    def __init__(self, runtime: Runtime, metrics: Metrics) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self._refusal_notices = Notices()

    def write(self, ex: Exchange) -> None:
        seconds = time.perf_counter() - ex.started
        request, client, facts, request_id = ex.request, ex.client, ex.facts, ex.request_id
        decision = ex.decision
        path = None if decision is REJECTED else ex.path
        country = facts.country or (client.kind if client.kind != PUBLIC else "unknown")
        m = self.metrics
        if ex.error is not None and ex.error in BAD_REQUEST_CODES:
            m.bad_request(ex.error)
        if decision is not REJECTED:
            m.decision(decision.verdict, decision.rule, country, decision.upstream or "", ex.via)
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
        if ex.via != "proxy":
            entry["via"] = ex.via  # a decision service's contract (gateway.authz); proxy lines stay as they were
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
