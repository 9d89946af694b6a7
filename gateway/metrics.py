"""Prometheus metrics.

With ``--workers N`` each worker is its own process, so the counters live in
prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``) and
``/metrics`` sums them; that directory must be set before this module is
imported, which :mod:`gateway.server` does.

Label children are cached in plain dicts: ``.labels()`` hashes and locks on
every call, and the request path calls it several times per request.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

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
            "Requests by decision, deciding rule and client country.",
            ["decision", "rule", "country"],
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
            "Requests forwarded upstream, by upstream and response status class.",
            ["upstream", "status_class"],
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
        self.bad_requests = Counter(
            "regiongate_bad_requests",
            "Requests refused before a decision because they could not be read, by reason.",
            ["reason"],
            registry=r,
        )
        self.geoip_info = Gauge(
            "regiongate_geoip_database_info",
            "Geo sources in use (value 1), by type and build time.",
            ["type", "build_epoch"],
            registry=r,
            multiprocess_mode="max",
        )
        self.policy_info = Gauge(
            "regiongate_policy_info",
            "The policy in force (value 1), by file and content hash.",
            ["path", "sha256"],
            registry=r,
            multiprocess_mode="max",
        )
        self._decision_children: dict[tuple[str, str, str], Counter] = {}
        self._upstream_children: dict[tuple[str, int], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}
        self._ttfb_children: dict[str, Histogram] = {}

    def describe_sources(self, sources: Iterable[SourceInfo], policy_path: str, sha256: str) -> None:
        for s in sources:
            self.geoip_info.labels(s.type, str(s.build_epoch)).set(1)
        self.policy_info.labels(policy_path, sha256).set(1)

    def decision(self, verdict: str, rule: str, country: str) -> None:
        key = (verdict, rule, country)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(*key)
        child.inc()

    def bad_request(self, reason: str) -> None:
        self.bad_requests.labels(reason).inc()

    def shadow_match(self, rule: str) -> None:
        self.shadow.labels(rule).inc()

    def upstream(self, name: str, status: int, ttfb: float | None) -> None:
        key = (name, status // 100 if status else 0)
        child = self._upstream_children.get(key)
        if child is None:
            cls = f"{status // 100}xx" if status else "error"
            child = self._upstream_children[key] = self.upstream_requests.labels(name, cls)
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
