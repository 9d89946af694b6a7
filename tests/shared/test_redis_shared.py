"""Overrides shared through a real Redis: two gateways, expiry, Redis killed and restarted, bad credentials.

Each test uses its own key prefix on the session's Redis, or a Redis of its
own when it kills or restarts it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.overrides import (
    AUTH,
    CN,
    GB,
    add,
    cli,
    limited_policy,
    list_ids,
    overrides_gateway,
    remove,
    status_of,
    wait_for,
)
from support.processes import GatewayFactory, Stub, free_port
from support.redis_server import RedisServer, cluster, running, sentinel_failover

SE = "89.160.20.112"
_prefixes = itertools.count()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with running(tmp_path / "redis") as server:
        yield server


def prefix() -> str:
    return f"t{next(_prefixes)}-{time.monotonic_ns()}:"


def shared(gateway: GatewayFactory, stub: Stub, url: str, pfx: str, *args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return overrides_gateway(gateway, stub, "--redis", url, "--redis-prefix", pfx, *args, env=env)


def readyz(gw) -> dict:  # type: ignore[no-untyped-def,type-arg]
    r = httpx.get(gw.admin + "/readyz", timeout=10)
    assert r.status_code == 200  # Redis state never costs readiness
    return r.json()  # type: ignore[no-any-return]


def test_two_gateways_agree_on_a_new_override(gateway: GatewayFactory, stub: Stub, redis_server: RedisServer) -> None:
    pfx = prefix()
    a, b = shared(gateway, stub, redis_server.url, pfx), shared(gateway, stub, redis_server.url, pfx)
    assert status_of(a, GB) == status_of(b, GB) == 200
    o = add(a, {"action": "deny", "cidr": "2.125.160.216/32", "reason": "abuse", "by": "test"})
    assert status_of(a, GB) == 403
    started = time.monotonic()
    wait_for(lambda: status_of(b, GB) == 403, 10, "the second gateway to apply the override")
    seen_after = time.monotonic() - started
    assert o["id"] in list_ids(b)
    assert b.wait_log(2)[-1]["rule"] == f"override:{o['id']}"
    # Lifted on b, lifted on a.
    remove(b, o["id"])
    wait_for(lambda: status_of(a, GB) == 200, 10, "the first gateway to lift the override")
    state = readyz(a)["overrides"]
    assert state["backend"] == "redis" and state["up"] is True and state["circuit"] == "closed"
    metrics = a.metrics()
    assert "regiongate_redis_up 1.0" in metrics and "regiongate_redis_latency_seconds_count" in metrics
    print(f"second gateway applied the override {seen_after:.3f}s after the first answered")


def test_api_key_override_is_shared_by_hash(gateway: GatewayFactory, stub: Stub, redis_server: RedisServer) -> None:
    pfx = prefix()
    a, b = shared(gateway, stub, redis_server.url, pfx), shared(gateway, stub, redis_server.url, pfx)
    add(a, {"action": "deny", "api_key": "sk-shared-leak", "reason": "leaked"})
    wait_for(lambda: status_of(b, GB, token="sk-shared-leak") == 403, 10, "the key override on the second gateway")
    assert status_of(b, GB, token="sk-fine") == 200
    dump = redis_server.command("HGETALL", f"{pfx}{{overrides}}:data")
    assert "sk-shared-leak" not in dump and "api_key" in dump


def test_override_expiry_with_redis(gateway: GatewayFactory, stub: Stub, redis_server: RedisServer) -> None:
    pfx = prefix()
    a, b = shared(gateway, stub, redis_server.url, pfx), shared(gateway, stub, redis_server.url, pfx)
    add(a, {"action": "allow", "country": "CN", "reason": "one-second pilot", "ttl": 1})
    assert status_of(a, CN) == 200
    wait_for(lambda: status_of(a, CN) == 403 and status_of(b, CN) == 403, 10, "the override to expire")
    assert list_ids(a) == list_ids(b) == []
    wait_for(lambda: redis_server.command("HLEN", f"{pfx}{{overrides}}:data") == "0", 10, "Redis to drop it")


def test_redis_killed_mid_load_then_restarted(gateway: GatewayFactory, stub: Stub, own_redis: RedisServer) -> None:
    pfx = prefix()
    a = shared(gateway, stub, own_redis.url, pfx)
    b = shared(gateway, stub, own_redis.url, pfx)
    o = add(a, {"action": "deny", "country": "GB", "reason": "held through an outage"})
    wait_for(lambda: status_of(b, GB) == 403, 10, "the override on the second gateway")
    own_redis.command("SAVE")  # so that the restarted server holds it again

    timeout = 5.0
    results: list[tuple[str, int | str, float]] = []
    stop = threading.Event()

    def load(gw, ip: str) -> None:  # type: ignore[no-untyped-def]
        with httpx.Client(timeout=timeout) as c:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    code: int | str = c.get(gw.url + "/v1/models", headers={"X-Forwarded-For": ip}).status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                results.append((ip, code, time.monotonic() - started))

    threads = [threading.Thread(target=load, args=(gw, ip)) for gw in (a, b) for ip in (GB, SE)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) > 40, 30, "load before the kill")
        own_redis.kill()
        before = len(results)
        wait_for(
            lambda: "regiongate_redis_up 0.0" in a.metrics() and "regiongate_redis_up 0.0" in b.metrics(),
            15,
            "both gateways to notice Redis is gone",
        )
        wait_for(lambda: len(results) > before + 80, 30, "load while Redis is down")
        state = readyz(a)["overrides"]
        assert state["up"] is False and state["error"]
        assert o["id"] in list_ids(a)  # the last synced copy
        # Added while Redis is down: refused with 503, nothing half-written.
        r = httpx.post(
            a.admin + "/admin/overrides",
            json={"action": "deny", "country": "SE", "reason": "x"},
            headers=AUTH,
            timeout=10,
        )
        assert r.status_code == 503
        own_redis.start()
        wait_for(
            lambda: readyz(a)["overrides"]["up"] is True and readyz(b)["overrides"]["up"] is True,
            30,
            "both gateways to find Redis again",
        )
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    bad = [r for r in results if r[1] != {GB: 403, SE: 200}[r[0]]]
    assert not bad, bad[:5]
    assert max(r[2] for r in results) < timeout  # none waited for its client timeout
    # After the restart: overrides resume, both ways.
    assert status_of(a, GB) == status_of(b, GB) == 403
    o2 = add(b, {"action": "deny", "country": "SE", "reason": "after the restart"})
    wait_for(lambda: status_of(a, SE) == 403, 10, "a new override to reach the other gateway after the restart")
    remove(a, o2["id"])
    wait_for(lambda: status_of(b, SE) == 200, 10, "the removal to reach the other gateway")
    # The first calls to fail are counted by operation (sync, or audit writes of the refusals); once the
    # circuit is open, calls fail without touching the network and are not counted again.
    assert "regiongate_redis_errors_total{op=" in a.metrics()


def test_wrong_password_warns_and_serves_by_the_policy(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", "--requirepass", "right-horse-battery").start()
    try:
        gw = shared(gateway, stub, server.url, prefix(), env={"REGIONGATE_REDIS_PASSWORD": "wrong-password-123"})
        err = gw.stderr()
        assert "warning: Redis redis://127.0.0.1" in err and "did not answer at startup" in err
        assert "authentication failed" in err and "REGIONGATE_REDIS_PASSWORD" in err
        assert "wrong-password-123" not in err
        state = readyz(gw)
        assert state["overrides"]["up"] is False
        assert "wrong-password-123" not in json.dumps(state)
        assert status_of(gw, GB) == 200 and status_of(gw, CN) == 403
        r = httpx.post(
            gw.admin + "/admin/overrides",
            json={"action": "deny", "country": "GB", "reason": "x"},
            headers=AUTH,
            timeout=10,
        )
        assert r.status_code == 503 and "unavailable" in r.json()["detail"]

        good = shared(gateway, stub, server.url, prefix(), env={"REGIONGATE_REDIS_PASSWORD": "right-horse-battery"})
        assert "did not answer" not in good.stderr()
        add(good, {"action": "deny", "country": "GB", "reason": "with the right password"})
        assert status_of(good, GB) == 403
        assert "right-horse-battery" not in json.dumps(readyz(good)) + good.stderr() + good.metrics()
    finally:
        server.stop()


def test_unreachable_redis_warns_and_serves(gateway: GatewayFactory, stub: Stub) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    gw = shared(gateway, stub, url, prefix())
    assert f"warning: Redis {url} did not answer at startup" in gw.stderr()
    assert status_of(gw, GB) == 200 and status_of(gw, CN) == 403
    assert readyz(gw)["overrides"]["up"] is False


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://:hunter2secret@127.0.0.1:6379/0", "REGIONGATE_REDIS_PASSWORD"),
        ("redis://user:hunter2secret@127.0.0.1:6379/0", "REGIONGATE_REDIS_PASSWORD"),
        ("http://127.0.0.1:6379", "scheme must be one of"),
        ("redis+sentinel://127.0.0.1:26379", "name the service"),
        ("redis://a:1,b:2/0", "redis+sentinel:// or redis+cluster://"),
    ],
)
@pytest.mark.e2e
def test_bad_redis_urls_stop_startup_with_a_clear_error(url: str, problem: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", "0", "--admin-port", "0", "--redis", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert problem in out.stderr and "Traceback" not in out.stderr
    assert "hunter2secret" not in out.stderr


def test_override_cli_through_redis_and_through_the_admin_api(
    gateway: GatewayFactory, stub: Stub, redis_server: RedisServer
) -> None:
    pfx = prefix()
    gw = shared(gateway, stub, redis_server.url, pfx)
    redis = ["--redis", redis_server.url, "--redis-prefix", pfx]
    out = cli("add", "deny", "--country", "gb", "--reason", "from the CLI", "--by", "ops", "--id", "cli-1", *redis)
    assert out.returncode == 0, out.stderr
    assert "added override cli-1: deny country GB (rule override:cli-1)" in out.stdout
    wait_for(lambda: status_of(gw, GB) == 403, 10, "the gateway to apply an override written straight to Redis")

    admin = ["--admin-url", gw.admin]
    token = {"REGIONGATE_ADMIN_TOKEN": AUTH["Authorization"].split()[1]}
    out = cli(
        "add",
        "deny",
        "--api-key-env",
        "LEAKED",
        "--reason",
        "leaked key",
        *admin,
        env={**token, "LEAKED": "sk-cli-leaked-key"},
    )
    assert out.returncode == 0, out.stderr
    assert "sk-cli-leaked-key" not in out.stdout + out.stderr
    assert status_of(gw, SE, token="sk-cli-leaked-key") == 403

    listed = cli("list", "--json", *admin, env=token)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {r["id"] for r in rows} >= {"cli-1"} and {r["kind"] for r in rows} == {"country", "api_key"}
    table = cli("list", *redis).stdout
    assert "cli-1" in table and "from the CLI" in table and "hmac-sha256:" in table

    assert cli("remove", "cli-1", *admin, env=token).returncode == 0
    assert status_of(gw, GB) == 200
    missing = cli("remove", "cli-1", *redis)
    assert missing.returncode == 1 and "no override cli-1" in missing.stderr


def test_override_cli_errors_are_one_line(gateway: GatewayFactory, stub: Stub) -> None:
    out = cli("list")
    assert out.returncode == 1 and "give --admin-url" in out.stderr
    out = cli("list", "--admin-url", f"http://127.0.0.1:{free_port()}", env={"REGIONGATE_ADMIN_TOKEN": "t"})
    assert out.returncode == 1 and "cannot reach the admin API" in out.stderr
    out = cli("list", "--redis", f"redis://127.0.0.1:{free_port()}/0")
    assert out.returncode == 1 and "Redis redis://127.0.0.1" in out.stderr and "Traceback" not in out.stderr
    gw = overrides_gateway(gateway, stub)
    token = {"REGIONGATE_ADMIN_TOKEN": AUTH["Authorization"].split()[1]}
    out = cli("add", "deny", "--cidr", "10.0.0.1/8", "--reason", "x", "--admin-url", gw.admin, env=token)
    assert out.returncode == 1 and "422" in out.stderr and "host bits" in out.stderr


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[list[RedisServer]]:
    with cluster(tmp_path) as nodes:
        yield nodes


def test_two_gateways_agree_through_a_redis_cluster(
    gateway: GatewayFactory, stub: Stub, redis_cluster: list[RedisServer]
) -> None:
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in redis_cluster[:2])
    pfx = prefix()
    a, b = shared(gateway, stub, url, pfx), shared(gateway, stub, url, pfx)
    assert "did not answer" not in a.stderr()
    o = add(a, {"action": "deny", "country": "GB", "reason": "through the cluster", "ttl": 30})
    wait_for(lambda: status_of(b, GB) == 403, 10, "the second gateway to apply the override")
    assert readyz(b)["overrides"]["mode"] == "cluster"
    remove(b, o["id"])
    wait_for(lambda: status_of(a, GB) == 200, 10, "the first gateway to lift it")


def test_shared_rate_limit_through_a_redis_cluster(
    gateway: GatewayFactory, stub: Stub, redis_cluster: list[RedisServer], tmp_path: Path
) -> None:
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in redis_cluster)
    pfx = prefix()
    policy = limited_policy(4, by="ip")
    a = limited_gateway(gateway, stub, tmp_path, url, pfx, policy)
    b = limited_gateway(gateway, stub, tmp_path, url, pfx, policy)
    for ip in (GB, SE, "81.2.69.160"):  # keys in different slots, each its own budget
        codes = [status_of(gw, ip) for _ in range(3) for gw in (a, b)]
        assert codes.count(200) == 4 and codes.count(429) == 2, (ip, codes)


def limited_gateway(gateway: GatewayFactory, stub: Stub, tmp_path: Path, url: str, pfx: str, policy: str):  # type: ignore[no-untyped-def]
    path = tmp_path / f"limited-{pfx.strip(':')}.yaml"
    path.write_text(policy)
    # These tests count 200s and 429s exactly, so a check must not fall back to `on_error` because
    # Redis answered late: the default 50 ms per call is exceeded on a loaded 2-core machine (a
    # three-node cluster and two gateways beside the rest of the suite), and a late answer then
    # lets a request through that the budget refused. Timeouts have tests of their own.
    return overrides_gateway(
        gateway, stub, "--redis", url, "--redis-prefix", pfx, "--redis-timeout", "2", "--policy", str(path)
    )


def test_two_gateways_enforce_one_shared_rate_limit(
    gateway: GatewayFactory, stub: Stub, redis_server: RedisServer, tmp_path: Path
) -> None:
    pfx = prefix()
    policy = limited_policy(5, by="country")
    a = limited_gateway(gateway, stub, tmp_path, redis_server.url, pfx, policy)
    b = limited_gateway(gateway, stub, tmp_path, redis_server.url, pfx, policy)
    codes = [status_of(gw, ip) for _ in range(4) for gw in (a, b) for ip in (GB, "81.2.69.160")]
    assert codes.count(200) == 5 and codes.count(429) == len(codes) - 5  # one budget for GB across both
    assert status_of(a, SE) == 200  # another country, its own budget
    # A script cache flushed (a restart, a failover) is loaded again: EVALSHA, then NOSCRIPT, then the script.
    redis_server.command("SCRIPT", "FLUSH")
    assert status_of(b, SE) == 200
    assert status_of(b, GB) == 429


def test_requests_arriving_together_share_one_budget(
    gateway: GatewayFactory, stub: Stub, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Checks asked for at once go to Redis in batches; the shared budget still holds to the request."""
    pfx = prefix()
    policy = limited_policy(10, by="country")
    gateways = [limited_gateway(gateway, stub, tmp_path, redis_server.url, pfx, policy) for _ in range(2)]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            replies = await asyncio.gather(*(
                client.get(gw.url + "/v1/models", headers={"X-Forwarded-For": ip})
                for _ in range(15) for gw in gateways for ip in (GB, "81.2.69.160")
            ))  # fmt: skip
        return [r.status_code for r in replies]

    codes = asyncio.run(burst())
    assert codes.count(200) == 10 and codes.count(429) == len(codes) - 10


