"""Prometheus metrics.

With ``--workers N`` each worker is its own process, so the counters live in
prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``) and
``/metrics`` sums them; that directory must be set before this module is
imported, which :mod:`gateway.server` does.

Label children are cached in plain dicts: ``.labels()`` hashes and locks on
every call, and the request path calls it several times per request.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as _mp

from .geo import SourceInfo

if TYPE_CHECKING:
    from .live.active import PolicyVersion

# The *_created series double the output and no dashboard of ours reads them.
disable_created_metrics()

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter(
            "regiongate_decisions",
            "Requests by decision (allow, route, monitor, deny), deciding rule, client country, and the upstream "
            "they went to (empty when refused), and who asked (via: the proxy port, or a decision service contract).",
            ["decision", "rule", "country", "upstream", "via"],
            registry=r,
        )
        self.shadow = Counter(
            "regiongate_shadow_matches",
            "Matches of rules in mode: monitor, which are recorded and not enforced.",
            ["rule"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "regiongate_upstream_requests",
            "Requests sent upstream, each attempt once, by upstream, URL (its index in the upstream's urls) and "
            "response status class (error: no response).",
            ["upstream", "target", "status_class"],
            registry=r,
        )
        self.failovers = Counter(
            "regiongate_failovers",
            "Attempts that failed before any byte reached the client and were followed by another, by the URLs "
            "(name/index) and the reason.",
            ["from", "to", "reason"],
            registry=r,
        )
        self.region_refusals = Counter(
            "regiongate_upstream_region_refusals",
            "Upstream answers refusing the gateway's own region (403 unsupported_country_region_territory).",
            ["upstream"],
            registry=r,
        )
        self.duration = Histogram(
            "regiongate_request_duration_seconds",
            "Time from request to last response byte, by decision.",
            ["decision"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "regiongate_upstream_ttfb_seconds",
            "Time from sending upstream to its response headers.",
            ["upstream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # "live" modes: a worker that exits (or is replaced) takes its values with it.
        self.geoip_info = Gauge(
            "regiongate_geoip_database_info",
            "Geo sources in use (value 1; 0 for one replaced since), by type and build time.",
            ["type", "build_epoch"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.geoip_age = Gauge(
            "regiongate_geoip_database_age_seconds",
            "Seconds since the database in use was built (its build_epoch).",
            ["type"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.geoip_reloads = Counter(
            "regiongate_geoip_reloads",
            "Attempts to load a replaced GeoIP database, by type and result (ok, error), per worker.",
            ["type", "result"],
            registry=r,
        )
        self.policy_info = Gauge(
            "regiongate_policy_info",
            "The policy in force (value 1; 0 for one replaced since), by file, content hash and version.",
            ["path", "sha256", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.shadow_policy_info = Gauge(
            "regiongate_shadow_policy_info",
            "The shadow policy evaluated beside the active one (value 1), by file, content hash and version.",
            ["path", "sha256", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.policy_reloads = Counter(
            "regiongate_policy_reloads",
            "Policy candidates judged, by result (ok, error) and role (policy, shadow), per worker.",
            ["result", "role"],
            registry=r,
        )
        self.watcher_restarts = Counter(
            "regiongate_file_watcher_restarts",
            "Times the policy and GeoIP file watcher died and was started again (each one is logged).",
            registry=r,
        )
        self.policy_last_reload = Gauge(
            "regiongate_policy_last_reload_timestamp_seconds",
            "When the policy in force was loaded (Unix time).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.shadow_disagreements = Counter(
            "regiongate_shadow_disagreements",
            "Requests the shadow policy would have decided otherwise, by both decisions and the shadow's rule.",
            ["active", "shadow", "rule"],
            registry=r,
        )
        self.bad_requests = Counter(
            "regiongate_bad_requests",
            "Requests refused before the policy was asked (unparseable, bad method, path or header), by reason.",
            ["reason"],
            registry=r,
        )
        self.tls_reloads = Counter(
            "regiongate_tls_reloads",
            "TLS certificate files that changed and were loaded (ok) or refused, keeping the old pair (refused).",
            ["result"],
            registry=r,
        )
        self.access_log_dropped = Counter(
            "regiongate_access_log_dropped",
            "Access-log lines dropped because the log's destination did not keep up.",
            registry=r,
        )
        self.overrides_active = Gauge(
            "regiongate_overrides_active",
            "Runtime overrides in force in this worker's copy, by kind (api_key, cidr, subdivision, country).",
            ["kind"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.redis_up = Gauge(
            "regiongate_redis_up",
            "1 when Redis answered the last call, 0 while it is failing (circuit open).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.redis_errors = Counter(
            "regiongate_redis_errors",
            "Redis calls that failed or timed out, by operation.",
            ["op"],
            registry=r,
        )
        self.redis_latency = Histogram(
            "regiongate_redis_latency_seconds",
            "Time of Redis calls that succeeded.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=r,
        )
        self.rate_limited_total = Counter(
            "regiongate_rate_limited",
            "Requests refused with 429 by a rule's rate_limit, by rule and what the limit counts by.",
            ["rule", "by"],
            registry=r,
        )
        self.audit_dropped_total = Counter(
            "regiongate_audit_dropped",
            "Audit entries dropped, by reason: sampled (past the per-network refusal budget), queue_full (the "
            "writer fell behind), redis (unavailable), oversize, error.",
            ["reason"],
            registry=r,
        )
        self.model_refusals = Counter(
            "regiongate_model_refusals",
            "Requests refused because their model is not in the deciding rule's allow_models (or could not be read), "
            "by rule.",
            ["rule"],
            registry=r,
        )
        self._decision_children: dict[tuple[str, str, str, str, str], Counter] = {}
        self._upstream_children: dict[tuple[str, str, int], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}
        self._ttfb_children: dict[str, Histogram] = {}

    def describe_sources(
        self, sources: Iterable[SourceInfo], current: PolicyVersion, shadow: PolicyVersion | None = None
    ) -> None:
        for s in sources:
            self.geoip_info.labels(s.type, str(s.build_epoch)).set(1)
        self.geoip_ages(sources)
        self.policy_swapped(None, current)
        self.shadow_swapped(None, shadow)

    def geoip_ages(self, sources: Iterable[SourceInfo], now: float | None = None) -> None:
        now = time.time() if now is None else now
        for s in sources:
            if s.path is not None:
                self.geoip_age.labels(s.type).set(round(now - s.build_epoch))

    def geoip_swapped(self, old: SourceInfo, new: SourceInfo) -> None:
        _retire(self.geoip_info, (old.type, str(old.build_epoch)))
        self.geoip_info.labels(new.type, str(new.build_epoch)).set(1)
        self.geoip_ages([new])

    def geoip_reload(self, kind: str, result: str) -> None:
        self.geoip_reloads.labels(kind, result).inc()

    def policy_swapped(self, old: PolicyVersion | None, new: PolicyVersion) -> None:
        if old is not None:
            _retire(self.policy_info, (old.policy.source, old.sha256, old.version))
        self.policy_info.labels(new.policy.source, new.sha256, new.version).set(1)
        self.policy_last_reload.set(new.loaded_at)

    def shadow_swapped(self, old: PolicyVersion | None, new: PolicyVersion | None) -> None:
        if old is not None:
            _retire(self.shadow_policy_info, (old.policy.source, old.sha256, old.version))
        if new is not None:
            self.shadow_policy_info.labels(new.policy.source, new.sha256, new.version).set(1)

    def policy_reload(self, role: str, result: str) -> None:
        self.policy_reloads.labels(result, role).inc()

    def watcher_restart(self) -> None:
        self.watcher_restarts.inc()

    def shadow_disagreement(self, active: str, shadow: str, rule: str) -> None:
        self.shadow_disagreements.labels(active, shadow, rule).inc()

    def decision(self, verdict: str, rule: str, country: str, upstream: str, via: str) -> None:
        key = (verdict, rule, country, upstream, via)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(*key)
        child.inc()

    def overrides(self, counts: dict[str, int]) -> None:
        for kind, n in counts.items():
            self.overrides_active.labels(kind).set(n)

    def model_refused(self, rule: str) -> None:
        self.model_refusals.labels(rule).inc()

    def rate_limited(self, rule: str, by: str) -> None:
        self.rate_limited_total.labels(rule, by).inc()

    def audit_dropped(self, reason: str, n: int) -> None:
        self.audit_dropped_total.labels(reason).inc(n)

    def up(self, value: bool) -> None:
        """Redis state (the shared store's observer)."""
        self.redis_up.set(1 if value else 0)

    def error(self, op: str) -> None:
        self.redis_errors.labels(op).inc()

    def latency(self, seconds: float) -> None:
        self.redis_latency.observe(seconds)

    def bad_request(self, reason: str) -> None:
        self.bad_requests.labels(reason).inc()

    def tls_reload(self, result: str) -> None:
        self.tls_reloads.labels(result).inc()

    def shadow_match(self, rule: str) -> None:
        self.shadow.labels(rule).inc()

    def failover(self, source: str, dest: str, reason: str) -> None:
        self.failovers.labels(source, dest, reason).inc()

    def region_refusal(self, upstream: str) -> None:
        self.region_refusals.labels(upstream).inc()

    def upstream(self, name: str, target: str, status: int, ttfb: float | None) -> None:
        key = (name, target, status // 100 if status else 0)
        child = self._upstream_children.get(key)
        if child is None:
            cls = f"{status // 100}xx" if status else "error"
            child = self._upstream_children[key] = self.upstream_requests.labels(name, target, cls)
        child.inc()
        if ttfb is not None:
            h = self._ttfb_children.get(name)
            if h is None:
                h = self._ttfb_children[name] = self.ttfb.labels(name)
            h.observe(ttfb)

    def request(self, verdict: str, seconds: float) -> None:
        h = self._duration_children.get(verdict)
        if h is None:
            h = self._duration_children[verdict] = self.duration.labels(verdict)
        h.observe(seconds)


def _retire(gauge: Gauge, labels: tuple[str, ...]) -> None:
    """A replaced source's info series: gone in one process; 0 across workers, whose files keep it."""
    if multiprocess():
        gauge.labels(*labels).set(0)
    else:
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)


def exposition(metrics: Metrics) -> tuple[bytes, str]:
    """The text for ``/metrics``: this process's registry, or every worker's files summed."""
    if multiprocess():
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(metrics.registry), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    if multiprocess():
        _mp.mark_process_dead(pid)
