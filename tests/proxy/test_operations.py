"""What operators see: startup errors, readiness, metrics, access log, workers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.processes import ASN, BAD_DATA, CITY, GatewayFactory, Stub, write

GB, CN = "2.125.160.216", "175.16.199.1"
TRUST = ["--trusted-proxy", "127.0.0.1/32"]


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_embedded_defaults_start_and_say_so(gateway: GatewayFactory, stub: Stub) -> None:
    gw = gateway("--upstream", stub.url)
    assert "embedded iptocc" in gw.stderr()
    status, ready = get_json(gw.admin + "/readyz")
    assert status == 200 and ready["ready"] is True and ready["embedded_geo"] is True
    assert any("embedded" in w for w in ready["warnings"])
    assert str(ready["policy"]["path"]).endswith("openai-supported-country-only.yaml")
    assert get_json(gw.admin + "/healthz") == (200, {"status": "ok"})


def test_readyz_names_policy_and_databases(gateway: GatewayFactory, stub: Stub) -> None:
    gw = gateway("--geoip", CITY, "--geoip", ASN, "--upstream", stub.url)
    _, ready = get_json(gw.admin + "/readyz")
    assert [g["type"] for g in ready["geo"]] == ["GeoIP2-City", "GeoLite2-ASN"]
    assert ready["embedded_geo"] is False and len(str(ready["policy"]["sha256"])) == 64


@pytest.mark.parametrize("bad", sorted(p.name for p in BAD_DATA.glob("*.mmdb")))
def test_corrupt_database_stops_startup_with_a_clear_error(gateway: GatewayFactory, bad: str) -> None:
    gw = gateway("--geoip", str(BAD_DATA / bad), wait=False)
    assert gw.proc.wait(timeout=15) == 2
    err = gw.stderr()
    assert bad in err and "Traceback" not in err


def test_bad_policy_stops_startup_with_file_and_line(gateway: GatewayFactory, tmp_path: Path) -> None:
    policy = write(tmp_path, "bad.yaml", "version: 1\nrules:\n  - {countries: [UK], action: allow}\n")
    gw = gateway("--policy", policy, wait=False)
    assert gw.proc.wait(timeout=15) == 2
    assert f"{policy}:3: rules[0].countries: 'UK' is not an ISO 3166-1 alpha-2 code" in gw.stderr()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trusted-proxy", "10.0.0.1/8"], "--trusted-proxy"),
        (["--client-ip-header", "bad header"], "--client-ip-header"),
        (["--upstream", "ftp://example"], "--upstream"),
        (["--workers", "0"], "--workers"),
        (["--policy", "/nonexistent/policy.yaml"], "cannot read policy"),
    ],
)
def test_bad_flags_stop_startup(gateway: GatewayFactory, args: list[str], message: str) -> None:
    gw = gateway(*args, wait=False)
    assert gw.proc.wait(timeout=15) == 2
    assert message in gw.stderr() and "Traceback" not in gw.stderr()


def test_port_in_use_is_a_clear_error(gateway: GatewayFactory, stub: Stub) -> None:
    import sys

    from support.processes import free_port

    gw = gateway("--upstream", stub.url)
    argv = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--upstream",
        stub.url,
        "--port",
        str(gw.port),
        "--admin-port",
        str(free_port()),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    assert result.returncode == 2 and "in use" in result.stderr.lower() and "Traceback" not in result.stderr


def test_metrics(gateway: GatewayFactory, stub: Stub) -> None:
    gw = gateway("--geoip", CITY, "--upstream", stub.url, *TRUST)
    for xff in (GB, GB, CN):
        httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": xff})
    text = gw.metrics()
    assert (
        'regiongate_decisions_total{country="GB",decision="allow",rule="supported",upstream="default",via="proxy"} 2.0'
        in text
    )
    assert (
        'regiongate_decisions_total{country="CN",decision="deny",rule="defaults.action",upstream="",via="proxy"} 1.0'
        in text
    )
    assert 'regiongate_upstream_requests_total{status_class="2xx",target="0",upstream="default"} 2.0' in text
    assert 'regiongate_request_duration_seconds_count{decision="allow"} 2.0' in text
    assert 'regiongate_upstream_ttfb_seconds_count{upstream="default"} 2.0' in text
    assert re.search(r'regiongate_geoip_database_info\{build_epoch="\d+",type="GeoIP2-City"\} 1\.0', text)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (the test command installs Debian's prometheus)")
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_workers_share_sockets_and_metrics_add_up(gateway: GatewayFactory, stub: Stub) -> None:
    gw = gateway("--geoip", CITY, "--upstream", stub.url, "--workers", "2", *TRUST)
    pids: set[int] = set()
    with httpx.Client() as client:  # keep-alive would pin one worker; use fresh connections
        for i in range(40):
            client.get(gw.url + "/v1/models", headers={"X-Forwarded-For": GB if i % 4 else CN, "Connection": "close"})
    deadline = time.monotonic() + 20
    while len(pids) < 2 and time.monotonic() < deadline:  # every worker answers the control plane too
        pids.add(get_json(gw.admin + "/readyz")[1]["pid"])
        time.sleep(0.01)  # the kernel may keep waking one busy worker; give the other a turn
    text = gw.metrics()
    assert (
        'regiongate_decisions_total{country="GB",decision="allow",rule="supported",upstream="default",via="proxy"} 30.0'
        in text
    )
    assert (
        'regiongate_decisions_total{country="CN",decision="deny",rule="defaults.action",upstream="",via="proxy"} 10.0'
        in text
    )
    lines = gw.wait_log(40)
    assert len(lines) == 40
    assert len(pids) == 2 and gw.proc.pid not in pids


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("full", GB), ("truncated", "2.125.160.0/24"), ("hashed", re.compile(r"^h:[0-9a-f]{16}$"))],
)
def test_access_log_address_modes(gateway: GatewayFactory, stub: Stub, mode: str, expected: object) -> None:
    gw = gateway("--geoip", CITY, "--upstream", stub.url, "--log-address", mode, "--log-key", "k", *TRUST)
    httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": GB})
    httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": GB})
    first, second = gw.wait_log(2)
    if isinstance(expected, re.Pattern):
        assert expected.match(str(first["client"])) and first["client"] == second["client"]
    else:
        assert first["client"] == expected
    for key in ("time", "request_id", "decision", "rule", "country", "upstream", "status", "duration_ms", "bytes"):
        assert key in first, key
    assert first["request_id"] != second["request_id"]