@pytest.mark.parametrize(("on_error", "expected"), [("open", 200), ("closed", 503)])
def test_rate_limit_with_redis_down_follows_on_error(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, on_error: str, expected: int
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    gw = limited_gateway(gateway, stub, tmp_path, url, prefix(), limited_policy(1, on_error=on_error))
    codes = [status_of(gw, GB, timeout=5) for _ in range(5)]  # a request that hung would raise
    assert codes == [expected] * 5
    if expected == 503:
        r = httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": GB})
        assert r.json()["error"]["code"] == "rate_limiter_unavailable"
    assert status_of(gw, CN) == 403  # the policy still decides


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("REGIONGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "audit", *args], capture_output=True, text=True, timeout=60, env=base
    )


def test_refusals_reach_the_audit_stream(gateway: GatewayFactory, stub: Stub, redis_server: RedisServer) -> None:
    pfx = prefix()
    gw = shared(gateway, stub, redis_server.url, pfx, "--log-address", "hashed", "--log-key", "k1")
    redis = ["--redis", redis_server.url, "--redis-prefix", pfx]
    assert status_of(gw, CN) == 403 and status_of(gw, GB) == 200 and status_of(gw, CN) == 403

    def tail() -> list[dict[str, object]]:
        out = audit_cli("tail", *redis)
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]

    wait_for(lambda: len(tail()) == 2, 10, "two refusals in the stream")
    rows = tail()
    assert {r["decision"] for r in rows} == {"deny"} and {r["country"] for r in rows} == {"CN"}
    first = rows[0]
    assert first["rule"] == "defaults.action" and first["path"] == "/v1/models" and len(str(first["policy"])) == 64
    assert first["client"] != CN and first["client"] == rows[1]["client"]  # hashed as the access log hashes it
    assert first["client"] == gw.wait_log(3)[0]["client"]
    csv_out = audit_cli("export", "--since", "1h", "--format", "csv", *redis)
    assert csv_out.returncode == 0, csv_out.stderr
    lines = csv_out.stdout.splitlines()
    assert lines[0].startswith("time,request_id,decision,rule,country") and len(lines) == 3
    assert audit_cli("export", "--since", "1h", *redis).stdout.count("\n") == 2


