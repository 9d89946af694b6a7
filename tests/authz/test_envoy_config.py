"""The shipped Envoy and Envoy Gateway configurations, checked against Envoy's own schemas.

No Envoy binary can be installed here. Each bootstrap YAML in ``deploy/edges/envoy/`` is parsed into
``envoy.config.bootstrap.v3.Bootstrap`` as Envoy parses it (unknown fields and unresolvable
``typed_config`` types fail), its protoc-gen-validate rules are checked (``support.envoyconfig``),
and what it must say for Regiongate's contract is asserted: fail-closed written out, the body sent,
the route chosen again after the decision, the client address Envoy vouches for. The Envoy Gateway
``SecurityPolicy`` is validated against Envoy Gateway's own CRD schema (``tests/fixtures/envoy-gateway-crds``),
unknown fields rejected, and its Service with kubernetes-validate.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from envoy.config.core.v3 import grpc_service_pb2
from google.protobuf import json_format
from kubernetes_validate.utils import latest_version

from support.crdschema import strict
from support.envoyconfig import bootstrap, unpack, violations
from support.processes import ROOT

ENVOY = ROOT / "deploy" / "edges" / "envoy"
GATEWAY = ROOT / "deploy" / "edges" / "envoy-gateway"
CRD = ROOT / "tests" / "fixtures" / "envoy-gateway-crds" / "gateway.envoyproxy.io_securitypolicies.yaml"
MODES = ("grpc", "http")
# The headers the decision service answers with; Envoy must copy these (and only from its answer).
FACTS = "x-regiongate-"


def ext_authz(mode: str) -> tuple[Any, Any, dict[str, Any]]:
    """The HttpConnectionManager, the ext_authz filter (both as Envoy's messages) and the filter's YAML."""
    boot = bootstrap(ENVOY / f"envoy-{mode}.yaml")
    (listener,) = boot.static_resources.listeners
    (hcm_any,) = [f.typed_config for f in listener.filter_chains[0].filters]
    hcm = unpack(hcm_any)
    (authz_filter,) = [f for f in hcm.http_filters if f.name == "envoy.filters.http.ext_authz"]
    raw = yaml.safe_load((ENVOY / f"envoy-{mode}.yaml").read_text())
    (raw_hcm,) = raw["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
    (raw_authz,) = [f for f in raw_hcm["typed_config"]["http_filters"] if f["name"] == authz_filter.name]
    return hcm, unpack(authz_filter.typed_config), raw_authz["typed_config"]


@pytest.mark.parametrize("mode", MODES)
def test_the_bootstrap_parses_into_envoys_protos_and_keeps_their_validation_rules(mode: str) -> None:
    boot = bootstrap(ENVOY / f"envoy-{mode}.yaml")
    assert violations(boot) == []
    hcm, _, _ = ext_authz(mode)
    names = [f.name for f in hcm.http_filters]
    assert names.index("envoy.filters.http.ext_authz") < names.index("envoy.filters.http.router") == len(names) - 1


def test_the_checks_fail_on_what_envoy_would_refuse() -> None:
    raw = yaml.safe_load((ENVOY / "envoy-grpc.yaml").read_text())
    typo = copy.deepcopy(raw)
    typo["static_resources"]["clusters"][0]["conect_timeout"] = "1s"
    with pytest.raises(json_format.ParseError, match="conect_timeout"):
        json_format.ParseDict(typo, type(bootstrap(ENVOY / "envoy-grpc.yaml"))())
    inner = copy.deepcopy(raw)  # an unknown field inside a typed_config Any fails as well
    hcm = inner["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][0]["typed_config"]["failure_mode_alow"] = False
    with pytest.raises(json_format.ParseError, match="failure_mode_alow"):
        json_format.ParseDict(inner, type(bootstrap(ENVOY / "envoy-grpc.yaml"))())
    unknown = copy.deepcopy(raw)
    hcm = unknown["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][0]["typed_config"]["@type"] = "type.googleapis.com/envoy.extensions.filters.http.nope.v3.Nope"
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict(unknown, type(bootstrap(ENVOY / "envoy-grpc.yaml"))())
    empty = grpc_service_pb2.GrpcService(envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=""))
    assert violations(empty) == ["envoy_grpc.cluster_name: at least 1 character(s)"]
    assert violations(grpc_service_pb2.GrpcService()) == ["target_specifier: one of its fields is required"]


@pytest.mark.parametrize("mode", MODES)
def test_the_contract_is_written_out(mode: str) -> None:
    hcm, authz, raw = ext_authz(mode)
    # Fail closed, said in the file (false is also Envoy's default: the file must not leave it unsaid).
    assert raw["failure_mode_allow"] is False and authz.failure_mode_allow is False
    assert authz.status_on_error.code == 503
    assert authz.with_request_body.max_request_bytes >= 1 << 20  # the policy schema's default body.max_bytes
    assert not authz.with_request_body.allow_partial_message  # a cut body would be judged as another model
    assert authz.clear_route_cache  # the route is chosen again with x-regiongate-upstream
    assert authz.transport_api_version == 2  # V3
    # Envoy is the edge: the TCP peer is the client, and x-envoy-external-address says so.
    assert hcm.use_remote_address.value is True and hcm.xff_num_trusted_hops == 0
    routes = hcm.route_config.virtual_hosts[0].routes
    on_upstream = [r for r in routes if any(h.name == "x-regiongate-upstream" for h in r.match.headers)]
    assert on_upstream and routes[-1].match.headers == [] and routes[-1].match.prefix == "/"


def test_grpc_mode_speaks_http2_to_regiongate_and_checks_its_health() -> None:
    boot = bootstrap(ENVOY / "envoy-grpc.yaml")
    _, authz, _ = ext_authz("grpc")
    name = authz.grpc_service.envoy_grpc.cluster_name
    (cluster,) = [c for c in boot.static_resources.clusters if c.name == name]
    options = unpack(cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"])
    assert options.explicit_http_config.HasField("http2_protocol_options")
    assert cluster.health_checks[0].HasField("grpc_health_check")  # grpc.health.v1, which Regiongate serves
    assert authz.with_request_body.pack_as_bytes  # raw_body: the bytes, not a UTF-8 string


def test_http_mode_sends_the_client_header_and_copies_back_only_regiongates_facts() -> None:
    _, authz, _ = ext_authz("http")
    service = authz.http_service
    assert service.path_prefix == "/authz/envoy"
    sent = {p.exact for p in service.authorization_request.allowed_headers.patterns}
    assert {"x-envoy-external-address", "content-type"} <= sent
    response = service.authorization_response
    assert [p.prefix for p in response.allowed_upstream_headers.patterns] == [FACTS]
    client = {p.exact or p.prefix for p in response.allowed_client_headers.patterns}
    assert {"content-type", "retry-after", FACTS} <= client


def securitypolicy() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((GATEWAY / "securitypolicy.yaml").read_text()) if d]


@functools.cache  # the CRD is half a megabyte of YAML
def crd_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["served"]]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def test_the_securitypolicy_validates_against_envoy_gateways_crd() -> None:
    policy, service = securitypolicy()
    assert (policy["apiVersion"], policy["kind"]) == ("gateway.envoyproxy.io/v1alpha1", "SecurityPolicy")
    crd_validator().validate(policy)
    kubernetes_validate.validate(service, latest_version(), strict=True)
    ext = policy["spec"]["extAuth"]
    assert ext["failOpen"] is False and ext["recomputeRoute"] is True
    assert ext["bodyToExtAuth"]["maxRequestBytes"] >= 1 << 20
    (ref,) = ext["grpc"]["backendRefs"]
    assert (ref["name"], ref["port"]) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])


def test_the_crd_check_rejects_unknown_and_misspelt_fields() -> None:
    policy, _ = securitypolicy()
    bad = copy.deepcopy(policy)
    bad["spec"]["extAuth"]["failopen"] = False
    with pytest.raises(jsonschema.ValidationError, match="failopen"):
        crd_validator().validate(bad)
    bad = copy.deepcopy(policy)
    bad["spec"]["extAuth"]["bodyToExtAuth"]["maxRequestBytes"] = 0
    with pytest.raises(jsonschema.ValidationError):
        crd_validator().validate(bad)


def test_the_fixture_carries_its_license() -> None:
    assert "Apache License" in (CRD.parent / "LICENSE").read_text()
    assert Path(CRD.parent / "README.md").read_text().count("envoyproxy/gateway") >= 1
