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

Tokens (issue 19) are tallied the same way: per request, the usage of its
response by country, model and source, and what it charged each of its
rule's token limits. Every label is bounded: the country as the decision
metrics have it (an ISO code, or ``unknown``/``private``/...), the model as
one the policy names (:class:`ModelLabels`: a rule's ``models`` or
``allow_models``, an upstream's model map) or ``other``, a rule's name and a
limit's place in its list. Never a client key, its hash or an address: the
caller's key name is in the access log and the audit stream, not here.
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
from .policy import Policy
from .policy.tokenlimit import Budget, cost
from .usage import Usage

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


# The model label of a model the policy does not name (or of a request whose model is not known).
OTHER_MODEL = "other"
# regiongate_tokens_total's kinds, in the order a tally holds them.
TOKEN_KINDS = ("input", "output", "cached", "reasoning")


class ModelLabels:
    """The ``model`` label of a token count: a model the policy names, else :data:`OTHER_MODEL`.

    What the policy names is every rule's ``models`` and ``allow_models``
    and every upstream's model map (the names asked for and the names sent),
    so the label's values are bounded by the policy, not by what clients
    send. A pattern ending in ``*`` is its own label (``gpt-4o*`` for
    ``gpt-4o-2024-08-06``), the longest one that matches; an exact name
    wins over a pattern.
    """

    __slots__ = ("exact", "prefixes")

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        listed = set(patterns)
        self.exact = frozenset(p for p in listed if not p.endswith("*"))
        self.prefixes = tuple(sorted(((p[:-1], p) for p in listed if p.endswith("*")), key=lambda x: -len(x[0])))

    @classmethod
    def of(cls, policy: Policy) -> ModelLabels:
        names: list[str] = []
        for rule in policy.rules:
            for patterns in (rule.models, rule.decision.allow_models):
                if patterns is not None:
                    names += patterns.listed()
        for upstream in policy.upstreams.values():
            names += [*upstream.models, *upstream.models.values()]
        return cls(names)

    def __call__(self, model: str | None) -> str:
        if model is None:
            return OTHER_MODEL
        if model in self.exact:
            return model
        for prefix, pattern in self.prefixes:
            if model.startswith(prefix):
                return pattern
        return OTHER_MODEL


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
        self.tokens_total = Counter(
            "regiongate_tokens",
            "Tokens used by forwarded requests, by client country, model (one the policy names, else other), "
            "kind (input, output, and the cached part of input and reasoning part of output) and source (usage: "
            "the provider's report; estimate: counted from the bytes relayed).",
            ["country", "model", "kind", "source"],
            registry=r,
        )
        self.budget_tokens = Counter(
            "regiongate_budget_tokens",
            "Tokens spent under a rule's token_limit entries once the response is over (the provider's usage or "
            "the estimate; also while Redis could not be asked, see regiongate_budget_fallbacks), by rule, limit "
            "(the entry's place in the rule's list, from 0) and kind (rate, quota).",
            ["rule", "limit", "kind"],
            registry=r,
        )
        self.budget_limit = Gauge(
            "regiongate_budget_limit_tokens_per_second",
            "A token_limit entry of the policy in force: one subject's tokens per second (tokens / per), by "
            "rule, limit and kind.",
            ["rule", "limit", "kind"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.budget_refusals = Counter(
            "regiongate_budget_refusals",
            "Requests refused with 429 by a rule's token_limit (kind rate or quota) or max_concurrent "
            "(kind concurrency), by rule.",
            ["rule", "kind"],
            registry=r,
        )
        self.budget_fallbacks = Counter(
            "regiongate_budget_fallbacks",
            "Token-limit or concurrency checks that Redis could not answer (down, slow, circuit open) and that "
            "followed the policy's redis.on_error instead (let through or refused), by rule and what (tokens, "
            "concurrency).",
            ["rule", "what"],
            registry=r,
        )
        self.model_labels = ModelLabels()  # the policy in force's (policy_swapped)
        self._budget_limits: set[tuple[str, str, str]] = set()
        self._token_children: dict[tuple[str, str, str, str], Counter] = {}
        self._budget_children: dict[tuple[str, str, str], Counter] = {}
        self._budget_event_children: dict[tuple[str, str, str], Counter] = {}
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
        # (country, model label, source) -> tokens by TOKEN_KINDS; (rule, limit, kind) -> tokens charged.
        self._tokens: dict[tuple[str, str, str], list[int]] = {}
        self._budgets: dict[tuple[str, str, str], int] = {}
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
        self.budgets_in_force(new.policy)

    def budgets_in_force(self, policy: Policy) -> None:
        """The model labels and the token limits of the policy in force, from now on.

        A model the new policy no longer names is counted as ``other`` from now
        on; its series keep the count they reached (a counter that vanished
        would read as a reset to sums over models) until the process restarts.
        A limit that is gone has its gauge retired like a replaced policy's info.
        """
        self.model_labels = ModelLabels.of(policy)
        limits: dict[tuple[str, str, str], float] = {}
        for rule in policy.rules:
            budget = rule.decision.budget
            for limit in budget.tokens if budget is not None else ():
                limits[(rule.name, str(limit.index), limit.kind)] = limit.tokens / limit.per
        for gone in self._budget_limits - limits.keys():
            _retire(self.budget_limit, gone)
        for key, value in limits.items():
            self.budget_limit.labels(*key).set(value)
        self._budget_limits = set(limits)

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

    def tokens(self, country: str, model: str | None, usage: Usage) -> None:
        """A forwarded request's usage: tallied (by its model's label), folded with the rest."""
        key = (country, self.model_labels(model), usage.source)
        counts = self._tokens.get(key)
        if counts is None:
            self._tokens[key] = [usage.input, usage.output, usage.cached, usage.reasoning]
        else:
            counts[0] += usage.input
            counts[1] += usage.output
            counts[2] += usage.cached
            counts[3] += usage.reasoning

    def budget_spent(self, budget: Budget, usage: Usage) -> None:
        """What a request settled (or was charged as an estimate) against each of its rule's token limits."""
        tally = self._budgets
        for limit in budget.tokens:
            key = (budget.rule, str(limit.index), limit.kind)
            tally[key] = tally.get(key, 0) + cost(limit, usage.input, usage.output)

    def budget_refused(self, rule: str, kind: str) -> None:
        """A 429 from a token limit (rate, quota) or max_concurrent (concurrency): the store's observer."""
        self._budget_event("refused", rule, kind).inc()

    def budget_fallback(self, rule: str, what: str) -> None:
        """A token (``tokens``) or concurrency check Redis could not answer, so on_error decided."""
        self._budget_event("fallback", rule, what).inc()

    def _budget_event(self, event: str, rule: str, label: str) -> Counter:
        key = (event, rule, label)
        child = self._budget_event_children.get(key)
        if child is None:
            metric = self.budget_refusals if event == "refused" else self.budget_fallbacks
            child = self._budget_event_children[key] = metric.labels(rule, label)
        return child

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
        if self._tokens or self._budgets:
            self._fold_tokens()

    def _fold_tokens(self) -> None:
        """The token tallies; a kind's series is made at its first token (no cached series at 0 for
        providers that never report cached tokens)."""
        tokens, self._tokens = self._tokens, {}
        children = self._token_children
        for (country, model, source), counts in tokens.items():
            for kind, n in zip(TOKEN_KINDS, counts, strict=True):
                if n:
                    key = (country, model, kind, source)
                    child = children.get(key)
                    if child is None:
                        child = children[key] = self.tokens_total.labels(*key)
                    child.inc(n)
        budgets, self._budgets = self._budgets, {}
        for bkey, n in budgets.items():
            counter = self._budget_children.get(bkey)
            if counter is None:
                counter = self._budget_children[bkey] = self.budget_tokens.labels(*bkey)
            counter.inc(n)

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
