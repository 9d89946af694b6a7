"""Token limits, max_concurrent, token_reserve and client_keys: the policy's shape, its compiled form, and
its refusals with file and line."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.clientip import PUBLIC, ClientAddress
from gateway.geo import GeoFacts
from gateway.policy import Decision, Policy, decide, parse_policy
from gateway.policy.tokenlimit import Budget, Concurrency, TokenLimit
from gateway.yamlfile import FileError

PUBLIC_CLIENT = ClientAddress(ipaddress.ip_address("81.2.69.160"), PUBLIC, "peer", "81.2.69.160")
DE_FACTS = GeoFacts(country="DE")

ISSUE_EXAMPLE = """version: 1
upstreams:
  default: {url: 'http://127.0.0.1:1', api_key_env: UP_KEY, client_keys: required}
rules:
  - name: eu-api
    countries: [DE, FR, NL]
    action: allow
    token_limit:
      - {tokens: 200000, per: 1m, by: [api_key], count: total}
      - {tokens: 5000000, per: 1d, by: [country, model], count: output, kind: quota}
    max_concurrent: {streams: 20, by: [api_key]}
"""


def compiled(text: str) -> Policy:
    return parse_policy(text, "p.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(FileError) as e:
        parse_policy(text, "p.yaml")
    return e.value.render().splitlines()


def rule_decision(policy: Policy, name: str) -> Decision:
    return next(r.decision for r in policy.rules if r.name == name)


def test_the_issue_example_compiles_into_one_budget() -> None:
    decision = rule_decision(compiled(ISSUE_EXAMPLE), "eu-api")
    assert decision.budget == Budget(
        rule="eu-api",
        tokens=(
            TokenLimit("eu-api", 0, 200000, 60.0, ("api_key",), "total", "rate", None),
            TokenLimit("eu-api", 1, 5000000, 86400.0, ("country", "model"), "output", "quota", None),
        ),
        concurrency=Concurrency("eu-api", 20, ("api_key",)),
        output_default=4096,
        unreadable=8192,
    )
    assert decision.client_keys  # its upstream requires client keys
    assert decision.needs_body  # a token limit estimates the body's tokens


def test_by_may_be_one_string_and_defaults_are_the_documented_ones() -> None:
    policy = compiled(
        "version: 1\nrules:\n  - name: r\n    action: route\n    upstream: eu\n"
        "    token_limit: [{tokens: 10, per: 60, by: rule, burst: 5}]\n"
        "    token_reserve: {output: 100}\n"
        "upstreams:\n  eu: {url: 'http://127.0.0.1:1'}\n"
    )
    budget = rule_decision(policy, "r").budget
    assert budget is not None
    (limit,) = budget.tokens
    assert (limit.by, limit.count, limit.kind, limit.burst, limit.per) == (("rule",), "total", "rate", 5, 60.0)
    assert (budget.output_default, budget.unreadable, budget.concurrency) == (100, 8192, None)
    assert limit.capacity == 5 and limit.interval == 6.0 and limit.tolerance == 30.0


def test_max_concurrent_alone_needs_no_body_unless_it_counts_by_model() -> None:
    base = "version: 1\nrules:\n  - {name: r, action: allow, max_concurrent: {streams: 2, by: %s}}\n"
    plain = rule_decision(compiled(base % "[ip, country]"), "r")
    assert plain.budget is not None and not plain.budget.tokens and not plain.needs_body
    assert rule_decision(compiled(base % "[ip, model]"), "r").needs_body


def test_rules_without_budgets_keep_their_decisions_as_they_were() -> None:
    policy = compiled("version: 1\nrules:\n  - {name: r, countries: [DE], action: allow}\n")
    decision = rule_decision(policy, "r")
    assert decision.budget is None and not decision.client_keys and not decision.needs_body
    assert policy.client_keys_required == frozenset()


def test_decide_returns_the_rules_budget() -> None:
    policy = compiled(ISSUE_EXAMPLE)
    decision = decide(policy, PUBLIC_CLIENT, DE_FACTS, "/v1/chat/completions")
    assert decision.rule == "eu-api" and decision.budget is not None and len(decision.budget.tokens) == 2


# --- client_keys -------------------------------------------------------------------------------------

KEYS = """version: 1
upstreams:
  default: {url: 'http://127.0.0.1:1'}
  plain: {url: 'http://127.0.0.1:2'}
  behind: {url: 'http://127.0.0.1:3', fallback: [keyed]}
  keyed: {url: 'http://127.0.0.1:4', client_keys: required}
defaults: {action: allow}
rules:
  - {name: own, countries: [DE], action: allow, client_keys: required}
  - {name: plain, countries: [FR], action: route, upstream: plain}
  - {name: fallback, countries: [NL], action: route, upstream: behind}
  - {name: direct, countries: [BE], action: route, upstream: keyed}
  - {name: refused, countries: [CN], action: deny, client_keys: required}
