"""Routing by region and by model, end to end: real gateway, one recording upstream per role, the openai SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from support.processes import CITY, Gateway, GatewayFactory, RawUpstream, write

TRUST = ["--trusted-proxy", "127.0.0.1/32"]
GB, SE, US, CN = "2.125.160.216", "89.160.20.112", "216.160.83.56", "175.16.199.1"
CHAT = "/v1/chat/completions"

POLICY = """\
version: 1
upstreams:
  default: {{url: "{default}"}}
  eu: {{url: "{eu}"}}
  qwen: {{url: "{qwen}", models: {{gpt-4o: qwen-plus, gpt-4o-mini: qwen-turbo}}}}
body: {{max_bytes: 4096{unknown}}}
defaults: {{action: deny, private: deny}}
rules:
  - {{name: no-reasoning-here, countries: [US], models: ["o1*"], action: deny}}
  - {{name: eu-residency, countries: [SE], action: route, upstream: eu}}
  - {{name: migrate, countries: [CN], action: route, upstream: qwen, allow_models: [gpt-4o, gpt-4o-mini, "qwen-*"]}}
  - {{name: supported, countries: [GB, US], action: allow}}
"""


@pytest.fixture
def ups() -> Iterator[dict[str, RawUpstream]]:
    made = {name: RawUpstream() for name in ("default", "eu", "qwen")}
    yield made
    for up in made.values():
        up.close()


def start(gateway: GatewayFactory, tmp_path: Path, ups: dict[str, RawUpstream], unknown: str = "") -> Gateway:
    text = POLICY.format(default=ups["default"].url, eu=ups["eu"].url, qwen=ups["qwen"].url, unknown=unknown)
    return gateway("--policy", write(tmp_path, "policy.yaml", text), "--geoip", CITY, *TRUST)


def post(gw: Gateway, who: str, body: bytes, content_type: str = "application/json", **kw: object) -> httpx.Response:
    headers = {"X-Forwarded-For": who, "content-type": content_type}
    return httpx.post(gw.url + CHAT, content=body, headers=headers, timeout=10, **kw)  # type: ignore[arg-type]


def got(up: RawUpstream) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    return [(sent.url, sent.headers, sent.body) for sent in up.requests()]


def test_each_region_reaches_its_own_upstream(
    gateway: GatewayFactory, tmp_path: Path, ups: dict[str, RawUpstream]
) -> None:
    gw = start(gateway, tmp_path, ups)
    for who in (GB, SE, CN):
        assert post(gw, who, b'{"model":"gpt-4o","messages":[]}').status_code == 200
    assert [json.loads(b)["model"] for _, _, b in got(ups["default"])] == ["gpt-4o"]
    assert [json.loads(b)["model"] for _, _, b in got(ups["eu"])] == ["gpt-4o"]
    assert [json.loads(b)["model"] for _, _, b in got(ups["qwen"])] == ["qwen-plus"]
    lines = gw.wait_log(3)
    assert [(e["decision"], e["rule"], e["upstream"]) for e in lines] == [
        ("allow", "supported", "default"),
        ("route", "eu-residency", "eu"),
        ("route", "migrate", "qwen"),
    ]
    assert lines[2]["model"] == "gpt-4o"
    metrics = gw.metrics()
    assert (
        'regiongate_decisions_total{country="SE",decision="route",rule="eu-residency",upstream="eu",via="proxy"} 1.0'
        in metrics
    )
    assert (
        'regiongate_decisions_total{country="CN",decision="route",rule="migrate",upstream="qwen",via="proxy"} 1.0'
        in metrics
    )


BODY = (
    b'{ "messages":[{"role":"user","content":"h\\u00e9 \\"model\\": \\"gpt-4o-mini\\""}],\n'
    b'  "model" : "gpt-4o-mini" ,"x-unknown":{"model":"keep-me"},"n":1.50, "stream":false}\n'
)


def test_a_model_rename_changes_only_the_model_bytes(
    gateway: GatewayFactory, tmp_path: Path, ups: dict[str, RawUpstream]
) -> None:
    gw = start(gateway, tmp_path, ups)
    expected = BODY.replace(b'"model" : "gpt-4o-mini"', b'"model" : "qwen-turbo"')
    assert expected != BODY
    assert post(gw, CN, BODY).status_code == 200

    def chunks() -> Iterator[bytes]:
        yield BODY[:20]
        yield BODY[20:]

    # A chunked upload is held whole and goes up with a content-length.
    r = httpx.post(gw.url + CHAT, content=chunks(), headers={"X-Forwarded-For": CN, "content-type": "application/json"})
    assert r.status_code == 200
    received = got(ups["qwen"])
    assert len(received) == 2
    for _url, headers, body in received:
        assert body == expected
        assert headers[b"content-length"] == str(len(expected)).encode()
        assert b"transfer-encoding" not in headers


def test_allow_models_refuses_other_models_through_the_sdk(
    gateway: GatewayFactory, tmp_path: Path, ups: dict[str, RawUpstream]
) -> None:
    gw = start(gateway, tmp_path, ups)
    client = openai.OpenAI(
        base_url=gw.url + "/v1", api_key="sk-client", default_headers={"X-Forwarded-For": CN}, max_retries=3
    )
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.chat.completions.create(model="o1-preview", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 403
    assert e.value.code == "model_not_allowed_in_region"
    assert "o1-preview" in str(e.value.message)
    assert got(ups["qwen"]) == []  # and the SDK did not retry: one refusal in the log
    lines = gw.wait_log(1)
    assert [(e["decision"], e["rule"], e["status"], e["model"]) for e in lines] == [
        ("deny", "migrate", 403, "o1-preview")
    ]
    assert 'regiongate_model_refusals_total{rule="migrate"} 1.0' in gw.metrics()
    # Qwen's own names are allowed as they are, and are not renamed.
    client.chat.completions.create(model="qwen-max", messages=[{"role": "user", "content": "hi"}])
    assert json.loads(got(ups["qwen"])[0][2])["model"] == "qwen-max"


def test_a_models_rule_decides_by_the_model(
    gateway: GatewayFactory, tmp_path: Path, ups: dict[str, RawUpstream]
) -> None:
    gw = start(gateway, tmp_path, ups)
    r = post(gw, US, b'{"model":"o1-preview"}')
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "unsupported_country_region_territory"  # the policy's own block
    assert post(gw, US, b'{"model":"gpt-4o"}').status_code == 200
    assert [b for _, _, b in got(ups["default"])] == [b'{"model":"gpt-4o"}']


def test_a_request_that_needs_no_model_is_not_read(
    gateway: GatewayFactory, tmp_path: Path, ups: dict[str, RawUpstream]
) -> None:
    """GB reaches no rule that looks at the model: even a broken body goes up untouched."""
    gw = start(gateway, tmp_path, ups)
    assert post(gw, GB, b'{"model": "gpt-4o",').status_code == 200
    assert [b for _, _, b in got(ups["default"])] == [b'{"model": "gpt-4o",']


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"model":"gpt-4o"}', "text/plain"),  # not JSON by its type: not read
        (b'{"model":"gpt-4o","pad":"' + b"x" * 5000 + b'"}', "application/json"),  # over body.max_bytes
        (b'{"messages":[]}', "application/json"),  # no model
        (b'{"model":42}', "application/json"),  # not a string
    ],
    ids=["text-plain", "oversized", "no-model", "model-not-a-string"],
)
def test_an_unknown_model_is_refused_by_default_and_passed_untouched_when_allowed(
    gateway: GatewayFactory, tmp_path: Path, ups: dict[str, RawUpstream], body: bytes, content_type: str
) -> None:
    strict = start(gateway, tmp_path, ups)
    r = post(strict, CN, body, content_type)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "model_not_allowed_in_region"
    assert got(ups["qwen"]) == []
    loose = start(gateway, tmp_path, ups, unknown=", unknown_model: allow")
    assert post(loose, CN, body, content_type).status_code == 200
    assert [b for _, _, b in got(ups["qwen"])] == [body]  # byte for byte: nothing to rename


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "gpt-4o",',
        b'["gpt-4o"]',
        b'{"model":"gpt-4o","mod\\u0065l":"o1"}',
        b"\xff\xfe{}",
        # "model" in another case: a Go or ASP.NET upstream would serve o1, which allow_models refuses.
        b'{"model":"gpt-4o","MODEL":"o1-preview"}',
        b'{"MODEL":"o1-preview","model":"gpt-4o"}',
        b'{"Model":"o1-preview"}',
        b'{"model":"gpt-4o","MOD\\u0045L":"o1-preview"}',
        b'{"model":"gpt-4o","mo_del":"o1-preview"}',
        b'{"model\\u0000":"o1-preview"}',  # "model" to a decoder of C strings
    ],
    ids=[
        "truncated",
        "not-an-object",
        "model-twice",
        "not-utf8",
        "case-variant-after",
        "case-variant-before",
        "case-variant-alone",
        "case-variant-escaped",
        "case-variant-underscore",
        "nul-in-key",
    ],
)
def test_a_body_that_cannot_be_judged_gets_a_400(
    gateway: GatewayFactory, tmp_path: Path, ups: dict[str, RawUpstream], body: bytes
) -> None:
    gw = start(gateway, tmp_path, ups)
    r = post(gw, CN, body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_body")
    assert got(ups["qwen"]) == []


def test_a_client_that_leaves_while_its_body_is_read_is_recorded_and_nothing_goes_up(
    gateway: GatewayFactory, tmp_path: Path, ups: dict[str, RawUpstream]
) -> None:
    import socket

    gw = start(gateway, tmp_path, ups)
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"x-forwarded-for: " + US.encode() + b"\r\ncontent-length: 100\r\n\r\n" + b'{"model": "o1'
        )
        gw.wait_log(0, timeout=0.5)
    (entry,) = gw.wait_log(1)
    assert (entry["status"], entry["error"]) == (499, "client_disconnected")
    # Judged as a request whose model is unknown (the restrictive default): the models rule takes it.
    assert (entry["decision"], entry["rule"]) == ("deny", "no-reasoning-here")
    assert all(got(up) == [] for up in ups.values())
    assert 'decision="needs_model"' not in gw.metrics()


def test_a_rate_limited_route_sends_the_renamed_body_after_the_check(
    gateway: GatewayFactory, tmp_path: Path, ups: dict[str, RawUpstream]
) -> None:
    """The held body survives the rate limiter's wait (in memory here; Redis batches the same callback)."""
    text = POLICY.format(default=ups["default"].url, eu=ups["eu"].url, qwen=ups["qwen"].url, unknown="").replace(
        'allow_models: [gpt-4o, gpt-4o-mini, "qwen-*"]}',
        'allow_models: [gpt-4o, gpt-4o-mini, "qwen-*"], rate_limit: {requests: 1, per: 1h}}',
    )
    assert "rate_limit" in text
    gw = gateway("--policy", write(tmp_path, "limited.yaml", text), "--geoip", CITY, *TRUST)
    assert post(gw, CN, b'{"model": "gpt-4o"}').status_code == 200
    r = post(gw, CN, b'{"model": "gpt-4o"}')
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert [b for _, _, b in got(ups["qwen"])] == [b'{"model": "qwen-plus"}']
