"""Metrics with ``--workers 2``: counters, histograms and gauges add up right across worker processes.

Each worker writes prometheus-client's multiprocess files and any worker
answers ``/metrics`` with all of them combined. Counters and histograms are
summed (a dead worker's counts stay: they happened); the gauges use
``livemax``, so they carry no ``pid`` label and a dead worker's values go.
The metrics directory given in ``PROMETHEUS_MULTIPROC_DIR`` outlives a
restart (a container's ``emptyDir``), so the gateway empties it at start.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from pathlib import Path

import httpx
from prometheus_client.metrics import MetricWrapperBase

from support.live import get_json, wait_until, wait_workers_serve, write_in_place
from support.processes import CITY, ROOT, GatewayFactory, Stub

GB, CN = "2.125.160.216", "175.16.199.1"
TRUST = ["--trusted-proxy", "127.0.0.1/32"]
TOKEN = "metrics-workers-test-token"
POLICY = (
    "version: 1\nrules:\n  - {name: gb-allowed, countries: [GB], action: allow}\n"
    "defaults: {action: deny, unknown: deny}\n"
)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every series of one metric: its labels -> value."""
    found = {}
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            found[labels] = float(m.group(2))
    return found


def value(text: str, name: str, **labels: str) -> float:
    matches = [v for k, v in samples(text, name).items() if set(labels.items()) <= k]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def drive(gw_url: str, total: int) -> None:
    """``total`` requests on fresh connections (keep-alive would pin one worker); every fourth from CN."""
    with httpx.Client() as client:
        for i in range(total):
            r = client.get(
                gw_url + "/v1/models", headers={"X-Forwarded-For": GB if i % 4 else CN, "Connection": "close"}
            )
            assert r.status_code == (200 if i % 4 else 403)


def worker_pids(admin: str) -> set[int]:
    pids: set[int] = set()

    def both() -> bool:
        pids.add(get_json(admin + "/readyz")[1]["pid"])
        return len(pids) >= 2

    wait_until(both, "both workers answered /readyz", attempts=2000, pause=0.01)
    return pids


