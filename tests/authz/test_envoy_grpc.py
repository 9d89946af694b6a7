"""Envoy's ext_authz gRPC contract, through a real grpcio client and Regiongate's real gRPC server.

The server is Regiongate's own (:class:`gateway.authz.envoy_grpc.GrpcService` over the decision
core, on this test's event loop, as a worker runs it); the client is grpcio's, sending
``CheckRequest``s filled as Envoy's ext_authz filter fills them (``support.envoyrequests``). What is
checked is what Envoy would do with each answer: the status, headers and body it sends a refused
client, the headers it sets on (and removes from) an allowed request, the dynamic metadata.
In-process and on loopback (fast tier); the rate limit over a real Redis is in
``test_envoy_grpc_redis.py``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.authz.envoy_grpc import SERVICE, GrpcService, GrpcSettings
from gateway.live.reload import Live
from gateway.metrics import Metrics
from gateway.runtime import Runtime
from support.authz import CN, GB, judge_for, runtime_for
from support.envoyrequests import check_request
from support.processes import UA_CITY_ADDRESSES

POLICY = """\
version: 1
upstreams:
  default: {url: "http://127.0.0.1:9"}
  eu: {url: "http://127.0.0.1:9"}
rules:
  - {name: no-files, paths: ["/v1/files*"], action: deny}
  - {name: no-o1, countries: [GB], models: ["o1*"], action: deny}
  - {name: crimea, subdivisions: [UA-43], action: deny}
  - {name: ukraine, countries: [UA], action: route, upstream: eu}
  - {name: gb, countries: [GB], action: allow}
defaults: {action: deny, missing: deny}
body: {unknown_model: allow}  # a Check without a body passes no-o1 (with_request_body off)
"""
CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


@dataclass
class Envoy:
    """What plays Envoy: a grpcio channel to the service, and the service's runtime and metrics."""

    stub: Any
    health: Any
    runtime: Runtime
    metrics: Metrics
    service: GrpcService

    async def check(self, request: external_auth_pb2.CheckRequest) -> Any:
        return await self.stub.Check(request)


async def envoy_for(runtime: Runtime, edge: bool) -> AsyncIterator[Envoy]:
    judge, metrics = judge_for(runtime, "envoy_grpc")
    service = GrpcService(judge, GrpcSettings("127.0.0.1", 0, edge))
    port = await service.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        yield Envoy(stub, health_pb2_grpc.HealthStub(channel), runtime, metrics, service)
    await service.stop(0)


@pytest.fixture
async def envoy(tmp_path: Path) -> AsyncIterator[Envoy]:
    async for e in envoy_for(runtime_for(tmp_path, POLICY), edge=True):
        yield e


def set_headers(response: Any) -> dict[str, str]:
    return {h.header.key: h.header.value for h in response.ok_response.headers}


