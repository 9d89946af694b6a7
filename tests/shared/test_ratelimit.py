"""Rate limits: GCRA itself, then a real gateway with its limits in memory (no Redis)."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from gateway.policy import load_policy
from gateway.policy.ratelimit import RateLimit, budget_of, gcra, parse_period
from support.overrides import GB, limited_policy
from support.processes import CITY, GatewayFactory, Stub, write

GB2 = "81.2.69.160"


def test_gcra_lets_a_burst_through_then_one_per_interval() -> None:
    tat = None
    allowed = []
    for _ in range(5):
        outcome, tat = gcra(tat, 100.0, 1.0, 3.0)  # 1 per second, burst 3
        allowed.append(outcome.allowed)
    assert allowed == [True, True, True, False, False]
    refused, _ = gcra(tat, 100.0, 1.0, 3.0)
    assert refused.retry_after == pytest.approx(1.0) and refused.remaining == 0
    later, tat = gcra(tat, 101.0, 1.0, 3.0)
    assert later.allowed and later.remaining == 0
    full, _ = gcra(tat, 1000.0, 1.0, 3.0)
    assert full.allowed and full.remaining == 2


@pytest.mark.parametrize(("text", "seconds"), [("1m", 60), ("10s", 10), ("500ms", 0.5), ("1h", 3600), (30, 30)])
def test_periods(text: str | int, seconds: float) -> None:
    assert parse_period(text) == seconds


def test_budget_of_names_the_subject_and_never_keeps_a_token_or_a_hashed_address() -> None:
    import ipaddress

    from gateway.clientip import PUBLIC, ClientAddress
    from gateway.geo import GeoFacts
    from gateway.policy.callerkey import hash_key

    client = ClientAddress(ipaddress.ip_address(GB2), PUBLIC, "peer", GB2)
    facts = GeoFacts(country="GB")
    by_ip = RateLimit("r", "ip", 10, 60.0, 10)
    by_key = RateLimit("r", "api_key", 10, 60.0, 10)
    auth = [(b"authorization", b"Bearer sk-abc")]
    assert budget_of(by_ip, client, facts, auth, None, False) == GB2
    assert budget_of(by_ip, client, facts, auth, None, True) is None  # the key is in Redis: not known yet
    assert budget_of(by_ip, client, facts, auth, b"k", True) == "h:" + hash_key(b"k", GB2)[:32]
    assert budget_of(by_key, client, facts, auth, b"k", False) == hash_key(b"k", "sk-abc")
    assert budget_of(by_key, client, facts, auth, None, False) == "no-key"
    assert budget_of(RateLimit("r", "country", 10, 60.0, 10), client, facts, [], None, True) == "GB"


def test_rate_limit_in_the_policy_is_checked_with_file_and_line(tmp_path: Path) -> None:
    from gateway.yamlfile import FileError

    bad = limited_policy(3).replace("per: 1h", "per: soon")
    with pytest.raises(FileError) as e:
        load_policy(write(tmp_path, "p.yaml", bad))
    assert "p.yaml:7" in e.value.render() and "soon" in e.value.render()
    policy = load_policy(write(tmp_path, "ok.yaml", limited_policy(3, by="country")))
    limit = policy.rules[0].decision.limit
    assert limit is not None and (limit.requests, limit.per, limit.by, limit.burst) == (3, 3600, "country", 3)


def test_memory_limit_gives_openais_429(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    policy = write(tmp_path, "limited.yaml", limited_policy(3))
    gw = gateway("--upstream", stub.url, "--policy", policy, "--geoip", CITY, "--trusted-proxy", "127.0.0.1/32")
    codes = [httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": GB}).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    r = httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": GB})
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "requests" and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-limit-requests"] == "3"
    assert r.headers["x-ratelimit-remaining-requests"] == "0" and r.headers["x-should-retry"] == "true"
    # Another address has its own budget.
    assert httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": GB2}).status_code == 200
    # The SDK sees its own RateLimitError.
    client = openai.OpenAI(
        base_url=gw.url + "/v1", api_key="sk-test", max_retries=0, default_headers={"X-Forwarded-For": GB}
    )
    with pytest.raises(openai.RateLimitError) as e:
        client.models.list()
    assert e.value.code == "rate_limit_exceeded"
    assert 'regiongate_rate_limited_total{by="ip",rule="limited"} 2.0' in gw.metrics()
    line = gw.wait_log(6)[-1]
    assert line["status"] == 429 and line["error"] == "rate_limit_exceeded" and line["rule"] == "limited"


def test_memory_limit_refills(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    from support.overrides import status_of, wait_for

    policy = write(tmp_path, "limited.yaml", limited_policy(1, per="1s"))
    gw = gateway("--upstream", stub.url, "--policy", policy, "--geoip", CITY, "--trusted-proxy", "127.0.0.1/32")
    assert status_of(gw, GB) == 200
    codes: list[int] = []
    while 429 not in codes and len(codes) < 50:  # back to back, the budget of one per second runs out
        codes.append(status_of(gw, GB))
    assert 429 in codes
    wait_for(lambda: status_of(gw, GB) == 200, 10, "the budget to refill")


@pytest.mark.e2e
def test_explain_and_diff_show_rate_limits(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    old = write(tmp_path, "old.yaml", limited_policy(3))
    new = write(tmp_path, "new.yaml", limited_policy(5, on_error="closed"))
    run = [sys.executable, "-m", "gateway"]
    out = subprocess.run([*run, "explain", GB, "--policy", old, "--geoip", CITY], capture_output=True, text=True)
    assert "limit:     3 requests per 3600s by ip (burst 3)" in out.stdout
    report = json.loads(
        subprocess.run(
            [*run, "explain", GB, "--json", "--policy", old, "--geoip", CITY], capture_output=True, text=True
        ).stdout
    )
    assert report["rate_limit"] == {"requests": 3, "per": 3600.0, "by": "ip", "burst": 3}
    d = subprocess.run([*run, "diff", old, new, "--json"], capture_output=True, text=True)
    assert d.returncode == 1
    keys = {s["key"] for s in json.loads(d.stdout)["settings"]}
    assert keys == {"redis.on_error", "rules.limited.rate_limit"}
