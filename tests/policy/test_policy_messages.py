"""What ``check`` tells someone who got a policy wrong: the right line, the real
problem, a likely fix, and every problem in one pass."""

from __future__ import annotations

import pytest

from gateway.policy import parse_policy
from gateway.yamlfile import FileError


def error_of(text: str) -> str:
    with pytest.raises(FileError) as e:
        parse_policy(text, "p.yaml", None)
    return str(e.value)


def lines_of(text: str) -> list[str]:
    return error_of(text).splitlines()


# --- YAML syntax: the line of the mistake, not the line where the parser noticed ---------


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        # an unclosed '[' is noticed on the next line
        ("version: 1\nrules:\n  - countries: [GB\n    action: allow\n", 3, "'[' at column 16 is not closed"),
        ("version: 1\nrules:\n  - {countries: [GB], action: allow\n  - {action: deny}\n", 3, "'{' at column 5"),
        # an unclosed quote is noticed at the end of the file
        ('version: 1\ndescription: "abc\nrules: []\n', 2, "quote at column 14 is not closed"),
        # a key without ': ' runs on into the next line, where the ':' is refused
        ("version: 1\nrules:\n  - countries [GB]\n    action: allow\n", 3, "no ': ' after the key"),
        ("version: 1\nrules:\n  - countries:[GB]\n    action: allow\n", 3, "no ': ' after the key"),
        # a line indented too far is read as the rest of the value above it
        ("version: 1\nrules:\n  - countries: [GB]\n    action: allow\n     name: x\n", 5, "indented more"),
        # a line indented too little or too far for its list
        ("version: 1\nrules:\n  - countries: [GB]\n   action: allow\n", 4, "bad indentation at column 4"),
        ("version: 1\nrules:\n  - countries: [GB]\n    action: allow\n   - {action: deny}\n", 5, "indentation"),
        ("version: 1\nrules:\n  - countries: [GB]\n    action: allow\n  -countries: [DE]\n", 5, "space after '-'"),
        # tabs
        ("version: 1\nrules:\n\t- countries: [GB]\n", 3, "tab at column 1"),
        # duplicate keys
        ("version: 1\nrules: []\nrules: []\n", 3, "duplicate key 'rules' (first at line 2)"),
    ],
)
def test_yaml_syntax_errors_point_at_the_mistake(text: str, line: int, words: str) -> None:
    (msg,) = lines_of(text)
    assert msg.startswith(f"p.yaml:{line}: "), msg
    assert words in msg, msg
    assert "<block" not in msg  # parser jargon


# --- codes: a likely fix -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "meant"),
    [("UK", "GB"), ("EL", "GR"), ("de", "DE"), ("gb", "GB"), ("DEU", "DE"), ("Germany", "DE"), ("England", "GB")],
)
def test_country_mistakes_get_a_did_you_mean(code: str, meant: str) -> None:
    msg = error_of(f"version: 1\nrules:\n  - {{countries: [US, {code}], action: allow}}\n")
    assert f"p.yaml:3: rules[0].countries: {code!r} is not an ISO 3166-1 alpha-2 code; did you mean {meant!r}?" in msg


def test_a_code_with_no_likely_meaning_gets_no_guess() -> None:
    msg = error_of("version: 1\nrules:\n  - {countries: [XX], action: allow}\n")
    assert "'XX' is not an ISO 3166-1 alpha-2 code" in msg and "did you mean" not in msg


@pytest.mark.parametrize(
    ("code", "words", "not_words"),
    [
        ("GB-XXX", "'GB-XXX' is no such subdivision: ISO 3166-2 lists no 'XXX' in GB", "write the country"),
        ("UA-99", "'UA-99' is no such subdivision", "write the country"),
        ("gb-eng", "codes are upper-case, write 'GB-ENG'", "no such subdivision"),
        ("UK-ENG", "'UK' is not an ISO 3166-1 alpha-2 code; did you mean 'GB-ENG'?", "no such subdivision"),
        ("GBENG", "write the country's alpha-2 code, '-', and the subdivision", "no such subdivision"),
    ],
)
def test_subdivision_messages_say_what_is_actually_wrong(code: str, words: str, not_words: str) -> None:
    msg = error_of(f"version: 1\nrules:\n  - {{subdivisions: [{code}], action: deny}}\n")
    assert msg.startswith("p.yaml:3: rules[0].subdivisions: ") and words in msg and not_words not in msg, msg


