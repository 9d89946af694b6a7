"""Issue 18's acceptance test for the report: a real redis-server and a real gateway, a run with two
policy versions and a Redis outage; ``regiongate report --redis ... --format pdf``; the PDF's text shows
both versions, the gap, and the right counts per country."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.overrides import AUTH, CN, GB, wait_for
from support.processes import CITY, GatewayFactory, Stub
from support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

KEY = {"REGIONGATE_AUDIT_KEY": "r" * 40, "REGIONGATE_AUDIT_KEY_ID": "report-test"}
US = "216.160.83.56"
POLICY = """\
version: 1
revision: {revision}
defaults: {{action: deny}}
rules:
  - {{name: served, countries: [{countries}], action: allow}}
"""


@pytest.fixture
def redis(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always").start()
    try:
        yield server
    finally:
        server.stop()


def stream(redis: RedisServer, key: str) -> list[dict[str, Any]]:
    out = redis.command("XRANGE", key, "-", "+").splitlines()
    return [json.loads(line) for line in out if line.startswith("{")]


def test_report_over_two_versions_and_an_outage(
    gateway: GatewayFactory, stub: Stub, redis: RedisServer, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(revision="first", countries="GB, US"))
    pfx = "rep:"
    redis_args = ["--redis", redis.url, "--redis-prefix", pfx]
    gw = gateway(
        "--upstream", stub.url, "--policy", str(policy), "--geoip", CITY, "--trusted-proxy", "127.0.0.1/32",
        "--no-watch", "--audit", "refusals", "--redis-timeout", "0.2", *redis_args,
        env={"REGIONGATE_ADMIN_TOKEN": AUTH["Authorization"].split()[1], **KEY},
    )  # fmt: skip
    sent: dict[tuple[str, int], int] = {}

    def send(ip: str, n: int, expect: int) -> None:
        for _ in range(n):
            r = httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": ip}, timeout=10)
            assert r.status_code == expect
        sent[(ip, expect)] = sent.get((ip, expect), 0) + n

    send(GB, 4, 200)
    send(US, 3, 200)
    send(CN, 2, 403)
    policy.write_text(POLICY.format(revision="second", countries="GB"))  # US refused from now on
    assert httpx.post(gw.admin + "/admin/reload", headers=AUTH, timeout=10).status_code == 200
    send(US, 2, 403)
    redis.stop()  # the outage: refusals cannot be written; the gateway records the gap when Redis is back
    send(CN, 5, 403)
    send(GB, 1, 200)
    redis.start()
    wait_for(lambda: any(e["kind"] == "gap" for e in stream(redis, f"{pfx}audit")), 15, "a gap entry")
    send(GB, 1, 200)
    gw.proc.send_signal(signal.SIGTERM)  # a clean stop: the last counts flushed, the stop entry written
    gw.proc.wait(timeout=15)

    entries = stream(redis, f"{pfx}audit")
    shas = [e["sha256"] for e in entries if e["kind"] == "policy"]
    assert len(shas) == 2
    (gap,) = [e for e in entries if e["kind"] == "gap"]

    now = datetime.now(UTC)
    since = (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:00")
    until = (now + timedelta(hours=2)).strftime("%Y-%m-%dT%H:00")
    out = tmp_path / "pack"
    base = {k: v for k, v in os.environ.items() if not k.startswith("REGIONGATE_")}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "report", "--since", since, "--until", until, "--format", "pdf",
         "--out", str(out), *redis_args],
        capture_output=True, text=True, timeout=180, env={**base, **KEY},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = subprocess.run(
        ["pdftotext", "-layout", str(out / "report.pdf"), "-"], capture_output=True, text=True, check=True
    ).stdout
    flat = " ".join(text.split())

    # Both versions, in order, with their hashes and texts; the rules that refused under each.
    first, second = flat.index(f"sha256 {shas[0]}"), flat.index(f"sha256 {shas[1]}")
    assert first < second
    assert "revision: first" in flat and "revision: second" in flat
    # The gap: its minutes and what it lost, in the gaps table and as a fail-open/closed moment.
    assert f"{gap['from']} {gap['to']}" in flat
    assert f"redis: {gap['reasons']['redis']}" in flat and "Redis unavailable" in flat
    # Counts per country (the hourly counts cover the outage: they wait in the gateway until Redis is back).
    gb = sent[(GB, 200)]
    us_allowed, us_refused = sent[(US, 200)], sent[(US, 403)]
    cn = sent[(CN, 403)]
    assert f"GB United Kingdom {gb} 0 0" in flat
    assert f"US United States {us_allowed} {us_refused} 0" in flat
    assert f"CN China 0 {cn} 0" in flat
    judged = gb + us_allowed + us_refused + cn
    assert f"Requests judged {judged}" in flat and f"Refused {us_refused + cn}" in flat
    assert "Gateways seen 1" in flat and "Evidence gaps 1" in flat and "Chain check OK" in flat
    report = json.loads((out / "report.json").read_text())
    assert [p["sha256"] for p in report["policies"]] == shas
    assert report["summary"]["counts_from"] == "chain"
