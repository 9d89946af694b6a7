"""The core judges a query exactly as the proxy port judges a request, and answers instead of forwarding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.authz.query import Query
from support.authz import CN, GB, ask, judge_for, runtime_for

PEER = "10.0.0.7"  # the calling proxy


def query(
    client: str,
    target: bytes = b"/v1/chat/completions",
    method: str = "POST",
    headers: tuple[tuple[bytes, bytes], ...] = (),
    body: bytes | None = None,
) -> Query:
    return Query("forward", method, target, ((b"x-forwarded-for", client.encode()), *headers), PEER, body=body)


def test_an_allowed_caller_gets_the_facts(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path)
    judge, metrics = judge_for(runtime)
    answer = ask(judge, query(GB))
    assert answer.allowed and answer.status == 200 and answer.body == b""
    assert answer.header(b"x-regiongate-decision") == b"allow"
    assert answer.header(b"x-regiongate-rule") == b"gb"
    assert answer.header(b"x-regiongate-country") == b"GB"
    assert answer.header(b"x-regiongate-upstream") == b"default"
    assert answer.header(b"x-regiongate-policy") == runtime.active.header[1]
    metrics.fold()  # the request path tallies; a scrape folds (gateway.metrics)
    text = metrics.registry.get_sample_value(
        "regiongate_decisions_total",
        {"decision": "allow", "rule": "gb", "country": "GB", "upstream": "default", "via": "forward"},
    )
    assert text == 1.0


def test_a_refusal_is_the_proxy_ports_openai_body(tmp_path: Path) -> None:
    judge, _ = judge_for(runtime_for(tmp_path))
    answer = ask(judge, query(CN))
    assert not answer.allowed and answer.status == 403
    error = json.loads(answer.body)["error"]
    assert error["code"] == "unsupported_country_region_territory"
    assert answer.header(b"content-type") == b"application/json"
    assert answer.header(b"x-regiongate-decision") == b"deny"
    assert answer.header(b"x-regiongate-country") == b"CN"
    assert answer.header(b"x-regiongate-upstream") is None


def test_the_path_is_canonicalised_and_judged(tmp_path: Path) -> None:
    judge, _ = judge_for(runtime_for(tmp_path))
    refused = ask(judge, query(GB, b"/v1/%66iles/x?purpose=1"))
    assert not refused.allowed and refused.header(b"x-regiongate-rule") == b"no-files"
    bad = ask(judge, query(GB, b"/v1/../../etc"))
    assert bad.status == 400 and json.loads(bad.body)["error"]["code"] == "invalid_path"
    method = ask(judge, query(GB, method="TRACE"))
    assert method.status == 405 and method.header(b"allow") is not None


def test_the_client_comes_from_the_contracts_header_and_the_caller_is_trusted(tmp_path: Path) -> None:
    judge, _ = judge_for(runtime_for(tmp_path))
    # The client wrote a CN address leftmost; the proxy appended the GB address it saw.
    spoofed = ask(judge, Query("forward", "GET", b"/v1/models", ((b"x-forwarded-for", f"{CN}, {GB}".encode()),), PEER))
    assert spoofed.allowed and spoofed.header(b"x-regiongate-country") == b"GB"
    real_ip = Query("nginx", "GET", b"/v1/models", ((b"x-real-ip", CN.encode()),), PEER, client_header="x-real-ip")
    assert ask(judge, real_ip).header(b"x-regiongate-country") == b"CN"
    missing = ask(judge, Query("forward", "GET", b"/v1/models", (), PEER))
    assert not missing.allowed and missing.header(b"x-regiongate-rule") == b"defaults.missing"


def test_the_model_is_read_from_a_body_when_one_is_sent(tmp_path: Path) -> None:
    policy = """\
version: 1
rules:
  - {name: gb, countries: [GB], action: allow, allow_models: ["gpt-4o-mini"]}
"""
    judge, _ = judge_for(runtime_for(tmp_path, policy))
    json_type = ((b"content-type", b"application/json"),)
    ok = ask(judge, query(GB, headers=json_type, body=b'{"model": "gpt-4o-mini"}'))
    assert ok.allowed
    refused = ask(judge, query(GB, headers=json_type, body=b'{"model": "gpt-4o"}'))
    assert refused.status == 403 and json.loads(refused.body)["error"]["code"] == "model_not_allowed_in_region"
    unknown = ask(judge, query(GB, headers=json_type))  # the contract sent no body: the model is unknown
    assert unknown.status == 403 and "could not be read" in json.loads(unknown.body)["error"]["message"]
    bad = ask(judge, query(GB, headers=json_type, body=b'{"model": '))
    assert bad.status == 400


def test_the_access_log_names_the_decision(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path)
    judge, _ = judge_for(runtime)
    ask(judge, query(CN, b"/v1/chat/completions?x=1"))
    runtime.access_log.close()
    line = json.loads((tmp_path / "authz-access.log").read_text().splitlines()[-1])
    assert line["decision"] == "deny" and line["country"] == "CN" and line["path"] == "/v1/chat/completions"
    assert line["status"] == 403


def test_a_token_limited_rule_reserves_nothing_in_the_decision_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service never sees a response, so it could reserve but never settle: it reserves nothing."""
    from gateway.proxy import path

    asked: list[object] = []
    monkeypatch.setattr(path, "admit", lambda *args: asked.append(args))
    policy = """\
version: 1
rules:
  - name: gb
    countries: [GB]
    action: allow
    token_limit: [{tokens: 10, per: 1d, by: [country], kind: quota}]
    max_concurrent: {streams: 1, by: [country]}
defaults: {action: deny}
"""
    judge, _ = judge_for(runtime_for(tmp_path, policy))
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 500})
    for _ in range(3):  # each far over the budget, and more at once than max_concurrent: all allowed
        answer = ask(judge, query(GB, headers=((b"content-type", b"application/json"),), body=body.encode()))
        assert answer.allowed and answer.header(b"x-regiongate-rule") == b"gb"
    assert asked == []