@pytest.mark.parametrize(
    ("pattern", "words", "not_words"),
    [
        ("/v1/*/x*", "'*' is allowed only as the last character", "must start with '/'"),
        ("/v1/*x", "'*' is allowed only as the last character", "must start with '/'"),
        ("v1/models", "must start with '/'", "'*'"),
        ("/v1/models?x=1", "without the query string", "must start with '/'"),
        # requests are judged in canonical form, so a pattern in any other could never match
        ("/v1//files", "canonical form, where this path is '/v1/files'", "'*'"),
        ("/v1/%66iles", "canonical form, where this path is '/v1/files'", "'*'"),
        ("/v1/%2fx/*", "a request with this path is refused", "'*' is allowed"),
        ("/v1/../admin", "a request with this path is refused", "'*'"),
        ("/v1/caf\u00e9", "a request with this path is refused", "'*'"),
    ],
)
def test_path_pattern_messages_say_what_is_allowed(pattern: str, words: str, not_words: str) -> None:
    msg = error_of(f"version: 1\nrules:\n  - {{paths: ['{pattern}'], action: deny}}\n")
    assert msg.startswith(f"p.yaml:3: rules[0].paths: {pattern!r} ") and words in msg and not_words not in msg, msg


def test_good_path_patterns_pass() -> None:
    parse_policy("version: 1\nrules:\n  - {paths: ['/v1/*', '/v1/models', '/*'], action: deny}\n", "p.yaml", None)
    parse_policy("version: 1\nrules:\n  - {paths: ['/v1/files/', '/v1/caf%C3%A9', '/V1/X'], action: deny}\n", "p", None)


@pytest.mark.parametrize("asn", ["AS4837", "4294967296", "-1", "4837.5"])
def test_asn_bounds_in_plain_words(asn: str) -> None:
    msg = error_of(f"version: 1\nrules:\n  - {{asns: [{asn}], action: deny}}\n")
    assert "p.yaml:3: rules[0].asns[0]:" in msg and "whole number from 0 to 4294967295" in msg, msg
    assert "Input should" not in msg


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("version: 1\nblock: {status: 200}\n", "p.yaml:2: block.status: must be 400 or more"),
        ("version: 1\nblock: {status: 600}\n", "p.yaml:2: block.status: must be 599 or less"),
        ("version: 1\nrules:\n  - {countries: [], action: deny}\n", "must list at least one value"),
        ("version: 1\nupstreams:\n  default: {url: 'http://h', timeouts: {idle: 0}}\n", "must be more than 0"),
        ("version: 1\nrules:\n  - {subdivisions: [43], action: deny}\n", "rules[0].subdivisions[0]: must be text"),
        ("version: 1\nrules: {countries: [GB]}\n", "rules: must be a list"),
    ],
)
def test_schema_errors_in_plain_words(text: str, words: str) -> None:
    msg = error_of(text)
    assert words in msg and "Input should" not in msg, msg


def test_upstream_credentials_are_refused_without_repeating_them() -> None:
    msg = error_of("version: 1\nupstreams:\n  default: {url: 'https://bob:pa55word@api.example.com'}\n")
    assert "p.yaml:3: upstreams.default.url: must not contain credentials" in msg and "api_key_env" in msg
    assert "pa55word" not in msg and "bob" not in msg


# --- one pass: structural problems do not hide semantic ones -------------------------------


def test_a_bad_key_in_one_rule_does_not_hide_a_bad_country_in_another() -> None:
    msgs = lines_of(
        "version: 1\n"
        "rules:\n"
        "  - {name: a, contries: [GB], action: allow}\n"
        "  - {name: b, countries: [GB], action: allow}\n"
        "  - {name: c, countries: [UK], action: allow}\n"
    )
    assert msgs == [
        "p.yaml:3: rules[0]: unknown key 'contries'",
        "p.yaml:5: rules[2].countries: 'UK' is not an ISO 3166-1 alpha-2 code; did you mean 'GB'?",
    ]


def test_a_rule_with_a_bad_key_still_has_its_codes_checked() -> None:
    msgs = lines_of("version: 1\nrules:\n  - {colour: red, countries: [de], subdivisions: [GB-XXX]}\n")
    assert any("unknown key 'colour'" in m for m in msgs)
    assert any("missing required key 'action'" in m for m in msgs)
    assert any("'de' is not an ISO 3166-1 alpha-2 code; did you mean 'DE'?" in m for m in msgs)
    assert any("'GB-XXX' is no such subdivision" in m for m in msgs)


def test_structural_problems_elsewhere_do_not_hide_rule_problems() -> None:
    msgs = lines_of(
        "version: 2\nblock: {status: 200}\nrules:\n  - {countries: [XX], action: deny}\n"
        "  - {paths: ['/v1/*/x'], action: deny}\n"
    )
    assert [m.split(":")[1] for m in msgs] == ["1", "2", "4", "5"], msgs


def test_rule_problems_do_not_hide_test_problems() -> None:
    msgs = lines_of(
        "version: 1\nrules:\n  - {name: gb, countrys: [GB], action: allow}\n"
        "tests:\n  - {ip: 1.2.3.999, expect: deny}\n  - {ip: 1.2.3.4, expect: deny, rule: gbb}\n"
        "  - {ip: 1.2.3.4, expect: deny, rule: gb}\n"
    )
    assert msgs[0] == "p.yaml:3: rules[0]: unknown key 'countrys'"
    assert msgs[1].startswith("p.yaml:5: tests[0].ip: ")
    assert msgs[2] == "p.yaml:6: tests[1].rule: no rule named 'gbb'"
    assert len(msgs) == 3