"""


def test_client_keys_come_from_the_rule_or_any_upstream_a_request_may_reach() -> None:
    policy = compiled(KEYS)
    keyed = {r.name: r.decision.client_keys for r in policy.rules}
    assert keyed == {"own": True, "plain": False, "fallback": True, "direct": True, "refused": False}
    assert policy.client_keys_required == frozenset({"keyed"})
    assert not policy.on_default.client_keys  # the default upstream requires none


def test_a_default_that_forwards_to_a_keyed_upstream_requires_a_key() -> None:
    keyed = "  default: {url: 'http://127.0.0.1:1', client_keys: required}"
    policy = compiled(KEYS.replace("  default: {url: 'http://127.0.0.1:1'}", keyed))
    assert policy.on_default.client_keys and policy.on_private.client_keys
    assert not policy.on_invalid.client_keys  # defaults.invalid is deny: nothing is forwarded


# --- refusals with file and line ----------------------------------------------------------------------

RULE = "version: 1\nrules:\n  - name: r\n    action: allow\n"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("    token_limit:\n      - {tokens: 0, per: 1m, by: ip}\n",
         ["p.yaml:6: rules[0].token_limit[0].tokens: must be more than 0"]),
        ("    token_limit:\n      - {tokens: 1000000000001, per: 1m, by: ip}\n",
         ["p.yaml:6: rules[0].token_limit[0].tokens: must be 1000000000000 or less"]),
        ("    token_limit:\n      - {tokens: 5, per: 1m, by: [ip, country, ip]}\n",
         ["p.yaml:6: rules[0].token_limit[0].by: lists 'ip' twice: each key counts once in the subject"]),
        ("    token_limit:\n      - {tokens: 5, per: 1m, by: []}\n",
         ["p.yaml:6: rules[0].token_limit[0].by: must name at least one of ip, api_key, country, subdivision, "
          "asn, model, rule"]),
        ("    token_limit:\n      - {tokens: 5, per: 1m, by: [ip, team]}\n",
         ["p.yaml:6: rules[0].token_limit[0].by[1]: 'team' is not one of 'ip', 'api_key', 'country', "
          "'subdivision', 'asn', 'model' or 'rule'"]),
        ("    token_limit:\n      - {tokens: 5, per: 0.5, by: ip}\n",
         ["p.yaml:6: rules[0].token_limit[0].per: must be from 1s to 366d"]),
        ("    token_limit:\n      - {tokens: 5, per: 367d, by: ip}\n",
         ["p.yaml:6: rules[0].token_limit[0].per: must be from 1s to 366d"]),
        ("    token_limit:\n      - {tokens: 5, per: monthly, by: ip}\n",
         ["p.yaml:6: rules[0].token_limit[0].per: 'monthly' is not a duration (e.g. 1s, 1m, 1h, 1d)"]),
        ("    token_limit:\n      - {tokens: 5, per: true, by: ip}\n",
         ["p.yaml:6: rules[0].token_limit[0].per: must be a duration (1m, 1h, 1d, 30d) or seconds"]),
        ("    token_limit:\n      - {tokens: 5, per: 1m, by: ip, count: prompt}\n",
         ["p.yaml:6: rules[0].token_limit[0].count: 'prompt' is not one of 'input', 'output' or 'total'"]),
        ("    token_limit:\n      - {tokens: 5, per: 1m, by: ip, kind: budget}\n",
         ["p.yaml:6: rules[0].token_limit[0].kind: 'budget' is not one of 'rate' or 'quota'"]),
        ("    token_limit:\n      - {tokens: 5, per: 1m, by: ip}\n      - tokens: 5\n        per: 1d\n"
         "        by: ip\n        kind: quota\n        burst: 2\n",
         ["p.yaml:11: rules[0].token_limit[1]: burst goes with kind: rate (a quota's whole budget may be spent "
          "at once)"]),
        ("    token_limit: []\n", ["p.yaml:5: rules[0].token_limit: must list at least one value (leave the key "
                                 "out to match anything)"]),
        ("    token_limit: {tokens: 5, per: 1m, by: ip}\n",
         ["p.yaml:5: rules[0].token_limit: must be a list ([a, b] or one '- item' per line)"]),
        ("    max_concurrent: {streams: 0, by: ip}\n",
         ["p.yaml:5: rules[0].max_concurrent.streams: must be more than 0"]),
        ("    max_concurrent: {streams: 3}\n", ["p.yaml:5: rules[0].max_concurrent: missing required key 'by'"]),
        ("    max_concurrent: {streams: 3, by: ip, per: 1m}\n",
         ["p.yaml:5: rules[0].max_concurrent: unknown key 'per'"]),
        ("    token_limit: [{tokens: 5, per: 1m, by: ip}]\n    token_reserve: {output: 0}\n",
         ["p.yaml:6: rules[0].token_reserve.output: must be more than 0"]),
        ("    token_reserve: {output: 10}\n",
         ["p.yaml:5: rules[0] (r): token_reserve goes with token_limit (what it reserves in)"]),
        ("    client_keys: true\n", ["p.yaml:5: rules[0].client_keys: True is not one of 'required' or 'off'"]),
    ],
    ids=[
        "zero-tokens", "too-many-tokens", "repeated-by", "empty-by", "unknown-by", "short-period", "long-period",
        "word-period", "bool-period", "count", "kind", "burst-on-quota", "empty-list", "not-a-list",
        "zero-streams", "no-by", "concurrency-extra-key", "zero-reserve", "reserve-alone", "client-keys-bool",
    ],
)  # fmt: skip
def test_bad_budgets_are_refused_with_file_line_and_what_to_write(body: str, expected: list[str]) -> None:
    assert problems(RULE + body) == expected


@pytest.mark.parametrize(("action", "why"), [("deny", "a deny rule lets nothing through to limit"),
                                             ("monitor", "a monitor rule only records what it matches")])  # fmt: skip
def test_budgets_go_on_rules_that_let_requests_through(action: str, why: str) -> None:
    text = RULE.replace("allow", action) + "    token_limit: [{tokens: 5, per: 1m, by: ip}]\n"
    text += "    max_concurrent: {streams: 3, by: ip}\n"
    msgs = problems(text)
    assert len(msgs) == 2, msgs
    assert msgs[0].startswith("p.yaml:5: rules[0] (r): token_limit limits what an allow or route rule lets through")
    assert msgs[1].startswith("p.yaml:6: rules[0] (r): max_concurrent limits what")
    assert all(why in m for m in msgs)


def test_a_broken_key_elsewhere_does_not_hide_a_budget_problem() -> None:
    """One pass reports it all: the misspelt key and the deny rule's token_limit."""
    text = (
        "version: 1\nrules:\n  - {name: a, action: allow, contries: [DE]}\n"
        "  - name: b\n    action: deny\n    token_limit: [{tokens: 5, per: 1m, by: ip}]\n"
    )
    msgs = problems(text)
    assert msgs[0] == "p.yaml:3: rules[0]: unknown key 'contries'"
    assert msgs[1].startswith("p.yaml:6: rules[1] (b): token_limit limits what an allow or route rule lets through")


