"""Envoy ext_authz HTTP service mode against the real ``--authz-port`` listener, requests shaped as Envoy sends them.

The listener is the gateway's own (the native data plane's :class:`Listener` with the decision
service's handler, on this test's loop, in-process); the requests are real HTTP over loopback, built
by ``support.envoyrequests.http_check`` exactly as Envoy's HTTP mode builds them with the shipped
``envoy-http.yaml``: ``path_prefix`` + the original path, only the allowed headers, the body, and the
``X-Forwarded-For`` that names Envoy itself (envoyproxy/envoy#21519). What is checked is what Envoy
does with the answer: a 2xx lets the request through with the ``allowed_upstream_headers``
(``x-regiongate-*``); anything else goes to the client with its status, body and
``allowed_client_headers``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.authz.contracts import Contracts
from gateway.dataplane.limits import Limits
from gateway.dataplane.server import Listener
from gateway.live.reload import Live
from gateway.metrics import Metrics
from gateway.runtime import Runtime
from support.authz import CN, GB, runtime_for
from support.envoyrequests import ENVOY_ADDRESS, HttpCheck, http_check
from support.processes import UA_CITY_ADDRESSES

POLICY = """\
version: 1
upstreams:
  default: {url: "http://127.0.0.1:9"}
  eu: {url: "http://127.0.0.1:9"}
rules:
  - {name: envoy-itself, cidrs: ["10.0.0.0/8"], action: allow}
  - {name: no-files, paths: ["/v1/files*"], action: deny}
  - {name: no-o1, countries: [GB], models: ["o1*"], action: deny}
  - {name: crimea, subdivisions: [UA-43], action: deny}
  - {name: ukraine, countries: [UA], action: route, upstream: eu}
  - {name: gb, countries: [GB], action: allow}
defaults: {action: deny, missing: deny}
body: {unknown_model: allow}
"""
CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}
# What the shipped envoy-http.yaml copies: to the upstream on an allow, to the client on a refusal.
UPSTREAM_PREFIX = "x-regiongate-"
CLIENT_HEADERS = ("content-type", "retry-after", "x-request-id")


@dataclass
class Service:
    url: str
    runtime: Runtime
    metrics: Metrics

    async def send(self, check: HttpCheck) -> httpx.Response:
        async with httpx.AsyncClient() as client:
            return await client.request(
                check.method, self.url + check.target, headers=check.headers, content=check.body, timeout=10
            )


async def service_for(runtime: Runtime) -> AsyncIterator[Service]:
    metrics = Metrics(CollectorRegistry())
    assert runtime.authz is not None
    limits = Limits()
    listener = Listener(Contracts(runtime, metrics, limits, runtime.authz).handle, limits, 64, metrics.bad_request)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    await listener.start(sock)
    try:
        yield Service(f"http://127.0.0.1:{sock.getsockname()[1]}", runtime, metrics)
    finally:
        await listener.shutdown()


def runtime(tmp_path: Path, **settings: object) -> Runtime:
    # The Envoy in front is at 10.0.0.5 in the requests' X-Forwarded-For; the TCP peer here is loopback.
    return runtime_for(tmp_path, POLICY, authz_port=0, trusted_proxy=("127.0.0.1/32",), **settings)


@pytest.fixture
async def envoy(tmp_path: Path) -> AsyncIterator[Service]:
    async for s in service_for(runtime(tmp_path)):
        yield s


def upstream_headers(response: httpx.Response) -> dict[str, str]:
    """What Envoy sets on the upstream request (allowed_upstream_headers: prefix x-regiongate-)."""
    assert 200 <= response.status_code < 300
    return {k: v for k, v in response.headers.items() if k.startswith(UPSTREAM_PREFIX)}


def client_answer(response: httpx.Response) -> tuple[int, dict[str, str], dict[str, object]]:
    """What Envoy sends the refused client: the status, the allowed_client_headers, the body."""
    headers = {k: v for k, v in response.headers.items() if k in CLIENT_HEADERS or k.startswith(UPSTREAM_PREFIX)}
    return response.status_code, headers, json.loads(response.content)


def refusals(service: Service, rule: str, country: str) -> float:
    """How many checks ``rule`` refused for callers in ``country``, by the service's metrics.

    A refusal carries exactly the proxy port's headers (no facts: those are for the upstream, on an
    allow), so which rule refused is read where the proxy port's refusals are counted too.
    """
    service.metrics.fold()  # the request path tallies; a scrape folds (gateway.metrics)
    labels = {"decision": "deny", "rule": rule, "country": country, "upstream": "", "via": "envoy_http"}
    return service.metrics.registry.get_sample_value("regiongate_decisions_total", labels) or 0.0


def no_facts(headers: dict[str, str]) -> bool:
    return not {"x-regiongate-country", "x-regiongate-rule", "x-regiongate-decision"} & headers.keys()


async def test_callers_by_country_and_subdivision(tmp_path: Path, envoy: Service, ua_city_db: str) -> None:
    gb = upstream_headers(await envoy.send(http_check("POST", CHAT + "?stream=true", GB)))
    assert gb["x-regiongate-decision"] == "allow" and gb["x-regiongate-rule"] == "gb"
    assert gb["x-regiongate-country"] == "GB" and gb["x-regiongate-upstream"] == "default"
    status, headers, body = client_answer(await envoy.send(http_check("POST", CHAT, CN)))
    assert status == 403 and headers["content-type"] == "application/json"
    assert body == json.loads(envoy.runtime.active.policy.block_body)
    assert no_facts(headers) and refusals(envoy, "defaults.action", "CN") == 1.0
    labels = {"decision": "allow", "rule": "gb", "country": "GB", "upstream": "default", "via": "envoy_http"}
    envoy.metrics.fold()  # the request path tallies; a scrape folds (gateway.metrics)
    assert envoy.metrics.registry.get_sample_value("regiongate_decisions_total", labels) == 1.0
    (tmp_path / "ua").mkdir()
    async for ua in service_for(runtime(tmp_path / "ua", geoip=(ua_city_db,))):
        status, headers, _ = client_answer(await ua.send(http_check("POST", CHAT, UA_CITY_ADDRESSES["UA-43"])))
        assert status == 403 and no_facts(headers) and refusals(ua, "crimea", "UA") == 1.0
        kyiv = upstream_headers(await ua.send(http_check("POST", CHAT, UA_CITY_ADDRESSES["UA-30"])))
        assert kyiv["x-regiongate-upstream"] == "eu"


async def test_envoys_own_forwarded_for_is_never_the_client(envoy: Service) -> None:
    """envoyproxy/envoy#21519: the check's X-Forwarded-For is Envoy's own address (allowed by a rule here)."""
    check = http_check("POST", CHAT, CN, headers={"x-forwarded-for": GB})  # the client's own, never sent on
    assert check.headers["x-forwarded-for"] == ENVOY_ADDRESS
    status, headers, _ = client_answer(await envoy.send(check))
    assert status == 403 and no_facts(headers) and refusals(envoy, "defaults.action", "CN") == 1.0
    # Spoofed facts are not among the allowed_headers: Envoy never sends them; the answer sets its own.
    spoofed = http_check("POST", CHAT, GB, headers={"x-regiongate-country": "CN"})
    assert "x-regiongate-country" not in spoofed.headers
    assert upstream_headers(await envoy.send(spoofed))["x-regiongate-country"] == "GB"