# --- rate_limit by: api_key where the upstream replaces the caller's key ------------------

KEYED = "version: 1\nupstreams:\n  default: {url: 'http://127.0.0.1:1', api_key_env: UP_KEY}\n"


@pytest.mark.parametrize(
    ("text", "line", "variable"),
    [
        # the report: the default upstream injects the operator's key
        (KEYED + "rules:\n  - {name: eu, countries: [DE], action: allow,\n"
         "     rate_limit: {requests: 3, per: 1m, by: api_key}}\n", 6, "UP_KEY"),
        # block style, a monitor rule (it lets requests through too)
        (KEYED + "rules:\n  - name: eu\n    countries: [DE]\n    action: monitor\n    rate_limit:\n"
         "      requests: 3\n      per: 1m\n      by: api_key\n", 11, "UP_KEY"),
        # a route to an upstream with its own key
        ("version: 1\nupstreams:\n  default: {url: 'http://127.0.0.1:1'}\n"
         "  qwen: {url: 'http://127.0.0.1:2', api_key_env: QWEN_KEY}\n"
         "rules:\n  - {name: cn, countries: [CN], action: route, upstream: qwen,\n"
         "     rate_limit: {requests: 3, per: 1m, by: api_key}}\n", 7, "QWEN_KEY"),
        # keyless upstream, but a fallback (behind another fallback) that injects a key
        ("version: 1\nupstreams:\n  default: {url: 'http://127.0.0.1:1', fallback: [b]}\n"
         "  b: {url: 'http://127.0.0.1:2', fallback: [c]}\n"
         "  c: {url: 'http://127.0.0.1:3', api_key_env: C_KEY}\n"
         "rules:\n  - {name: all, action: allow, rate_limit: {requests: 3, per: 1m, by: api_key}}\n", 7, "C_KEY"),
        # mode: monitor forwards what a deny rule matches
        (KEYED.replace("version: 1\n", "version: 1\nmode: monitor\n") + "rules:\n  - {name: cn, countries: [CN],"
         " action: deny,\n     rate_limit: {requests: 3, per: 1m, by: api_key}}\n", 7, "UP_KEY"),
    ],
    ids=["default-upstream", "block-style-monitor", "route", "fallback", "deny-in-monitor-mode"],
)  # fmt: skip
def test_rate_limit_by_api_key_is_refused_where_the_upstream_injects_its_own_key(
    text: str, line: int, variable: str
) -> None:
    msg = error_of(text)
    assert msg.startswith(f"p.yaml:{line}: rules[0] "), msg
    assert "rate_limit by: api_key" in msg and variable in msg and "made-up key" in msg, msg
    assert "by ip, country, subdivision or asn" in msg and "issues to its callers" in msg, msg


@pytest.mark.parametrize(
    "text",
    [
        # the caller's own key goes upstream, which checks it: a made-up key gets a 401 there
        "version: 1\nupstreams:\n  default: {url: 'http://127.0.0.1:1'}\n"
        "rules:\n  - {countries: [DE], action: allow, rate_limit: {requests: 3, per: 1m, by: api_key}}\n",
        # no upstreams at all: --upstream's default carries no key
        "version: 1\nrules:\n  - {countries: [DE], action: allow, rate_limit: {requests: 3, per: 1m, by: api_key}}\n",
        # another subject is fine with an injected key
        KEYED + "rules:\n  - {countries: [DE], action: allow, rate_limit: {requests: 3, per: 1m, by: ip}}\n",
        # a keyless route, while another upstream (not reachable from it) has a key
        "version: 1\nupstreams:\n  default: {url: 'http://127.0.0.1:1', api_key_env: UP_KEY}\n"
        "  own: {url: 'http://127.0.0.1:2'}\n"
        "rules:\n  - {countries: [DE], action: route, upstream: own,\n"
        "     rate_limit: {requests: 3, per: 1m, by: api_key}}\n",
        # a deny rule in enforce mode serves nobody, so no key is used
        KEYED + "rules:\n  - {countries: [CN], action: deny, rate_limit: {requests: 3, per: 1m, by: api_key}}\n",
    ],
    ids=["keyless-upstream", "no-upstreams", "by-ip", "keyless-route", "deny-rule"],
)
def test_rate_limit_by_api_key_is_kept_where_the_callers_key_goes_upstream(text: str) -> None:
    rule = parse_policy(text, "p.yaml", None).rules[0]
    assert rule.decision.limit is not None or rule.action == "deny"  # a refusal is never counted