def test_audit_all_and_follow(gateway: GatewayFactory, stub: Stub, redis_server: RedisServer) -> None:
    pfx = prefix()
    gw = shared(gateway, stub, redis_server.url, pfx, "--audit", "all")
    base = {k: v for k, v in os.environ.items() if not k.startswith("REGIONGATE_")}
    follow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "audit",
            "tail",
            "--follow",
            "-n",
            "0",
            "--redis",
            redis_server.url,
            "--redis-prefix",
            pfx,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=base,
    )
    lines: list[dict[str, object]] = []

    def read() -> None:
        assert follow.stdout is not None
        for line in follow.stdout:
            lines.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # The follower sees what is written after it starts reading: keep allowing requests until it prints one.
        wait_for(lambda: status_of(gw, SE) == 200 and bool(lines), 20, "the follower to print an entry")
        assert lines[0]["decision"] == "allow" and lines[0]["country"] == "SE"
    finally:
        follow.terminate()
        follow.wait(10)


def test_rate_limit_while_redis_is_killed_and_restarted(
    gateway: GatewayFactory, stub: Stub, own_redis: RedisServer, tmp_path: Path
) -> None:
    """on_error: closed under continuous load: every answer is a 200 (counted) or the documented 503, none hangs."""
    policy = limited_policy(1_000_000, on_error="closed")
    gw = limited_gateway(gateway, stub, tmp_path, own_redis.url, prefix(), policy)
    results: list[int | str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=5.0) as c:
            while not stop.is_set():
                try:
                    results.append(c.get(gw.url + "/v1/models", headers={"X-Forwarded-For": GB}).status_code)
                except httpx.HTTPError as e:  # a hang past the timeout lands here, and fails the test
                    results.append(type(e).__name__)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: results.count(200) > 20, 30, "counted requests")
        own_redis.kill()
        wait_for(lambda: results[-5:].count(503) == 5, 30, "requests refused while the limiter is down")
        own_redis.start()
        wait_for(lambda: results[-5:].count(200) == 5, 30, "counted requests after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert set(results) <= {200, 503}, {r for r in results if r not in (200, 503)}


@pytest.fixture
def sentinel(own_redis: RedisServer, tmp_path: Path) -> Iterator[RedisServer]:
    """A Sentinel watching ``own_redis`` as the master of service ``regiongate-test``."""
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"sentinel monitor regiongate-test 127.0.0.1 {own_redis.port} 1\n")
    server = RedisServer(tmp_path / "sentinel")
    # redis-server takes a Sentinel's config file first, so this one is started by hand.
    argv = [server.binary, str(conf), "--sentinel", "--port", str(server.port), "--bind", "127.0.0.1"]
    server.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        wait_for(lambda: "regiongate-test" in server.command("SENTINEL", "MASTERS"), 15, "the sentinel")
        yield server
    finally:
        server.stop()


