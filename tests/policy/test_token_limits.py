"""Token limits, max_concurrent, token_reserve and client_keys: the policy's shape, its compiled form, and
its refusals with file and line."""

from __future__ import annotations

import io
import ipaddress
import json
from pathlib import Path
from typing import Any
from unittest import mock

import jsonschema
import pytest

from gateway.cli import main
from gateway.clientip import PUBLIC, ClientAddress
from gateway.diff import diff
from gateway.geo import GeoFacts
from gateway.policy import Decision, Policy, decide, json_schema, parse_policy
from gateway.policy.tokenlimit import Budget, Concurrency, TokenLimit
from gateway.runtime import policy_warnings
from gateway.usage.estimate import input_tokens
from gateway.yamlfile import FileError
from support.authz import runtime_for
from support.processes import POLICIES

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


# --- what check warns about ----------------------------------------------------------------------------

WARNED = """version: 1
rules:
  - name: shadowed
    countries: [FR]
    action: allow
    mode: monitor
    max_concurrent: {streams: 3, by: ip}
  - name: eu
    countries: [DE]
    paths: [/v1/chat/completions, /v1/images/generations, /v1/*, /v2/*, /v1/embeddings/]
    action: allow
    token_limit:
      - {tokens: 2000, per: 1m, by: ip}
      - {tokens: 100000, per: 1m, by: ip, burst: 5000, count: input}
      - {tokens: 100000, per: 1d, by: ip, kind: quota}
tests:
  - {ip: 81.2.69.160, expect: deny}
"""


def test_check_warns_with_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(WARNED)
    assert main(["check", str(path)]) == 0  # warnings, not failures
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"warning: {path}:3: rules[0] (shadowed) is mode: monitor, so it never decides and its max_concurrent "
        "never applies (the rule or default that decides its requests counts them)",
        f"warning: {path}:10: rules[1] (eu): token_limit on '/v1/images/generations', a path whose answers the "
        "gateway cannot read usage from (it reads /v1/chat/completions, /v1/completions, /v1/embeddings, "
        "/v1/responses, /v1/messages): its requests are charged an estimate, flagged as one, never the "
        "provider's count",
        f"warning: {path}:10: rules[1] (eu): token_limit on '/v2/*', a path whose answers the gateway cannot read "
        "usage from (it reads /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, "
        "/v1/messages): its requests are charged an estimate, flagged as one, never the provider's count",
        f"warning: {path}:13: rules[1] (eu): token_limit[0] can never hold more than 2000 tokens (tokens), but a "
        "request that names no max_tokens reserves 4096 output tokens and a body that cannot be read reserves "
        "8192: such requests are refused as never fitting (429, not retried); set token_reserve lower or the "
        "limit higher",
        f"warning: {path}:14: rules[1] (eu): token_limit[1] can never hold more than 5000 tokens (burst), but a "
        "body that cannot be read reserves 8192: such requests are refused as never fitting (429, not "
        "retried); set token_reserve lower or the limit higher",
    ]


def test_check_warns_that_the_decision_service_enforces_no_token_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(ISSUE_EXAMPLE.replace("api_key_env: UP_KEY, ", ""))
    assert main(["check", "-q", str(path)]) == 0
    assert capsys.readouterr().err == ""
    assert main(["check", "-q", str(path), "--authz", "nginx", "--authz", "forward"]) == 0
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning == (
        f"warning: {path}:5: rule 'eu-api' has token_limit and max_concurrent, which the decision service "
        "(forward, nginx) does not enforce: it never sees the answer, so it cannot count tokens or requests in "
        "flight (it enforces rate_limit); serve these callers through the gateway's own proxy port to have "
        "them counted"
    )


def test_serve_with_a_decision_service_warns_at_start(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path, ISSUE_EXAMPLE.replace("api_key_env: UP_KEY, ", ""), authz_port=0)
    (warning,) = [w for w in runtime.warnings if "does not enforce" in w]
    assert ":5: rule 'eu-api' has token_limit and max_concurrent" in warning
    assert "(envoy_http, forward, nginx)" in warning


# --- explain ---------------------------------------------------------------------------------------------

EXAMPLE = str(POLICIES / "examples" / "token-budgets.yaml")
BODY = (
    b'{"model":"gpt-4o","max_tokens":500,"messages":[{"role":"user","content":"Summarise the attached contract '
    b'in three bullet points, in German."}]}'
)


