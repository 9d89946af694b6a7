"""Prometheus metrics.

With ``--workers N`` each worker is its own process, so the counters live in
prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``) and
``/metrics`` sums them; that directory must be set before this module is
imported, which :mod:`gateway.server` does.

What every request counts (its decision, its duration, its upstream and
time to first byte) is tallied per request in plain dicts on the proxy's
loop, with no lock and no prometheus-client call, and *folded* into
prometheus-client's values later, exactly: the same children, created in the
same order, the same bucket counts, and each histogram's sum added up value
by value in the order observed, so the float is the one ``observe()`` would
have made. ``/metrics`` folds before it reads, so how fresh the values are:

- one process (``--workers 1``): the scrape asks the proxy's loop to fold
  and waits for it (at most :data:`FOLD_WAIT` seconds, the liveness bound),
  so it sees every request recorded before it started;
- ``--workers N``: each worker folds at the end of every loop turn that
  recorded a request (one fold per turn, however many requests it finished),
  before it reads its sockets again, and the worker answering the scrape
  folds its own first. A scrape therefore sees every request whose loop turn
  has ended in its worker; only a request finished in the same instant, by
  another worker still in that turn, may be counted by the next scrape.

Between scrapes, one process folds every :data:`FOLD_AT` requests,
which bounds what the tallies hold. Label children are cached in plain dicts:
``.labels()`` hashes and locks on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from bisect import bisect_left
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


# Requests after which one process folds without waiting for a scrape: the tallies then hold
# at most two floats per request (a duration and a time to first byte, 160 KB), folded in about
# 3 ms (0.15 µs a value).
FOLD_AT = 10_000
# How long a scrape waits for the proxy's loop to fold (the /healthz bound): a loop stalled
# longer is a failed liveness check, and the scrape then shows the counts folded before.
FOLD_WAIT = 5.0


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
        # The request path's tallies since the last fold (touched on the proxy's loop only):
        # counts by label values, and each histogram child's observations in order.
        self._decisions: dict[tuple[str, str, str, str, str], int] = {}
        self._upstreams: dict[tuple[str, str, int], int] = {}
        self._durations: dict[str, list[float]] = {}
        self._ttfbs: dict[str, list[float]] = {}
        self._tallied = 0
        self._fold_every_turn = multiprocess()  # other workers' scrapes read this one's files
        self._fold_scheduled = False

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
        """Tallied; in prometheus-client at the next :meth:`fold`."""
        key = (verdict, rule, country, upstream, via)
        tally = self._decisions
        n = tally.get(key)
        if n is None and self._fold_every_turn:
            self._decision_child(key)
        tally[key] = 1 if n is None else n + 1

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
        """One request to an upstream URL, by status class, and its time to first byte: tallied."""
        key = (name, target, status // 100 if status else 0)
        tally = self._upstreams
        n = tally.get(key)
        if n is None and self._fold_every_turn:
            self._upstream_child(key)
        tally[key] = 1 if n is None else n + 1
        if ttfb is not None:
            values = self._ttfbs.get(name)
            if values is None:
                values = self._ttfbs[name] = []
                if self._fold_every_turn:
                    self._ttfb_child(name)
            values.append(ttfb)

    def request(self, verdict: str, seconds: float) -> None:
        """One request over, by decision, and its duration: tallied."""
        values = self._durations.get(verdict)
        if values is None:
            values = self._durations[verdict] = []
            if self._fold_every_turn:
                self._duration_child(verdict)
        values.append(seconds)
        # Once per request (its upstream counts come in the same record, before the fold runs).
        self._tallied += 1
        if self._fold_every_turn:
            if not self._fold_scheduled:
                self._fold_at_turn_end()
        elif self._tallied >= FOLD_AT:
            self.fold()

    def _fold_at_turn_end(self) -> None:
        self._fold_scheduled = True
        try:
            asyncio.get_running_loop().call_soon(self.fold)
        except RuntimeError:  # no loop (a test, a tool): now
            self.fold()

    def fold(self) -> None:
        """Add the tallies to prometheus-client's values, and start new ones. On the proxy's loop only.

        Children are made in the order their labels were first tallied (the
        order ``/metrics`` lists them in), counters get one ``inc(n)``, and
        histograms :func:`_observe_all`.
        """
        self._fold_scheduled = False
        self._tallied = 0
        decisions, self._decisions = self._decisions, {}
        for key, n in decisions.items():
            self._decision_child(key).inc(n)
        durations, self._durations = self._durations, {}
        for verdict, values in durations.items():
            _observe_all(self._duration_child(verdict), values)
        upstreams, self._upstreams = self._upstreams, {}
        for ukey, n in upstreams.items():
            self._upstream_child(ukey).inc(n)
        ttfbs, self._ttfbs = self._ttfbs, {}
        for name, values in ttfbs.items():
            _observe_all(self._ttfb_child(name), values)

    # A label set's child, made on first use. With workers it is made when first tallied, so that
    # its keys enter this worker's files in the order they always did (the order /metrics lists
    # them in there), at 0 until the end of the loop turn.

    def _decision_child(self, key: tuple[str, str, str, str, str]) -> Counter:
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(*key)
        return child

    def _upstream_child(self, key: tuple[str, str, int]) -> Counter:
        child = self._upstream_children.get(key)
        if child is None:
            name, target, cls = key
            label = f"{cls}xx" if cls else "error"
            child = self._upstream_children[key] = self.upstream_requests.labels(name, target, label)
        return child

    def _duration_child(self, verdict: str) -> Histogram:
        h = self._duration_children.get(verdict)
        if h is None:
            h = self._duration_children[verdict] = self.duration.labels(verdict)
        return h

    def _ttfb_child(self, name: str) -> Histogram:
        h = self._ttfb_children.get(name)
        if h is None:
            h = self._ttfb_children[name] = self.ttfb.labels(name)
        return h


def _observe_all(h: Histogram, values: list[float]) -> None:
    """``h.observe(v)`` for each value in order, as one update: the same buckets, and the same sum.

    The sum is added up one value at a time from the child's own, as
    ``observe`` adds it, so the float is identical (a batch's subtotal added
    once would round differently). A value goes in the first bucket whose
    bound is at least the value (``observe``'s ``amount <= bound``). Reads
    prometheus-client's ``_upper_bounds``, ``_buckets`` and ``_sum`` (0.20
    on): ``tests/proxy/test_record_compat.py`` compares the output with
    ``observe``'s, byte for byte.
    """
    bounds: list[float] = h._upper_bounds
    counts = [0] * len(bounds)
    total: float = h._sum.get()
    for v in values:
        total += v
        counts[bisect_left(bounds, v)] += 1
    h._sum.set(total)
    for bucket, n in zip(h._buckets, counts, strict=True):
        if n:
            bucket.inc(n)


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