def test_two_gateways_agree_through_sentinel(
    gateway: GatewayFactory, stub: Stub, own_redis: RedisServer, sentinel: RedisServer
) -> None:
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/regiongate-test"
    pfx = prefix()
    a, b = shared(gateway, stub, url, pfx), shared(gateway, stub, url, pfx)
    assert "did not answer" not in a.stderr()
    add(a, {"action": "deny", "country": "GB", "reason": "through sentinel"})
    wait_for(lambda: status_of(b, GB) == 403, 10, "the second gateway to apply the override")
    assert readyz(b)["overrides"]["mode"] == "sentinel"
    assert own_redis.command("HLEN", f"{pfx}{{overrides}}:data") == "1"  # written to the master Sentinel named


def test_explain_with_redis_shows_the_override(gateway: GatewayFactory, stub: Stub, redis_server: RedisServer) -> None:
    from support.processes import CITY

    pfx = prefix()
    gw = shared(gateway, stub, redis_server.url, pfx)
    o = add(gw, {"action": "deny", "cidr": "2.125.160.0/24", "reason": "abuse ticket 9", "by": "oncall"})
    base = [
        sys.executable,
        "-m",
        "gateway",
        "explain",
        GB,
        "--geoip",
        CITY,
        "--redis",
        redis_server.url,
        "--redis-prefix",
        pfx,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGIONGATE_")}
    report = json.loads(subprocess.run([*base, "--json"], capture_output=True, text=True, env=env).stdout)
    assert report["decision"] == "deny" and report["rule"] == f"override:{o['id']}"
    assert "abuse ticket 9" in report["reason"] and report["override"]["by"] == "oncall"
    text = subprocess.run([*base, "--trace"], capture_output=True, text=True, env=env).stdout
    assert f"override:  {o['id']} by oncall: deny cidr 2.125.160.0/24" in text
    assert "trace (rules in order" in text
    served = httpx.get(gw.admin + "/admin/explain", params={"ip": GB}, headers=AUTH).json()
    assert served["rule"] == report["rule"] and served["override"] == report["override"]


def test_redis_out_of_memory_follows_on_error(
    gateway: GatewayFactory, stub: Stub, own_redis: RedisServer, tmp_path: Path
) -> None:
    """A Redis that refuses writes (OOM) is a failure like any other: on_error closed answers 503, then recovers."""
    gw = limited_gateway(gateway, stub, tmp_path, own_redis.url, prefix(), limited_policy(1_000_000, on_error="closed"))
    assert status_of(gw, GB) == 200
    own_redis.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    own_redis.command("CONFIG", "SET", "maxmemory", "1")
    wait_for(lambda: status_of(gw, SE) == 503, 10, "the limiter to fail on OOM")  # a new key: a write refused
    own_redis.command("CONFIG", "SET", "maxmemory", "0")
    wait_for(lambda: status_of(gw, SE) == 200, 30, "the limiter to recover")
    assert 'regiongate_redis_errors_total{op="ratelimit"}' in gw.metrics()


@pytest.fixture
def failover(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, RedisServer]]:
    with sentinel_failover(tmp_path) as servers:
        yield servers


