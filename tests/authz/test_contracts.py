"""The HTTP contracts in this process (fast tier): how each proxy's auth request is read, and what a request
that fits no contract gets."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.authz import CN, GB, inprocess_authz, runtime_for

POLICY = """\
version: 1
rules:
  - {name: gb, countries: [GB], action: allow}
  - {name: cn-limited, countries: [CN], action: allow, rate_limit: {requests: 1, per: 1h}}
"""


@pytest.fixture
def authz(tmp_path: Path) -> Iterator[str]:
    with inprocess_authz(runtime_for(tmp_path, POLICY, authz_port=0, trusted_proxy=("127.0.0.1/32",))) as url:
        yield url


def test_each_contract_reads_the_original_request(authz: str) -> None:
    forward = {"x-forwarded-method": "POST", "x-forwarded-uri": "/v1/chat/completions?x=1", "x-forwarded-for": GB}
    allowed = httpx.get(authz + "/authz/forward/anything", headers=forward)
    assert allowed.status_code == 200 and allowed.content == b""
    assert allowed.headers["x-regiongate-rule"] == "gb"
    assert allowed.headers["x-regiongate-subdivision"] != "" and allowed.headers["x-regiongate-asn"] == ""
    nginx = {"x-original-method": "GET", "x-original-uri": "/v1/models", "x-forwarded-for": GB}
    assert httpx.get(authz + "/authz/nginx", headers=nginx).headers["x-regiongate-decision"] == "allow"
    envoy = httpx.post(authz + "/authz/envoy/v1/models", headers={"x-envoy-external-address": GB})
    assert envoy.status_code == 200


def test_a_rate_limit_through_nginx_is_a_403_carrying_the_429(authz: str) -> None:
    nginx = {"x-original-method": "GET", "x-original-uri": "/v1/models", "x-forwarded-for": CN}
    assert httpx.get(authz + "/authz/nginx", headers=nginx).status_code == 200
    limited = httpx.get(authz + "/authz/nginx", headers=nginx)
    assert limited.status_code == 403 and limited.content == b""
    assert limited.headers["x-regiongate-status"] == "429"
    assert json.loads(limited.headers["x-regiongate-body"])["error"]["code"] == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) > 0


def test_requests_that_fit_no_contract_get_a_clear_error(authz: str) -> None:
    unknown = httpx.get(authz + "/v1/models")
    assert unknown.status_code == 404 and "/authz/forward" in unknown.json()["error"]["message"]
    for path, needs in (("/authz/forward", "X-Forwarded-Method"), ("/authz/nginx", "X-Original-URI")):
        bad = httpx.get(authz + path)
        assert bad.status_code == 400 and needs in bad.json()["error"]["message"]
        assert bad.json()["error"]["code"] == "authz_bad_request"
    bad_path = httpx.get(authz + "/authz/nginx", headers={"x-original-method": "GET", "x-original-uri": "/v1/../x"})
    assert bad_path.status_code == 403 and bad_path.headers["x-regiongate-status"] == "400"
    port = int(authz.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /authz/nginx HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400 ") and b'"invalid_request_error"' in answer
