"""nginx (Debian's) with ``auth_request`` to the decision service, from the shipped deploy/edges/nginx config.

One nginx, one ``regiongate serve --port 0 --authz-port`` (with Redis) and one recording upstream for the
module. The test client stands for a load balancer at 127.0.0.1 in front of nginx (a --trusted-proxy), so
``X-Forwarded-For`` holds "what the client wrote, then the address the balancer saw"; nginx appends its own
peer, Regiongate walks from the right.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from support.authz import EDGE_CLIENTS, Edge, error_code, running_edge, shipped
from support.live import wait_until
from support.processes import run_nginx, stop

pytestmark = pytest.mark.e2e

CN, GB, UA43, GB2 = (EDGE_CLIENTS[k] for k in ("CN", "GB", "UA-43", "GB-2"))


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    with running_edge(tmp_path_factory.mktemp("nginx-edge")) as running:
        yield running


@pytest.fixture(scope="module")
def nginx(edge: Edge, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = shipped(
        "nginx/regiongate-edge.conf",
        {
            "server 127.0.0.1:8181;": f"server 127.0.0.1:{edge.authz_port};",
            "server api.openai.com:443;": f"server 127.0.0.1:{edge.upstream.port};",
            "listen 8080;": "listen 127.0.0.1:@PORT@;",
            "proxy_pass https://$regiongate_backend;": "proxy_pass http://$regiongate_backend;",
            "        proxy_ssl_server_name on;\n": "",
            "        proxy_ssl_name api.openai.com;\n": "",
        },
    )
    with run_nginx(tmp_path_factory.mktemp("nginx"), config) as port:
        yield f"http://127.0.0.1:{port}"


def call(nginx: str, client: str, path: str = "/v1/models", **kw: object) -> httpx.Response:
    headers = {"x-forwarded-for": client, **kw.pop("headers", {})}  # type: ignore[dict-item]
    return httpx.request(str(kw.pop("method", "GET")), nginx + path, headers=headers, timeout=10, **kw)  # type: ignore[arg-type]


def test_callers_by_country_and_subdivision_get_the_proxy_ports_answers(edge: Edge, nginx: str) -> None:
    before = len(edge.received())
    gb = call(nginx, GB, headers={"x-regiongate-country": "CN", "x-regiongate-decision": "deny"})
    assert gb.status_code == 200
    sent = edge.received()[before]
    # The facts come from the decision service only: the client's spoofed ones were replaced.
    assert sent.headers[b"x-regiongate-country"] == b"GB"
    assert sent.headers[b"x-regiongate-decision"] == b"allow"
    assert sent.headers[b"x-regiongate-rule"] == b"gb"
    assert sent.headers[b"x-regiongate-upstream"] == b"default"
    assert sent.headers[b"x-regiongate-policy"].decode() == edge.direct(GB).headers["x-regiongate-policy"]
    assert b"x-regiongate-body" not in sent.headers and b"x-regiongate-status" not in sent.headers

    for client, rule in ((CN, "defaults.action"), (UA43, "crimea")):
        refused = call(nginx, client)
        direct = edge.direct(client)
        assert refused.status_code == direct.status_code == 403
        assert refused.content == direct.content  # byte for byte the proxy port's OpenAI body
        assert error_code(refused) == "unsupported_country_region_territory"
        assert refused.headers["content-type"] == "application/json"
        assert refused.headers["x-regiongate-policy"] == direct.headers["x-regiongate-policy"]
        assert direct.headers["x-regiongate-rule"] == rule
    assert len(edge.received()) == before + 1  # refusals never reach the upstream


def test_a_spoofed_forwarded_for_counts_for_nothing(edge: Edge, nginx: str) -> None:
    before = len(edge.received())
    # The client wrote a GB address; the balancer appended the CN address it really came from.
    refused = call(nginx, f"{GB}, {CN}")
    assert refused.status_code == 403 and error_code(refused) == "unsupported_country_region_territory"
    assert len(edge.received()) == before


def test_path_and_model_rules_and_the_bodiless_contract(edge: Edge, nginx: str) -> None:
    files = call(nginx, GB, "/v1/files")
    assert files.status_code == 403 and files.content == edge.direct(GB, "/v1/files").content
    # auth_request sends no body: the model is unknown, and allow_models refuses it (body.unknown_model: deny).
    chat = call(nginx, GB, "/v1/chat/completions", method="POST", json={"model": "gpt-4o-mini"})
    assert chat.status_code == 403 and error_code(chat) == "model_not_allowed_in_region"


def test_a_rate_limited_caller_gets_429_with_retry_after(edge: Edge, nginx: str) -> None:
    statuses = [call(nginx, GB2).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    limited = call(nginx, GB2)
    assert limited.status_code == 429 and error_code(limited) == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) > 0
    assert limited.headers["x-should-retry"] == "true"


def test_metrics_overrides_reload_and_failing_closed(edge: Edge, nginx: str) -> None:
    metrics = edge.gateway.metrics()
    assert 'country="CN",decision="deny",rule="defaults.action",upstream="",via="nginx"}' in metrics
    assert 'via="proxy"' not in metrics  # --port 0: no proxy port
    log = edge.gateway.log_lines()
    assert {line.get("via") for line in log} == {"nginx", "forward"}

    # A runtime override, through nginx.
    override = edge.add_override({"action": "allow", "country": "CN", "reason": "pilot"})
    wait_until(lambda: call(nginx, CN).status_code == 200, "the override lets CN through nginx")
    edge.remove_override(override)
    wait_until(lambda: call(nginx, CN).status_code == 403, "CN refused again")

    # A hot reload of the policy file: CN allowed by a rule, seen through nginx.
    edge.policy.write_text(
        edge.policy.read_text().replace("rules:\n", "rules:\n  - {name: cn, countries: [CN], action: allow}\n", 1)
    )
    wait_until(lambda: call(nginx, CN).status_code == 200, "the reloaded policy lets CN through nginx")
    assert edge.received()[-1].headers[b"x-regiongate-rule"] == b"cn"

    # The decision service down: nginx fails closed (500), nothing reaches the upstream.
    before = len(edge.received())
    stop(edge.gateway.proc)
    down = call(nginx, GB)
    assert down.status_code == 500
    assert len(edge.received()) == before