def promoted(sentinel: RedisServer, replica: RedisServer) -> None:
    wait_for(
        lambda: str(replica.port) in sentinel.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "svc"),
        60,
        "Sentinel to promote the replica",
    )


def test_sentinel_failover_keeps_overrides_working(
    gateway: GatewayFactory, stub: Stub, failover: tuple[RedisServer, RedisServer, RedisServer]
) -> None:
    """The master dies, Sentinel promotes its replica; the gateway follows without a restart."""
    master, replica, sentinel = failover
    pfx = prefix()
    gw = shared(gateway, stub, f"redis+sentinel://127.0.0.1:{sentinel.port}/svc", pfx)
    add(gw, {"action": "deny", "country": "GB", "reason": "before the failover"})
    wait_for(lambda: replica.command("HLEN", f"{pfx}{{overrides}}:data") == "1", 15, "the replica to copy it")
    master.kill()
    promoted(sentinel, replica)
    assert status_of(gw, GB) == 403  # the last copy meanwhile
    wait_for(
        lambda: (
            httpx.post(
                gw.admin + "/admin/overrides",
                headers=AUTH,
                timeout=10,
                json={"action": "deny", "country": "SE", "reason": "after the failover", "id": "after"},
            ).status_code
            == 201
        ),
        30,
        "writes to reach the new master",
    )
    assert status_of(gw, SE) == 403 and status_of(gw, GB) == 403
    assert replica.command("HLEN", f"{pfx}{{overrides}}:data") == "2"