# --- by: api_key where the upstream replaces the caller's key -------------------------------------

INJECTING = "version: 1\nupstreams:\n  default: {url: 'http://127.0.0.1:1', api_key_env: UP_KEY}\n"


@pytest.mark.parametrize(
    ("body", "line", "what"),
    [
        ("    token_limit:\n      - {tokens: 5, per: 1m, by: ip}\n"
         "      - {tokens: 5, per: 1d, by: [country, api_key]}\n",
         9, "token_limit[1] by: api_key"),
        ("    max_concurrent:\n      streams: 3\n      by: api_key\n", 9, "max_concurrent by: api_key"),
        ("    rate_limit: {requests: 3, per: 1m, by: api_key}\n", 7, "rate_limit by: api_key"),
    ],
    ids=["token-limit", "max-concurrent", "rate-limit"],
)  # fmt: skip
def test_by_api_key_is_refused_behind_an_injected_key_without_client_keys(body: str, line: int, what: str) -> None:
    (msg,) = problems(INJECTING + "rules:\n  - name: r\n    action: allow\n" + body)
    assert msg.startswith(f"p.yaml:{line}: rules[0] (r): {what} cannot limit these callers"), msg
    assert "(UP_KEY)" in msg and "made-up key per request" in msg and "client_keys: required" in msg, msg


@pytest.mark.parametrize(
    ("upstreams", "own"),
    [(INJECTING.replace("UP_KEY}", "UP_KEY, client_keys: required}"), ""), (INJECTING, "    client_keys: required\n")],
    ids=["upstream-requires", "rule-requires"],
)
def test_by_api_key_is_allowed_where_client_keys_are_required(upstreams: str, own: str) -> None:
    policy = compiled(
        upstreams + "rules:\n  - name: r\n    action: allow\n" + own
        + "    token_limit: [{tokens: 5, per: 1m, by: api_key}]\n    max_concurrent: {streams: 3, by: api_key}\n"
        "    rate_limit: {requests: 3, per: 1m, by: api_key}\n"
    )  # fmt: skip
    assert rule_decision(policy, "r").client_keys


def test_by_api_key_is_allowed_when_a_fallback_requires_client_keys() -> None:
    """The requirement of a reachable fallback is checked before the request goes anywhere."""
    policy = compiled(
        "version: 1\nupstreams:\n  default: {url: 'http://127.0.0.1:1', api_key_env: UP_KEY, fallback: [b]}\n"
        "  b: {url: 'http://127.0.0.1:2', client_keys: required}\n"
        "rules:\n  - {name: r, action: allow, token_limit: [{tokens: 5, per: 1m, by: api_key}]}\n"
    )
    assert rule_decision(policy, "r").client_keys