def test_counters_histograms_and_gauges_across_two_workers(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    # --no-watch: the reload below is the admin API's; with the watcher on, it could see the edit
    # first and the admin reload then found nothing changed (seen on a loaded machine).
    args = ("--policy", str(policy), "--geoip", CITY, "--upstream", stub.url, *TRUST, "--workers", "2", "--no-watch")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "REGIONGATE_ADMIN_TOKEN": TOKEN}

    # A previous run's files in the same directory, as an emptyDir keeps them over a container restart.
    first = gateway(*args, env=env)
    drive(first.url, 8)
    # A worker folds its tallies at the end of the loop turn that recorded a request, before it hands
    # the access log that turn's lines (gateway.proxy.record): a line in the log means its metrics are
    # in the shared files. Without this wait a busy machine let the scrape in first (5 of 6 seen).
    first.wait_log(8)
    assert value(first.metrics(), "regiongate_decisions_total", country="GB") == 6
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=20) == 0
    assert any(p.suffix == ".db" for p in metrics_dir.iterdir())

    started = time.time()
    gw = gateway(*args, env=env)
    pids = worker_pids(gw.admin)
    assert gw.proc.pid not in pids
    drive(gw.url, 40)
    gw.wait_log(40)
    text = gw.metrics()

    # Counters: summed over both workers, and nothing left from the previous run.
    assert samples(text, "regiongate_decisions_total") == {
        frozenset(
            {
                ("country", "GB"),
                ("decision", "allow"),
                ("rule", "gb-allowed"),
                ("upstream", "default"),
                ("via", "proxy"),
            }
        ): 30,
        frozenset(
            {("country", "CN"), ("decision", "deny"), ("rule", "defaults.action"), ("upstream", ""), ("via", "proxy")}
        ): 10,
    }
    assert value(text, "regiongate_upstream_requests_total", status_class="2xx", upstream="default") == 30
    assert value(text, "regiongate_access_log_dropped_total") == 0
    # Histograms: counts and the +Inf bucket summed; refusals never reach an upstream.
    for decision, count in (("allow", 30), ("deny", 10)):
        assert value(text, "regiongate_request_duration_seconds_count", decision=decision) == count
        assert value(text, "regiongate_request_duration_seconds_bucket", decision=decision, le="+Inf") == count
        assert value(text, "regiongate_request_duration_seconds_sum", decision=decision) > 0
    assert value(text, "regiongate_upstream_ttfb_seconds_count", upstream="default") == 30
    buckets = [v for k, v in samples(text, "regiongate_upstream_ttfb_seconds_bucket").items()]
    assert max(buckets) == 30 and len(buckets) == 19  # 18 bounds and +Inf, one upstream
    # Gauges (livemax): one series each, no per-worker pid label, the value every worker holds.
    assert "pid=" not in text
    (info,) = [k for k, v in samples(text, "regiongate_geoip_database_info").items() if v == 1]
    epoch = int(dict(info)["build_epoch"])
    before = time.time()
    age = value(gw.metrics(), "regiongate_geoip_database_age_seconds", type="GeoIP2-City")
    after = time.time()
    assert round(before) - epoch - 1 <= age <= round(after) - epoch + 1
    assert samples(text, "regiongate_policy_info") == {
        frozenset({("path", str(policy)), ("sha256", sha(POLICY)), ("version", sha(POLICY)[:12])}): 1
    }
    loaded = value(text, "regiongate_policy_last_reload_timestamp_seconds")
    assert started <= loaded <= time.time()

    # A worker killed outright: its counts stay, its gauges go with it, the new worker's come.
    os.kill(min(pids), signal.SIGKILL)
    wait_until(lambda: worker_pids(gw.admin) - pids, "a replacement worker answered", attempts=200, pause=0.05)
    drive(gw.url, 4)
    gw.wait_log(44)
    text = gw.metrics()
    assert value(text, "regiongate_decisions_total", country="GB") == 33
    assert value(text, "regiongate_request_duration_seconds_count", decision="deny") == 11
    assert samples(text, "regiongate_policy_info") == {
        frozenset({("path", str(policy)), ("sha256", sha(POLICY)), ("version", sha(POLICY)[:12])}): 1
    }
    assert "pid=" not in text

    # A reload in both workers: the old policy's info series 0, the new one's 1, two reloads counted.
    new = POLICY + "# reviewed\n"
    write_in_place(policy, new)
    status, result = get_json(gw.admin + "/admin/reload", {"Authorization": f"Bearer {TOKEN}"}, "POST")
    assert status == 200 and result["changed"] is True, result
    wait_workers_serve(gw.admin, 2, sha(new))
    text = gw.metrics()
    assert {dict(k)["sha256"]: v for k, v in samples(text, "regiongate_policy_info").items()} == {
        sha(POLICY): 0,
        sha(new): 1,
    }
    assert value(text, "regiongate_policy_reloads_total", result="ok", role="policy") == 2


def documented_metrics() -> dict[str, str]:
    """The metrics table of docs/reference/metrics.md: metric name -> its labels column."""
    text = (ROOT / "docs" / "reference" / "metrics.md").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| `regiongate_")]
    return {row[0].strip("| `"): row[2] for row in rows}


def test_docs_document_every_metric_and_its_labels() -> None:
    """Each metric the gateway defines is in the docs' metrics table, with each of its labels named there."""
    from prometheus_client import CollectorRegistry

    from gateway.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    defined = {}
    for attribute in vars(metrics).values():
        if isinstance(attribute, MetricWrapperBase):
            name = attribute._name + ("_total" if attribute._type == "counter" else "")
            defined[name] = attribute._labelnames
    documented = documented_metrics()
    assert set(documented) == set(defined)
    for name, labels in defined.items():
        column = documented[name]
        for label in labels:
            assert f"`{label}`" in column, (name, label)
        if not labels:
            assert column.strip() == "none", name