def explained(capsys: pytest.CaptureFixture[str], *args: str, stdin: bytes | None = None) -> dict[str, Any]:
    if stdin is not None:
        with mock.patch("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin))):
            assert main(["explain", "--policy", EXAMPLE, "--json", *args]) == 0
    else:
        assert main(["explain", "--policy", EXAMPLE, "--json", *args]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def test_explain_shows_the_rules_limits_concurrency_reserve_and_client_keys(capsys: pytest.CaptureFixture[str]) -> None:
    report = explained(capsys, "2a02:d180::1")  # DE
    assert report["rule"] == "eu-teams" and report["client_keys"] == "required"
    assert report["token_limit"] == [
        {"index": 0, "tokens": 200000, "per": 60.0, "by": ["api_key"], "count": "total", "kind": "rate",
         "burst": 200000},
        {"index": 1, "tokens": 5000000, "per": 86400.0, "by": ["country", "model"], "count": "output",
         "kind": "quota"},
    ]  # fmt: skip
    assert report["max_concurrent"] == {"streams": 20, "by": ["api_key"]}
    assert report["token_reserve"] == {"output": 2048, "unreadable": 8192}
    assert report["redis_on_error"] == "open"
    assert "reservation" not in report  # nothing asked: nothing reserved
    budget_keys = ["client_keys", "token_limit", "max_concurrent", "token_reserve", "redis_on_error"]
    assert [k for k in report if k in budget_keys] == budget_keys  # the model's order


def test_explain_shows_what_a_body_reserves(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_bytes(BODY)
    report = explained(capsys, "2a02:d180::1", "--body", str(body))
    estimate = input_tokens(BODY, "gpt-4o")
    assert report["model"] == "gpt-4o"  # read from the body, as the gateway reads a held one
    assert report["reservation"] == {
        "readable": True, "input": estimate, "output": 500, "output_from": "max_tokens", "estimate_model": "gpt-4o"
    }  # fmt: skip
    assert [(t["reserves"], t["fits"]) for t in report["token_limit"]] == [(estimate + 500, True), (500, True)]
    # --max-tokens stands for the body's own; the output default when there is none.
    report = explained(capsys, "2a02:d180::1", "--body", "-", "--max-tokens", "7", stdin=BODY)
    assert [t["reserves"] for t in report["token_limit"]] == [estimate + 7, 7]
    uncapped = BODY.replace(b'"max_tokens":500,', b"")
    report = explained(capsys, "2a02:d180::1", "--body", "-", stdin=uncapped)
    assert report["reservation"]["output_from"] == "token_reserve.output"
    assert [t["reserves"] for t in report["token_limit"]] == [input_tokens(uncapped, "gpt-4o") + 2048, 2048]


def test_explain_shows_an_unreadable_body_and_a_reservation_that_can_never_fit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = explained(capsys, "81.2.69.142", "--body", "-", stdin=b"not json")  # GB
    assert report["reservation"] == {"readable": False, "input": None, "output": 8192, "output_from": "unreadable"}
    assert [(t["reserves"], t["fits"]) for t in report["token_limit"]] == [(8192, True)]
    report = explained(capsys, "216.160.83.56", "--max-tokens", "100001")  # US: 100,000 a minute
    assert report["reservation"]["input"] is None
    assert [(t["reserves"], t["fits"]) for t in report["token_limit"]] == [(100001, False)]


def test_explain_card_words_the_budget(capsys: pytest.CaptureFixture[str]) -> None:
    with mock.patch("sys.stdin", io.TextIOWrapper(io.BytesIO(BODY))):
        assert main(["explain", "--policy", EXAMPLE, "2a02:d180::1", "--body", "-"]) == 0
    card = capsys.readouterr().out
    estimate = input_tokens(BODY, "gpt-4o")
    for line in [
        "  keys:      client key required (regiongate keys add); a missing or unknown one gets 401",
        f"  request:   input ~{estimate} (estimate, gpt-4o), output 500 (max_tokens)",
        f"  tokens:    [0] 200000 total tokens per 1m by api_key (rate): reserves {estimate + 500}",
        "  tokens:    [1] 5000000 output tokens per 1d by country+model (quota): reserves 500",
        "  in flight: at most 20 at once by api_key",
        "  reserve:   2048 output tokens without max_tokens; 8192 for an unreadable body",
        "  redis:     on_error open: while Redis cannot be asked, let through, counted",
    ]:
        assert line in card.splitlines(), card


@pytest.mark.parametrize(
    ("args", "stdin", "says"),
    [
        (["--body", "-"], b'{"model":"gpt-4o","max_tokens":0}', "--body: Invalid 'max_tokens': integer below "
         "minimum value. Expected a value >= 1, but got 0 instead; the gateway answers it with a 400"),
        (["--body", "-"], b'{"model":"a","model":"b"}', '--body: The request body has more than one "model" field; '
         "the gateway answers it with a 400"),
        (["--body", "/nonexistent/body.json"], None, "--body: No such file or directory: /nonexistent/body.json"),
        (["--max-tokens", "0"], None, "argument --max-tokens: must be from 1 to 1000000000"),
        (["--max-tokens", "lots"], None, "argument --max-tokens: 'lots' is not a whole number"),
    ],
    ids=["zero-max-tokens", "two-models", "no-file", "zero-flag", "word-flag"],
)  # fmt: skip
def test_explain_refuses_bad_requests_with_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], stdin: bytes | None, says: str
) -> None:
    with mock.patch("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin or b""))):
        try:
            code = main(["explain", "--policy", EXAMPLE, "2a02:d180::1", *args])
        except SystemExit as e:  # argparse's own refusals
            code = e.code  # type: ignore[assignment]
    assert code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err


def test_explain_without_a_budget_adds_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    report = explained(capsys, "10.0.0.1", "--max-tokens", "5")  # defaults.private: no budget
    assert not {"token_limit", "max_concurrent", "token_reserve", "reservation", "redis_on_error"} & set(report)
    assert report["client_keys"] == "required"  # its upstream requires client keys all the same


def test_diff_names_each_budget_setting_that_changes() -> None:
    old = compiled(
        "version: 1\nrules:\n  - name: eu\n    countries: [DE]\n    action: allow\n"
        "    token_limit: [{tokens: 1000, per: 1m, by: api_key}]\n    rate_limit: {requests: 3, per: 1m}\n"
    )
    same = diff(old, old)
    assert not same.settings
    new = compiled(
        "version: 1\nrules:\n  - name: eu\n    countries: [DE]\n    action: allow\n"
        "    token_limit: [{tokens: 2000, per: 1m, by: api_key}]\n    rate_limit: {requests: 3, per: 1m}\n"
        "    max_concurrent: {streams: 2, by: ip}\n    client_keys: required\n    token_reserve: {output: 10}\n"
    )
    changed = {c.key: (c.old, c.new) for c in diff(old, new).settings}
    assert set(changed) == {
        "rules.eu.token_limit",
        "rules.eu.max_concurrent",
        "rules.eu.token_reserve",
        "rules.eu.client_keys",
    }
    limit = {"tokens": 1000, "per": 60.0, "by": ["api_key"], "count": "total", "kind": "rate", "burst": None}
    assert changed["rules.eu.token_limit"] == ([limit], [limit | {"tokens": 2000}])
    assert changed["rules.eu.max_concurrent"] == (None, {"streams": 2, "by": ["ip"]})
    reserve = {"output": 4096, "unreadable": 8192}
    assert changed["rules.eu.token_reserve"] == (reserve, reserve | {"output": 10})
    assert changed["rules.eu.client_keys"] == (None, "required")


def test_the_json_schema_checks_what_the_loader_checks() -> None:
    """Editors flag the same periods, keys and bounds the gateway refuses (the schema is generated)."""
    schema = json_schema()

    def valid(entry: dict[str, Any]) -> bool:
        doc = {"version": 1, "rules": [{"action": "allow", "token_limit": [entry]}]}
        return not list(jsonschema.Draft202012Validator(schema).iter_errors(doc))

    good = {"tokens": 5, "per": "30d", "by": ["country", "model"]}
    assert valid(good) and valid(good | {"by": "api_key", "per": 60})
    bad: list[dict[str, Any]] = [
        {"per": "monthly"}, {"per": 0.5}, {"by": ["ip", "ip"]}, {"by": []}, {"tokens": 0}, {"count": "x"}
    ]  # fmt: skip
    for change in bad:
        assert not valid(good | change), change


def test_a_running_gateway_shows_the_policys_warnings_in_readyz(tmp_path: Path) -> None:
    """check's warnings follow the policy in force into /readyz, and a policy that requires client keys
    where no key store is configured says that every such request will be refused."""
    runtime = runtime_for(tmp_path, WARNED)
    warned = [w for w in runtime.describe()["warnings"] if "rules[" in w]
    assert len(warned) == 5 and all(w.startswith(f"{runtime.policy.source}:") for w in warned)
    assert ":10: rules[1] (eu): token_limit on '/v1/images/generations'" in warned[1]
    assert policy_warnings(compiled(WARNED), "off") == [
        f"p.yaml:{w.line}: {w.message}" for w in compiled(WARNED).warnings
    ]
    keyed = ISSUE_EXAMPLE.replace("api_key_env: UP_KEY, ", "")
    (keys,) = policy_warnings(compiled(keyed), "off")
    assert keys == (
        "p.yaml: client_keys: required, but no key store is configured (--redis or --keys-file): every request "
        "that needs a client key is refused with 401 invalid_api_key"
    )
    assert policy_warnings(compiled(keyed), "file") == []
    unkeyed = keyed.replace(", client_keys: required", "")
    ruled = unkeyed.replace("action: allow", "action: allow\n    client_keys: required")
    assert len(policy_warnings(compiled(ruled), "off")) == 1
    assert policy_warnings(compiled(unkeyed), "off") == []
