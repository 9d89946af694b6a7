"""Routing rules in the policy: action: route, models, allow_models, and the unknown model. Pure: no server."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.clientip import PUBLIC, ClientAddress
from gateway.geo import GeoFacts
from gateway.policy import NEEDS_MODEL, decide, decide_model, model_refusal, parse_policy
from gateway.yamlfile import FileError

BASE = """version: 1
upstreams:
  default: {url: "http://127.0.0.1:9"}
  eu: {url: "http://127.0.0.1:10"}
  qwen: {url: "http://127.0.0.1:11"}
defaults: {action: deny}
"""

POLICY = (
    BASE
    + """rules:
  - {name: no-reasoning-here, countries: [SG], models: ["o1*", "o3*"], action: deny}
  - {name: eu-residency, countries: [DE, FR], action: route, upstream: eu}
  - {name: migrate, countries: [HK], action: route, upstream: qwen, allow_models: [gpt-4o, "qwen-*"]}
  - {name: supported, countries: [SG, GB], action: allow}
"""
)


def client(ip: str = "203.0.113.9") -> ClientAddress:
    return ClientAddress(ipaddress.ip_address(ip), PUBLIC, "peer", ip)


def facts(country: str) -> GeoFacts:
    return GeoFacts(country=country)


def test_route_sends_the_caller_to_the_rules_upstream() -> None:
    policy = parse_policy(POLICY, "p.yaml")
    d = decide(policy, client(), facts("DE"), "/v1/chat/completions")
    assert (d.verdict, d.action, d.rule, d.upstream) == ("route", "route", "eu-residency", "eu")
    assert d.allowed
    plain = decide(policy, client(), facts("GB"), "/v1/chat/completions")
    assert (plain.verdict, plain.upstream) == ("allow", "default")
    refused = decide(policy, client(), facts("CN"), "/v1/chat/completions")
    assert (refused.verdict, refused.upstream) == ("deny", None)


def test_the_body_is_asked_for_only_when_a_rule_that_looks_at_the_model_is_reached() -> None:
    policy = parse_policy(POLICY, "p.yaml")
    # SG reaches the models rule first: the decision cannot be made without the model.
    assert decide(policy, client(), facts("SG"), "/v1/chat/completions") is NEEDS_MODEL
    # DE and GB never reach it; HK's rule has allow_models, which is checked afterwards.
    for country in ("DE", "GB", "HK", "CN"):
        assert decide(policy, client(), facts(country), "/v1/chat/completions") is not NEEDS_MODEL
    assert decide(policy, client(), facts("SG"), "/x", "o1-preview").rule == "no-reasoning-here"
    assert decide(policy, client(), facts("SG"), "/x", "o3").verdict == "deny"
    assert decide(policy, client(), facts("SG"), "/x", "gpt-4o").rule == "supported"
    assert decide(policy, client(), facts("SG"), "/x", "o").rule == "supported"  # 'o1*' is a prefix of names


def test_allow_models_refuses_any_other_model_with_the_models_own_refusal() -> None:
    policy = parse_policy(POLICY, "p.yaml")
    hk = decide(policy, client(), facts("HK"), "/v1/chat/completions")
    assert model_refusal(policy, hk, "gpt-4o") is None
    assert model_refusal(policy, hk, "qwen-max") is None
    refused = model_refusal(policy, hk, "o1-preview")
    assert refused is not None
    assert (refused.verdict, refused.rule, refused.model_refused, refused.upstream) == (
        "deny", "migrate", True, None,
    )  # fmt: skip
    assert "o1-preview" in refused.reason
    # Unknown model (no JSON body, too large, no "model"): refused by default.
    unknown = model_refusal(policy, hk, None)
    assert unknown is not None and unknown.model_refused
    assert decide_model(policy, client(), facts("HK"), "/x", "o1").verdict == "deny"
    assert decide_model(policy, client(), facts("HK"), "/x", "gpt-4o").verdict == "route"


def test_unknown_model_is_taken_the_restrictive_way_by_default_and_the_permissive_way_on_request() -> None:
    strict = parse_policy(POLICY, "p.yaml")
    loose = parse_policy(POLICY.replace("defaults:", "body: {unknown_model: allow}\ndefaults:"), "p.yaml")
    # A deny rule's models take an unknown model under 'deny' (it cannot prove it is not o1) ...
    assert decide(strict, client(), facts("SG"), "/x", None).rule == "no-reasoning-here"
    assert decide(loose, client(), facts("SG"), "/x", None).rule == "supported"
    # ... and allow_models refuses it under 'deny' only.
    assert decide_model(strict, client(), facts("HK"), "/x", None).verdict == "deny"
    assert decide_model(loose, client(), facts("HK"), "/x", None).verdict == "route"


def test_an_allow_rule_with_models_does_not_take_an_unknown_model_when_strict() -> None:
    text = BASE + "rules:\n  - {name: mini-anywhere, models: [gpt-4o-mini], action: allow}\n"
    strict = parse_policy(text, "p.yaml")
    loose = parse_policy(text.replace("defaults:", "body: {unknown_model: allow}\ndefaults:"), "p.yaml")
    assert decide(strict, client(), facts("CN"), "/x", None).rule == "defaults.action"
    assert decide(loose, client(), facts("CN"), "/x", None).rule == "mini-anywhere"
    assert decide(strict, client(), facts("CN"), "/x", "gpt-4o-mini").rule == "mini-anywhere"


def test_monitor_mode_records_a_model_refusal_without_enforcing_it() -> None:
    policy = parse_policy(POLICY.replace("defaults:", "mode: monitor\ndefaults:"), "p.yaml")
    d = decide_model(policy, client(), facts("HK"), "/x", "o1")
    assert (d.verdict, d.action, d.model_refused, d.upstream) == ("monitor", "deny", True, "qwen")


def test_a_route_rule_can_carry_a_rate_limit() -> None:
    text = POLICY.replace(
        "action: route, upstream: eu}", "action: route, upstream: eu, rate_limit: {requests: 5, per: 1m}}"
    )
    d = decide(parse_policy(text, "p.yaml"), client(), facts("DE"), "/x")
    assert d.limit is not None and d.limit.requests == 5


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ("  - {countries: [DE], action: route}\n", "p.yaml:8: rules[0] (rule-1): action: route needs 'upstream: NAME'"),
        (
            "  - {countries: [DE], action: route, upstream: mars}\n",
            "p.yaml:8: rules[0] (rule-1): no upstream named 'mars' (upstreams: default, eu, qwen)",
        ),
        (
            "  - {countries: [DE], action: allow, upstream: eu}\n",
            "p.yaml:8: rules[0] (rule-1): 'upstream' goes with action: route (this rule is allow)",
        ),
        (
            "  - {countries: [DE], action: deny, allow_models: [gpt-4o]}\n",
            "p.yaml:8: rules[0] (rule-1): allow_models limits what an allow or route rule lets through",
        ),
        ("  - {models: ['o*1'], action: deny}\n", "p.yaml:8: rules[0].models: 'o*1': write a model name"),
        ("  - {models: ['*'], action: deny}\n", "p.yaml:8: rules[0].models: '*': write a model name"),
        ("  - {models: [], action: deny}\n", "p.yaml:8: rules[0].models: must list at least one value"),
        ("  - {countries: [DE], action: send}\n", "p.yaml:8: rules[0].action: 'send' is not one of"),
    ],
)
def test_routing_mistakes_name_the_file_and_line(rules: str, expected: str) -> None:
    with pytest.raises(FileError) as e:
        parse_policy(BASE + "rules:\n" + rules, "p.yaml")
    assert expected in str(e.value)


def test_a_models_rule_does_not_hide_the_rule_after_it() -> None:
    """'models' narrows a rule, so a later rule without it can still match (not 'can never match')."""
    text = BASE + (
        "rules:\n"
        "  - {name: a, countries: [DE], models: [gpt-4o], action: deny}\n"
        "  - {name: b, countries: [DE], action: allow}\n"
        "  - {name: c, countries: [DE], models: [gpt-4o-mini], action: deny}\n"
    )
    with pytest.raises(FileError) as e:
        parse_policy(text, "p.yaml")
    assert "rules[2] (c) can never match: rule 'b'" in str(e.value)
    assert "rules[1]" not in str(e.value)


def test_policy_tests_name_a_model_and_an_upstream() -> None:
    from gateway.geo import Geo
    from gateway.policy import run_tests

    text = POLICY + (
        "tests:\n"
        '  - {ip: "10.0.0.1", expect: deny}\n'  # private: defaults.private allows -> fails on purpose
        '  - {ip: "10.0.0.2", expect: allow, upstream: default}\n'
        '  - {ip: "10.0.0.3", expect: allow, upstream: eu}\n'
    )
    results = run_tests(parse_policy(text, "p.yaml"), Geo([]))
    assert [r.passed for r in results] == [False, True, False]
    assert results[2].problem == "expected upstream 'eu', got 'default'"
