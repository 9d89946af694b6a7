"""Token budgets with Redis killed mid-run: ``redis.on_error`` decides, no stream stalls, every fallback counted.

Two gateways on one redis-server of their own, one whose policy fails open and one closed. A stream
under way when Redis dies runs to its end (settling is fire and forget); afterwards the open gateway
lets token-limited requests through and counts each fallback, the closed one answers 503 at once.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from support.overrides import wait_for
from support.processes import CITY, GatewayFactory, Stub
from support.redis_server import running

pytestmark = pytest.mark.e2e

GB = {"X-Forwarded-For": "2.125.160.216", "content-type": "application/json"}
POLICY = """version: 1
redis: {{on_error: {on_error}}}
defaults: {{action: allow, unknown: allow, private: allow, invalid: deny, missing: allow}}
rules:
  - name: limited
    models: [limited]
    action: allow
    token_limit: [{{tokens: 1000000, per: 1h, by: [country]}}]
    max_concurrent: {{streams: 10, by: [country]}}
"""
BODY = json.dumps({"model": "limited", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}).encode()
STREAM = json.dumps(
    {"model": "limited", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20, "stream": True}
).encode()


def post(url: str, body: bytes = BODY) -> httpx.Response:
    # The timeout is a hang guard: every answer here comes within --redis-timeout (0.5 s) of asking.
    return httpx.post(url + "/v1/chat/completions", content=body, headers=GB, timeout=10)


def test_redis_killed_mid_run_follows_on_error(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    with running(tmp_path / "redis") as redis:
        gws = {}
        for on_error in ("open", "closed"):
            policy = tmp_path / f"{on_error}.yaml"
            policy.write_text(POLICY.format(on_error=on_error))
            gws[on_error] = gateway(
                "--policy", str(policy), "--geoip", CITY, "--trusted-proxy", "127.0.0.1/32", "--upstream", stub.url,
                "--redis", redis.url, "--redis-prefix", f"kill-{on_error}:", "--redis-timeout", "0.5",
            )  # fmt: skip
            gws[on_error].wait_redis()
        for gw in gws.values():
            assert post(gw.url).status_code == 200

        # A stream under way on each when Redis dies.
        streamed: dict[str, bytes] = {}

        def stream(name: str) -> None:
            headers = {**GB, "x-stub-chunk-delay": "0.05", "x-stub-chunks": "40"}
            with httpx.stream(
                "POST", gws[name].url + "/v1/chat/completions", content=STREAM, headers=headers, timeout=30
            ) as r:
                streamed[name] = r.read()

        threads = [threading.Thread(target=stream, args=(name,)) for name in gws]
        for t in threads:
            t.start()
        before = stub.stats()["requests"]
        wait_for(lambda: stub.stats()["requests"] >= before + 2, 10, "both streams under way upstream")
        redis.kill()
        for t in threads:
            t.join(30)
        for name in gws:
            assert streamed[name].endswith(b"data: [DONE]\n\n"), name  # ran to its end, no stall, no cut

        # Afterwards: open lets through and counts the fallback; closed refuses with a 503 at once.
        assert [post(gws["open"].url).status_code for _ in range(3)] == [200] * 3
        refused = [post(gws["closed"].url) for _ in range(3)]
        assert [r.status_code for r in refused] == [503] * 3
        assert all(r.headers["x-should-retry"] == "true" for r in refused)
        metrics = gws["open"].metrics()
        fallbacks = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("regiongate_budget_fallbacks_total{") and 'rule="limited"' in line
        ]
        assert sum(fallbacks) >= 3, metrics
        lines = gws["closed"].wait_log(6)
        assert [line["status"] for line in lines[-3:]] == [503] * 3
