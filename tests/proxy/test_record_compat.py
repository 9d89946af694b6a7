"""The record off the hot path writes the same access log and ``/metrics`` as the record it replaced, byte for byte.

Issue 16 moved the access-log line's making to the log's writer thread
(:mod:`gateway.proxy.logline`) and the request path's metrics to per-loop
tallies folded into prometheus-client at scrape time (:mod:`gateway.metrics`).
The oracle is the record as it was before, frozen below (:class:`OldRecord`:
the line built on the loop, ``datetime.now``, one prometheus-client update per
count). Both are given the same exchanges and the same clock; their lines and
their ``/metrics`` text must be equal, bytes and all: key order, number
formats, label sets, bucket counts, and histogram sums to the last bit.

The exchanges are generated (seeded) to reach every optional field, and are
also the real ones of an in-process gateway (:mod:`support.wire`), whose
``Record.write`` is wrapped to feed the oracle too. With workers, the
multiprocess files of two simulated workers are compared the same way.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector
from yarl import URL

from gateway import metrics as metrics_module
from gateway.accesslog import AccessLog, AddressRedactor
from gateway.clientip import ClientAddress, parse_address
from gateway.dataplane.failover import REGION_REFUSAL, Failover
from gateway.dataplane.limits import UpstreamTimeouts
from gateway.dataplane.upstream import Upstream
from gateway.geo import GeoFacts
from gateway.metrics import Metrics
from gateway.policy import DENY, NEEDS_MODEL, Decision, decide_model
from gateway.proxy import record as record_module
from gateway.proxy.record import REJECTED, Record
from gateway.proxy.replies import BAD_REQUEST_CODES
from support.processes import RawUpstream
from support.wire import inprocess_gateway

# --- the oracle: the record as it was before issue 16 (frozen; do not edit), with issue 17's `via` ----


class OldMetrics(Metrics):
    """The request path's three counts as prometheus-client updates per request, as they were."""

    def decision(self, verdict: str, rule: str, country: str, upstream: str, via: str) -> None:
        key = (verdict, rule, country, upstream, via)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(*key)
        child.inc()

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


