"""``regiongate serve --authz-grpc-port``: the real command, a real Redis, a real grpcio client.

One gateway process for every check (end to end, so e2e): a rule's rate limit is kept in Redis
and answered as Envoy would send it on (429, ``retry-after``), the health service answers, the
metrics count ``via="envoy_grpc"``, the access log records each Check, and a port clash is a
clear startup error. One worker: a second one that has not reached Redis yet would decide by
``redis.on_error``, which is the proxy port's behaviour and not what this test is about.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.authz.envoy_grpc import SERVICE
from support.authz import CN, GB
from support.envoyrequests import check_request
from support.processes import CITY, GatewayFactory, free_port, write
from support.redis_server import RedisServer, running

pytestmark = pytest.mark.e2e

POLICY = """\
version: 1
upstreams:
  default: {url: "http://127.0.0.1:9"}
rules:
  - {name: gb, countries: [GB], action: allow, rate_limit: {requests: 3, per: 1h, by: ip}}
defaults: {action: deny, missing: deny}
"""


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running(tmp_path_factory.mktemp("redis")) as server:
        yield server


def test_serve_answers_envoy_over_grpc_with_shared_limits(
    tmp_path: Path, gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    grpc_port = free_port()
    policy = write(tmp_path, "policy.yaml", POLICY)
    gw = gateway(
        "--policy", policy, "--geoip", str(CITY), "--redis", redis_server.url,
        "--authz-grpc-port", str(grpc_port), "--authz-grpc-envoy-edge", "--port", "0",  # the decision service alone
    )  # fmt: skip
    gw.wait_redis()
    assert f"Envoy ext_authz gRPC on 127.0.0.1:{grpc_port}" in gw.stderr()
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=15)
        health = health_pb2_grpc.HealthStub(channel)
        serving = health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status
        assert serving == health_pb2.HealthCheckResponse.SERVING
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        chat = "/v1/chat/completions"
        kinds = [stub.Check(check_request("POST", chat, GB)).WhichOneof("http_response") for _ in range(3)]
        assert kinds == ["ok_response"] * 3
        limited = stub.Check(check_request("POST", "/v1/chat/completions", GB)).denied_response
        headers = {h.header.key: h.header.value for h in limited.headers}
        assert limited.status.code == 429 and int(headers["retry-after"]) > 0
        assert '"rate_limit_exceeded"' in limited.body
        refused = stub.Check(check_request("POST", "/v1/chat/completions", CN)).denied_response
        assert refused.status.code == 403
    lines = gw.wait_log(5)
    assert sorted(line["status"] for line in lines) == [200, 200, 200, 403, 429]
    counted = re.findall(r"regiongate_decisions_total\{([^}]*)\} (\S+)", gw.metrics())
    by_via = {labels: float(n) for labels, n in counted if 'via="envoy_grpc"' in labels}
    assert sum(by_via.values()) == 5 and not [labels for labels, _ in counted if 'via="proxy"' in labels]


def test_a_grpc_port_that_is_the_proxy_port_is_a_clear_startup_error(tmp_path: Path) -> None:
    port = free_port()
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--geoip", str(CITY), "--port", str(port),
         "--admin-port", str(free_port()), "--authz-grpc-port", str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert f"--authz-grpc-port {port} is the --port too" in run.stderr and "Traceback" not in run.stderr
