"""Every request recorded once, when its answer is over: metrics, the audit stream, the access log.

What is written comes from the :class:`.exchange.Exchange` alone, so the
request path and the relay only fill it in. The wording and fields of each
line are a contract with dashboards and log pipelines: byte for byte as
before.

This runs on the proxy's loop for every request, so it only hands over:
the metrics are tallied in plain per-loop counters and folded into
prometheus-client when ``/metrics`` is read (:mod:`gateway.metrics`), and
the access log gets one tuple of values at hand, from which its writer
thread builds the line (:mod:`.logline`).
"""

from __future__ import annotations

import logging
from time import perf_counter, time_ns
from typing import TYPE_CHECKING, Protocol

from ..clientip import PUBLIC
from ..dataplane.failover import REGION_REFUSAL, Failover, Notices
from ..dataplane.upstream import Upstream
from ..policy import NEEDS_MODEL, Decision, decide_model
from ..policy.tokenlimit import Budget
from ..shared.audit import entry as audit_entry
from ..shared.auditbound import source_of
from ..usage import Usage
from .exchange import Exchange
from .logline import request_line
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
    def tokens(self, country: str, model: str | None, usage: Usage) -> None: ...
    def budget_spent(self, budget: Budget, usage: Usage) -> None: ...


class Record:
    """Writes each finished exchange out (one per worker, shared by its requests)."""

    __slots__ = ("_refusal_notices", "metrics", "runtime")

    def __init__(self, runtime: Runtime, metrics: Metrics) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self._refusal_notices = Notices()
        runtime.access_log.line = request_line  # how the writer thread turns what write() hands it into a line

    def write(self, ex: Exchange) -> None:
        """Tally the metrics, queue the audit entry, hand the access log its facts: no line built here."""
        seconds = perf_counter() - ex.started
        request, client, facts, request_id, error = ex.request, ex.client, ex.facts, ex.request_id, ex.error
        decision = ex.decision
        path = None if decision is REJECTED else ex.path
        country = facts.country or (client.kind if client.kind != PUBLIC else "unknown")
        m = self.metrics
        if error is not None and error in BAD_REQUEST_CODES:
            m.bad_request(error)
        if decision is not REJECTED:
            m.decision(decision.verdict, decision.rule, country, decision.upstream or "", ex.via)
        # Before the access log's put: with workers, the fold this queues runs ahead of the log's hand-over
        # in the same loop turn, so a request's line in the log means its metrics are in the shared files.
        m.request(decision.verdict, seconds)
        for rule in decision.shadow:
            m.shadow_match(rule)
        shadow = ex.shadow
        if shadow is NEEDS_MODEL and ex.active.shadow is not None and path is not None:
            # Only the shadow policy looks at the model: it is judged as unknown (the body was not read for it).
            shadow = ex.shadow = decide_model(ex.active.shadow, client, facts, path, None)
        if shadow is not None and shadow.verdict != decision.verdict:
            m.shadow_disagreement(decision.verdict, shadow.verdict, shadow.rule)
        else:
            shadow = None  # the log names the shadow's decision only where it disagrees
        target = ex.target
        if ex.failovers:
            self.record_failovers(ex.failovers)
        if target is not None and not (ex.client_gone and ex.ttfb is None):
            # The upstream's own status if it answered, else 0 ("error": unreachable, timed out).
            m.upstream(target.name, target.target, ex.status if ex.ttfb is not None else 0, ex.ttfb)
            if ex.refused is not None:
                self.region_refused(target, ex.refused)
        usage = ex.usage
        if usage is not None:
            m.tokens(country, ex.model, usage)
            budget = decision.budget
            if budget is not None:
                m.budget_spent(budget, usage)
        log_ = self.runtime.access_log
        # The audit stream (gateway.shared): refusals, or every decision; queued, never waited for.
        audit = self.runtime.audit
        verdict = "rate_limited" if error == "rate_limit_exceeded" else decision.verdict
        if audit.enabled:
            audit.count(country, facts.subdivisions, verdict, decision.rule)  # hourly counts (shared.auditcounts)
        if audit.enabled and audit.wants(verdict, shadow.verdict if shadow is not None else None):
            audit.put(
                audit_entry(
                    request_id, verdict, decision.rule,
                    facts.country, facts.subdivisions, facts.asn, path, ex.active.policy.sha256, log_.redact(client.ip),
                    ex.model, (shadow.verdict, shadow.rule) if shadow is not None else None, usage, ex.caller,
                ),
                source_of(client.ip),
            )  # fmt: skip
        if log_.enabled:
            # One tuple of what is at hand (logline.Facts, in its order); the writer thread makes the line.
            log_.put(
                (
                    time_ns(), request_id, request.method, path, request.raw_path,
                    client, decision, facts, target, ex.status,
                    seconds, ex.sent, ex.active.tag, ex.model, shadow,
                    ex.active.shadow_tag, ex.attempts, ex.ttfb, error, ex.failovers, ex.via,
                    ex.caller, usage,
                )
            )  # fmt: skip

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