def denied(response: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
    d = response.denied_response
    return d.status.code, {h.header.key: h.header.value for h in d.headers}, json.loads(d.body)


async def test_an_allowed_caller_gets_the_facts_as_headers_and_dynamic_metadata(envoy: Envoy) -> None:
    response = await envoy.check(check_request("POST", CHAT + "?stream=true", GB))
    assert response.status.code == grpc.StatusCode.OK.value[0]
    assert response.WhichOneof("http_response") == "ok_response"
    facts = set_headers(response)
    assert facts["x-regiongate-decision"] == "allow"
    assert facts["x-regiongate-rule"] == "gb"
    assert facts["x-regiongate-country"] == "GB"
    assert facts["x-regiongate-upstream"] == "default"
    assert facts["x-regiongate-policy"] == envoy.runtime.active.header[1].decode()
    # Envoy replaces a header of the same name (a client's own) instead of adding a second one.
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert {h.append_action for h in response.ok_response.headers} == {overwrite}
    removed = set(response.ok_response.headers_to_remove)
    assert "x-regiongate-request-id" in removed and not removed & set(facts)
    metadata = json_format.MessageToDict(response.dynamic_metadata)["regiongate"]
    assert metadata["country"] == "GB" and metadata["rule"] == "gb" and metadata["upstream"] == "default"
    labels = {"decision": "allow", "rule": "gb", "country": "GB", "upstream": "default", "via": "envoy_grpc"}
    envoy.metrics.fold()  # the request path tallies; a scrape folds (gateway.metrics)
    assert envoy.metrics.registry.get_sample_value("regiongate_decisions_total", labels) == 1.0


async def test_a_refused_caller_gets_openais_status_headers_and_body(envoy: Envoy) -> None:
    response = await envoy.check(check_request("POST", CHAT, CN))
    assert response.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    status, headers, body = denied(response)
    assert status == 403
    assert body["error"]["code"] == "unsupported_country_region_territory"
    assert headers["content-type"] == "application/json"
    assert headers["x-regiongate-decision"] == "deny" and headers["x-regiongate-country"] == "CN"
    assert headers["x-request-id"] and headers["x-should-retry"] == "false"
    assert response.denied_response.body.encode() == envoy.runtime.active.policy.block_body


async def test_a_subdivision_is_judged(tmp_path: Path, ua_city_db: str) -> None:
    runtime = runtime_for(tmp_path, POLICY, geoip=(ua_city_db,))
    async for envoy in envoy_for(runtime, edge=True):
        crimea = await envoy.check(check_request("POST", CHAT, UA_CITY_ADDRESSES["UA-43"]))
        status, headers, _ = denied(crimea)
        assert status == 403 and headers["x-regiongate-rule"] == "crimea"
        assert headers["x-regiongate-subdivision"] == "UA-43"
        kyiv = set_headers(await envoy.check(check_request("POST", CHAT, UA_CITY_ADDRESSES["UA-30"])))
        assert kyiv["x-regiongate-upstream"] == "eu" and kyiv["x-regiongate-subdivision"] == "UA-30"


async def test_the_path_is_envoys_raw_path_canonicalised_as_on_the_proxy_port(envoy: Envoy) -> None:
    status, headers, _ = denied(await envoy.check(check_request("GET", "/v1/%66iles/abc?purpose=x", GB)))
    assert status == 403 and headers["x-regiongate-rule"] == "no-files"
    status, _, body = denied(await envoy.check(check_request("GET", "/v1/../../etc/passwd", GB)))
    assert status == 400 and body["error"]["code"] == "invalid_path"


async def test_the_model_is_read_from_the_body_envoy_sends(envoy: Envoy) -> None:
    o1 = json.dumps({"model": "o1-preview", "messages": []}).encode()
    status, headers, _ = denied(await envoy.check(check_request("POST", CHAT, GB, headers=JSON, body=o1)))
    assert status == 403 and headers["x-regiongate-rule"] == "no-o1"
    ok = json.dumps({"model": "gpt-4o", "messages": []}).encode()
    allowed = await envoy.check(check_request("POST", CHAT, GB, headers=JSON, body=ok))
    assert set_headers(allowed)["x-regiongate-rule"] == "gb"
    # Sent as a string (with_request_body without pack_as_bytes): the same model.
    as_text = check_request("POST", CHAT, GB, headers=JSON)
    as_text.attributes.request.http.body = o1.decode()
    assert denied(await envoy.check(as_text))[1]["x-regiongate-rule"] == "no-o1"


async def test_the_client_is_envoys_word_never_the_clients(tmp_path: Path, envoy: Envoy) -> None:
    spoofing = {
        "x-forwarded-for": GB,
        "forwarded": f"for={GB}",
        "x-regiongate-country": "GB",
        "x-regiongate-decision": "allow",
        "x-regiongate-envoy-source": GB,
    }
    # Edge mode: x-envoy-external-address, which Envoy overwrote with the TCP peer (CN).
    status, headers, _ = denied(await envoy.check(check_request("POST", CHAT, CN, headers=spoofing)))
    assert status == 403 and headers["x-regiongate-country"] == "CN"
    # A GB client that sends Regiongate's headers: they are overwritten or removed for the upstream.
    own = {"x-regiongate-subdivision": "X", "x-regiongate-asn": "1", "x-regiongate-request-id": "mine"}
    allowed = await envoy.check(check_request("POST", CHAT, GB, headers=own))
    assert set_headers(allowed)["x-regiongate-subdivision"] == "GB-ENG,GB-WBK"  # overwrites the client's
    assert {"x-regiongate-asn", "x-regiongate-request-id"} <= set(allowed.ok_response.headers_to_remove)
    # Without the edge flag: attributes.source.address; a header named like it is the client's and dropped.
    async for source in envoy_for(runtime_for(tmp_path, POLICY), edge=False):
        request = check_request("POST", CHAT, CN, headers=spoofing, edge=False)
        status, headers, _ = denied(await source.check(request))
        assert status == 403 and headers["x-regiongate-country"] == "CN"


async def test_no_client_address_takes_defaults_missing(envoy: Envoy) -> None:
    request = check_request("POST", CHAT, GB, edge=False)  # edge mode, but Envoy set no external address
    status, headers, _ = denied(await envoy.check(request))
    assert status == 403 and headers["x-regiongate-rule"] == "defaults.missing"


async def test_a_malformed_check_is_a_clear_refusal_never_a_grpc_error(envoy: Envoy) -> None:
    for request in (
        external_auth_pb2.CheckRequest(),
        check_request("", CHAT, GB),
        check_request("GET", "/v1/caf\u00e9", GB),
    ):
        if request.attributes.request.http.method == "":
            request.attributes.request.http.headers.pop(":method")
        response = await envoy.check(request)
        status, _, body = denied(response)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", request


async def test_the_health_service_follows_the_worker(envoy: Envoy) -> None:
    for name in ("", SERVICE):
        answer = await envoy.health.Check(health_pb2.HealthCheckRequest(service=name))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await envoy.health.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    await envoy.service.health.enter_graceful_shutdown()  # what stop() does first, while Checks still run
    answer = await envoy.health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
    assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_reloaded_policy_judges_the_next_check(envoy: Envoy) -> None:
    assert (await envoy.check(check_request("POST", CHAT, GB))).WhichOneof("http_response") == "ok_response"
    changed = POLICY.replace("countries: [GB], action: allow", "countries: [CN], action: allow")
    Path(envoy.runtime.policy_path).write_text(changed)
    (result,) = [r for r in await Live(envoy.runtime, envoy.metrics).reload() if r.role == "policy"]
    assert result.ok and result.changed
    status, headers, _ = denied(await envoy.check(check_request("POST", CHAT, GB)))
    assert status == 403 and headers["x-regiongate-policy"] == envoy.runtime.active.header[1].decode()
    assert set_headers(await envoy.check(check_request("POST", CHAT, CN)))["x-regiongate-decision"] == "allow"