def test_sentinel_failover_keeps_rate_limits_working(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, failover: tuple[RedisServer, RedisServer, RedisServer]
) -> None:
    """The limiter's own connection follows the failover too: the next check asks Sentinel for the new master."""
    master, replica, sentinel = failover
    pfx = prefix()
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/svc"
    gw = limited_gateway(gateway, stub, tmp_path, url, pfx, limited_policy(2, on_error="closed"))
    assert [status_of(gw, GB) for _ in range(3)] == [200, 200, 429]
    wait_for(lambda: replica.command("EXISTS", f"{pfx}rl:{{limited:ip:{GB}}}") == "1", 15, "the replica to copy it")
    master.kill()
    promoted(sentinel, replica)
    wait_for(lambda: status_of(gw, SE) != 503, 30, "the limiter to reach the new master")  # 503: closed meanwhile
    assert status_of(gw, SE) == 200 and status_of(gw, SE) == 429  # its budget of 2, counted by the new master
    assert status_of(gw, GB) == 429  # and what the old master had counted came along


def test_serve_reads_the_redis_url_from_the_variable_every_command_names(
    gateway: GatewayFactory, stub: Stub, redis_server: RedisServer
) -> None:
    """REGIONGATE_REDIS_URL, as in the docs, the container image and the Kubernetes overlay."""
    gw = overrides_gateway(gateway, stub, "--redis-prefix", prefix(), env={"REGIONGATE_REDIS_URL": redis_server.url})
    state = readyz(gw)["overrides"]
    assert state["backend"] == "redis" and state["up"] is True