async def test_no_external_address_takes_defaults_missing(envoy: Service) -> None:
    check = http_check("POST", CHAT, GB)
    del check.headers["x-envoy-external-address"]  # an internal request: Envoy set none
    status, headers, _ = client_answer(await envoy.send(check))
    assert status == 403 and no_facts(headers) and refusals(envoy, "defaults.missing", "missing") == 1.0


async def test_the_path_after_the_prefix_is_judged_as_on_the_proxy_port(envoy: Service) -> None:
    status, headers, _ = client_answer(await envoy.send(http_check("GET", "/v1/%66iles/x?purpose=a", GB)))
    assert status == 403 and no_facts(headers) and refusals(envoy, "no-files", "GB") == 1.0
    status, _, body = client_answer(await envoy.send(http_check("GET", "/v1/%2e%2e/%2e%2e/etc/passwd", GB)))
    assert status == 400 and body["error"]["code"] == "invalid_path"  # type: ignore[index]


async def test_the_model_is_read_from_the_body_envoy_sends(envoy: Service) -> None:
    o1 = json.dumps({"model": "o1-preview", "messages": []}).encode()
    status, headers, _ = client_answer(await envoy.send(http_check("POST", CHAT, GB, headers=JSON, body=o1)))
    assert status == 403 and no_facts(headers) and refusals(envoy, "no-o1", "GB") == 1.0
    ok = json.dumps({"model": "gpt-4o", "messages": []}).encode()
    assert upstream_headers(await envoy.send(http_check("POST", CHAT, GB, headers=JSON, body=ok)))


async def test_a_reloaded_policy_judges_the_next_check(envoy: Service) -> None:
    assert upstream_headers(await envoy.send(http_check("POST", CHAT, GB)))
    refusing = POLICY.replace("countries: [GB], action: allow", "countries: [GB], action: deny")
    Path(envoy.runtime.policy_path).write_text(refusing)
    assert any(r.changed for r in await Live(envoy.runtime, envoy.metrics).reload())
    status, _, _ = client_answer(await envoy.send(http_check("POST", CHAT, GB)))
    assert status == 403