class OldRecord:
    """``Record.write`` before issue 16, with its two clock readings given; returns the line it wrote."""

    def __init__(self, metrics: Metrics, redact: AddressRedactor) -> None:
        self.metrics = metrics
        self.redact = redact

    def write(self, ex: Any, seconds: float, now: datetime) -> bytes:
        request, client, facts, request_id = ex.request, ex.client, ex.facts, ex.request_id
        decision = ex.decision
        path = None if decision is REJECTED else ex.path
        country = facts.country or (client.kind if client.kind != "public" else "unknown")
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
            shadow = ex.shadow = decide_model(ex.active.shadow, client, facts, path, None)
        if shadow is not None and shadow.verdict != decision.verdict:
            m.shadow_disagreement(decision.verdict, shadow.verdict, shadow.rule)
        target = ex.target
        if ex.failovers:
            for f in ex.failovers:
                m.upstream(f.source.name, f.source.target, f.status, None)
                m.failover(f.source.label, f.dest.label, f.reason)
                if f.reason == REGION_REFUSAL:
                    m.region_refusal(f.source.name)
        if target is not None and not (ex.client_gone and ex.ttfb is None):
            m.upstream(target.name, target.target, ex.status if ex.ttfb is not None else 0, ex.ttfb)
            if ex.refused is not None:
                m.region_refusal(target.name)
        entry: dict[str, Any] = {
            "time": now.isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "method": request.method[:32],
            "path": path if path is not None else request.raw_path[:2048].decode("latin-1"),
            "client": self.redact(client.ip),
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
            entry["via"] = ex.via
        if ex.model is not None:
            entry["model"] = ex.model[:256]
        if facts.subdivisions:
            entry["subdivisions"] = facts.subdivisions
        if facts.asn is not None:
            entry["asn"] = facts.asn
        if facts.anonymizer:
            entry["anonymizer"] = sorted(facts.anonymizer)
        if client.problem:
            entry["client_problem"] = self.redact.text(client.problem)
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
        return orjson.dumps(entry) + b"\n"


# --- the same clock for both ------------------------------------------------------------------------


class Clock:
    """The two readings ``Record.write`` takes, set per exchange and given to the oracle as it read them."""

    def __init__(self) -> None:
        self.ns = 0
        self.perf = 0.0

    def now(self) -> datetime:
        """``datetime.now(UTC)`` at ``ns``: the clock floored to the microsecond (CPython's rounding)."""
        return datetime.fromtimestamp(self.ns // 10**9, UTC).replace(microsecond=self.ns // 1000 % 10**6)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(record_module, "time_ns", lambda: c.ns)
    monkeypatch.setattr(record_module, "perf_counter", lambda: c.perf)
    return c


# --- generated exchanges ----------------------------------------------------------------------------

TIMEOUTS = UpstreamTimeouts()
UPSTREAMS = [Upstream(n, t, URL(f"http://127.0.0.1:9/{n}"), "", TIMEOUTS) for n in ("default", "eu") for t in "01"]
COUNTRIES = [None, "GB", "DE", "CN", "US"]
VERDICTS = [("allow", "allow"), ("deny", "deny"), ("route", "route"), ("monitor", "deny"), ("monitor", "monitor")]
ADDRESSES = ["2.125.160.216", "89.160.20.112", "2001:db8::17", "10.1.2.3", None]


def exchange(rng: random.Random, n: int) -> Any:
    """One finished exchange with a random mix of every field the record reads."""
    text = rng.choice(ADDRESSES)
    ip = parse_address(text) if text is not None else None
    kind = "public" if text and not text.startswith("10.") else ("private" if text else "invalid")
    problem = rng.choice([None, None, "X-Forwarded-For: '203.0.113.9x' is not an address", "bad header"])
    client = ClientAddress(ip, kind, rng.choice(["peer", "x-forwarded-for"]), text or "junk", problem)  # type: ignore[arg-type]
    facts = GeoFacts(
        country=rng.choice(COUNTRIES),
        subdivisions=rng.choice([(), ("ENG",), ("BY", "BE")]),
        asn=rng.choice([None, 15169, 3320]),
        anonymizer=rng.choice([frozenset(), frozenset({"hosting_provider", "anonymous_vpn"})]),
    )
    if rng.random() < 0.1:
        decision = REJECTED
    else:
        verdict, action = rng.choice(VERDICTS)
        decision = Decision(
            verdict,  # type: ignore[arg-type]
            action,  # type: ignore[arg-type]
            rng.choice(["gb", "eu-route", "defaults.action", 'weird "rule" ü']),
            "because",
            rng.choice([None, "default", "eu"]),
            shadow=rng.choice([(), ("watch",), ("watch", "probe")]),
        )
    shadow = rng.choice(
        [None, None, Decision("deny", "deny", "shadow-rule", "x", None), Decision("allow", "allow", "s", "y")]
    )
    target = rng.choice([None, *UPSTREAMS])
    failovers = None
    if target is not None and rng.random() < 0.3:
        source = rng.choice(UPSTREAMS)
        reason = rng.choice(["connect_error", "status_50x", REGION_REFUSAL])
        failovers = [
            Failover(source, target, reason, rng.choice([0, 503, 403]), "refused" if reason == REGION_REFUSAL else None)
        ]
    answered = rng.random() < 0.8
    return SimpleNamespace(
        request=SimpleNamespace(
            method=rng.choice(["GET", "POST", "PATCH" * 10]),
            raw_path=rng.choice([b"/v1/models", b"/v1/%2e%2e/x\xff" * 200]),
        ),
        request_id=f"req-{n:06d}",
        started=0.0,
        active=SimpleNamespace(tag="sha256:abc", shadow_tag=rng.choice([None, "sha256:def"]), shadow=None, policy=None),
        path="/v1/chat/completions",
        client=client,
        facts=facts,
        decision=decision,
        shadow=shadow,
        model=rng.choice([None, "gpt-4o-mini", "m" * 300]),
        attempts=rng.choice([0, 1, 2]),
        target=target,
        failovers=failovers,
        refused=rng.choice([None, None, "unsupported_country_region_territory"]) if answered else None,
        client_gone=rng.random() < 0.1,
        status=rng.choice([200, 403, 404, 429, 502, 0]),
        sent=rng.randrange(0, 10**7),
        error=rng.choice([None, None, "rate_limit_exceeded", "upstream_timeout", *sorted(BAD_REQUEST_CODES)[:2]]),
        ttfb=rng.choice([None, rng.random() * 3, rng.random() / 1000]) if answered else None,
        via=rng.choice(["proxy", "proxy", "nginx", "envoy_grpc"]),
        usage=None,  # issue 19's slots: the lines of requests whose usage was not read, and without client keys
        caller=None,
    )


def duration(rng: random.Random) -> float:
    """Durations across every bucket, on bucket bounds too, and ones whose milliseconds round at the 3rd digit."""
    return rng.choice([rng.random() / 1000, rng.random(), rng.random() * 400, 0.0005, 0.25, 10.0, 1.2345005, 0.0])


def runtime(log: AccessLog) -> Any:
    """What Record reads of the runtime: the access log, and the audit stream (off)."""
    return SimpleNamespace(access_log=log, audit=SimpleNamespace(enabled=False))


@pytest.mark.parametrize("mode", ["full", "truncated", "hashed"])
def test_lines_and_metrics_equal_the_old_records_over_generated_exchanges(
    tmp_path: Path, clock: Clock, mode: str
) -> None:
    rng = random.Random(f"record-compat-{mode}")
    redact = AddressRedactor(mode, b"k" * 16)  # type: ignore[arg-type]
    log = AccessLog(str(tmp_path / "access.log"), redact)
    new_metrics, old_metrics = Metrics(CollectorRegistry()), OldMetrics(CollectorRegistry())
    new, old = Record(runtime(log), new_metrics), OldRecord(old_metrics, redact)
    expected = []
    for n in range(600):
        ex = exchange(rng, n)
        # Any wall time (millisecond edges included) and any duration.
        clock.ns = rng.choice([1_764_777_600_000_000_000, 1_764_777_600_999_999_999, 1_800_000_000_123_456_789])
        clock.ns += rng.randrange(0, 10**12)
        seconds = duration(rng)
        clock.perf = ex.started + seconds
        expected.append(old.write(ex, clock.perf - ex.started, clock.now()))
        new.write(ex)
    log.close()
    lines = (tmp_path / "access.log").read_bytes().splitlines(keepends=True)
    assert len(lines) == len(expected)
    for got, want in zip(lines, expected, strict=True):
        assert got == want
    new_metrics.fold()
    assert generate_latest(new_metrics.registry) == generate_latest(old_metrics.registry)


def test_a_fold_between_any_two_requests_changes_nothing(clock: Clock) -> None:
    """Folded after every request, after some, or once: the same text (sums are added in the same order)."""
    rng = random.Random("folds")
    exchanges = [(exchange(rng, n), duration(rng)) for n in range(300)]
    texts = []
    for every in (1, 7, 1000):
        metrics = Metrics(CollectorRegistry())
        log = AccessLog("off", AddressRedactor("full"))
        rec = Record(runtime(log), metrics)
        for n, (ex, seconds) in enumerate(exchanges):
            clock.perf = ex.started + seconds
            rec.write(ex)
            if n % every == 0:
                metrics.fold()
        metrics.fold()
        texts.append(generate_latest(metrics.registry))
    assert texts[0] == texts[1] == texts[2]
    assert b'regiongate_request_duration_seconds_count{decision="allow"}' in texts[0]


async def in_one_turn(rec: Record, batch: list[tuple[Any, float]], clock: Clock) -> None:
    """A worker's loop turn that finishes every request of ``batch``: folded once, at the next turn."""
    metrics = rec.metrics
    assert isinstance(metrics, Metrics)
    for ex, seconds in batch:
        clock.perf = ex.started + seconds
        rec.write(ex)
    assert metrics._fold_scheduled and metrics._decisions  # tallied, not yet in the files
    await asyncio.sleep(0)
    assert not metrics._fold_scheduled and not metrics._decisions


def test_with_workers_the_multiprocess_files_sum_to_the_same_text(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers' files (pids 101 and 102), new and old, each read as ``/metrics`` reads them."""
    rng = random.Random("workers")
    batches = {pid: [(exchange(rng, n), duration(rng)) for n in range(200)] for pid in (101, 102)}
    texts = []
    for which, make in (("old", OldMetrics), ("new", Metrics)):
        directory = tmp_path / which
        directory.mkdir()
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
        for pid, batch in batches.items():
            monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(lambda pid=pid: pid))  # type: ignore[no-untyped-call]
            metrics = make(CollectorRegistry())
            if isinstance(metrics, OldMetrics):
                oracle = OldRecord(metrics, AddressRedactor("full"))
                for ex, seconds in batch:
                    oracle.write(ex, seconds, clock.now())
            else:
                rec = Record(runtime(AccessLog("off", AddressRedactor("full"))), metrics)
                asyncio.run(in_one_turn(rec, batch, clock))
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
        texts.append(generate_latest(registry))
    old, new = texts
    assert b"regiongate_decisions_total" in new and b"regiongate_upstream_ttfb_seconds_bucket" in new
    assert new.decode().splitlines() == old.decode().splitlines()


WIRE_POLICY = """version: 1
rules:
  - {name: watch-gb, countries: [GB], action: deny, mode: monitor}
  - {name: gb, countries: [GB], action: allow}
  - {name: se, countries: [SE], action: allow}
defaults: {action: deny, unknown: deny}
"""
# (method, target, X-Forwarded-For): allowed, refused, unknown, private (let through), not an address, refused
# before the policy (a method not allowed, a path with no canonical form), a query, a long path.
WIRE_REQUESTS = [
    ("GET", "/v1/models", "2.125.160.216"),
    ("POST", "/v1/chat/completions", "89.160.20.112"),
    ("GET", "/v1/models", "175.16.199.1"),
    ("GET", "/v1/models?x=1", "216.160.83.56"),
    ("GET", "/v1/models", "10.0.0.7"),
    ("GET", "/v1/models", "2001:db8::1"),
    ("GET", "/v1/models", "not-an-address"),
    ("PATCH", "/v1/models", "2.125.160.216"),
    ("GET", "/v1/%2e%2e/admin", "2.125.160.216"),
    ("DELETE", "/v1/files/" + "a" * 3000, "89.160.20.112"),
    ("GET", "/v1/models", "2.125.160.216, 175.16.199.1"),
]


def send(port: int, method: str, target: str, xff: str) -> bytes:
    """One request on its own connection; the whole answer (the gateway closes after it)."""
    body = b'{"model":"gpt-4o-mini"}' if method == "POST" else b""
    head = f"{method} {target} HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: {xff}\r\nConnection: close\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n" if body else "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_an_in_process_gateway_logs_and_counts_as_the_old_record(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real request path's exchanges, each recorded by both; the log file and the metrics compared."""
    oracle = OldMetrics(CollectorRegistry())
    expected: list[bytes] = []
    write = Record.write

    def both(self: Record, ex: Any) -> None:
        clock.ns, clock.perf = time.time_ns(), time.perf_counter()
        expected.append(
            OldRecord(oracle, self.runtime.access_log.redact).write(ex, clock.perf - ex.started, clock.now())
        )
        write(self, ex)

    monkeypatch.setattr(Record, "write", both)
    upstream = RawUpstream()
    try:
        with inprocess_gateway(tmp_path, upstream.url, policy=WIRE_POLICY) as gw:
            statuses = [send(gw.port, *r).split(b" ", 2)[1] for r in WIRE_REQUESTS]
    finally:
        upstream.close()
    # Stopped: the log is closed (every line written) and the loop gone, so the tallies can be folded here.
    assert statuses == [b"200", b"200", b"403", b"403", b"200", b"403", b"403", b"405", b"400", b"200", b"403"]
    lines = gw.access_log.read_bytes().splitlines(keepends=True)
    assert len(lines) == len(expected) == len(WIRE_REQUESTS)
    assert lines == expected
    gw.metrics.fold()
    text = generate_latest(gw.metrics.registry)
    assert b'regiongate_upstream_ttfb_seconds_count{upstream="default"} 4.0' in text
    assert text == generate_latest(oracle.registry)


def test_the_writer_thread_leaves_out_a_line_it_cannot_build_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in one line costs that line, not the log; what waits is back to 0 once all is written."""
    log = AccessLog(str(tmp_path / "access.log"), AddressRedactor("full"))

    def line(entry: Any, redact: AddressRedactor) -> bytes:
        if entry == "bad":
            raise ValueError("boom")
        return f"{entry}\n".encode()

    log.line = line
    for entry in ("one", "bad", "two"):
        log.put(entry)
    log.close()
    assert (tmp_path / "access.log").read_bytes() == b"one\ntwo\n"
    assert "an access-log line could not be built" in caplog.text
    assert log._added + log._settled - log._written == 0 and log.dropped == 0


def test_one_process_folds_by_itself_every_fold_at_requests(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a scrape the tallies stay bounded: every FOLD_AT requests they are folded in place."""
    monkeypatch.setattr(metrics_module, "FOLD_AT", 5)
    metrics = Metrics(CollectorRegistry())
    rec = Record(runtime(AccessLog("off", AddressRedactor("full"))), metrics)
    rng = random.Random("bound")

    def requests_counted() -> float:
        return sum(
            s.value
            for family in metrics.registry.collect()
            if family.name == "regiongate_request_duration_seconds"
            for s in family.samples
            if s.name.endswith("_count")
        )

    for n in range(12):
        ex = exchange(rng, n)
        clock.perf = ex.started + duration(rng)
        rec.write(ex)
    assert requests_counted() == 10 and metrics._tallied == 2
    metrics.fold()
    assert requests_counted() == 12 and metrics._tallied == 0
