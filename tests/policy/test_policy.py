"""The policy: schema errors with lines, compile-time checks, and the decision."""

from __future__ import annotations

import textwrap

import pytest

from gateway.clientip import INVALID, ClientAddress, classify, parse_address
from gateway.geo import NO_FACTS, Geo
from gateway.policy import Decision, Policy, decide, judge_ip, parse_policy, request_path, run_tests
from gateway.trace import trace
from gateway.yamlfile import FileError
from support.processes import ANON, ASN, CITY, COUNTRY

EXAMPLE = """\
version: 1
upstreams:
  default: {url: "http://127.0.0.1:8000", api_key_env: UPSTREAM_API_KEY}
geo: {field: country}
defaults: {action: deny, unknown: deny, private: allow}
mode: enforce
block: {status: 403, code: unsupported_country_region_territory, message: "Country, region, or territory not supported"}
rules:
  - {name: office, cidrs: [203.0.113.0/24], action: allow}
  - {name: anonymizers, anonymizer: [tor_exit_node, public_proxy, anonymous_vpn], action: deny}
  - {name: occupied, subdivisions: [UA-43, UA-40, UA-14, UA-09], action: deny}
  - {name: embeddings-only, countries: [DE], paths: ["/v1/embeddings"], action: allow}
  - {name: supported, countries: [US, GB, SE], action: allow}
  - {name: bad-asn, asns: [4837], action: deny}
tests:
  - {ip: 89.160.20.112, expect: allow}
  - {ip: 175.16.199.1, path: /v1/chat/completions, expect: deny}
"""


@pytest.fixture(scope="module")
def geo() -> Geo:
    return Geo([CITY, ASN, ANON])


def verdict(policy: Policy, geo: Geo, ip: str, path: str = "/v1/chat/completions") -> Decision:
    return judge_ip(policy, geo, ip, path)[2]


def load(text: str, geo: Geo | None = None, name: str = "policy.yaml"):  # type: ignore[no-untyped-def]
    return parse_policy(textwrap.dedent(text), name, geo.capabilities if geo else None)


def test_issue_example_loads_and_its_tests_pass(geo: Geo) -> None:
    p = parse_policy(EXAMPLE, "example.yaml", geo.capabilities)
    assert [r.name for r in p.rules] == ["office", "anonymizers", "occupied", "embeddings-only", "supported", "bad-asn"]
    assert all(r.passed for r in run_tests(p, geo))


@pytest.mark.parametrize(
    ("ip", "path", "verdict_", "rule"),
    [
        ("203.0.113.9", "/v1/chat/completions", "allow", "office"),  # cidrs
        ("1.124.213.1", "/v1/chat/completions", "deny", "anonymizers"),  # VPN + Tor exit
        ("186.30.236.1", "/v1/chat/completions", "deny", "anonymizers"),  # public proxy
        ("89.160.20.112", "/v1/chat/completions", "allow", "supported"),  # SE
        ("216.160.83.56", "/v1/models", "allow", "supported"),  # US
        ("175.16.199.1", "/v1/chat/completions", "deny", "defaults.action"),  # CN
        ("27.192.0.1", "/v1/chat/completions", "deny", "bad-asn"),  # AS4837, no country in City test data
        ("214.1.1.1", "/v1/chat/completions", "deny", "defaults.unknown"),  # no country
        ("10.0.0.1", "/v1/chat/completions", "allow", "defaults.private"),
        ("fd00::1", "/v1/chat/completions", "allow", "defaults.private"),
    ],
)
def test_each_rule_kind(geo: Geo, ip: str, path: str, verdict_: str, rule: str) -> None:
    d = verdict(parse_policy(EXAMPLE, "e.yaml", geo.capabilities), geo, ip, path)
    assert (d.verdict, d.rule) == (verdict_, rule)


def test_paths_and_countries_and_together(geo: Geo) -> None:
    text = """\
    version: 1
    rules:
      - {name: de-embeddings, countries: [DE, GB], paths: ["/v1/embeddings", "/v2/*"], action: allow}
    """
    p = load(text, geo)
    assert verdict(p, geo, "81.2.69.142", "/v1/embeddings").rule == "de-embeddings"
    assert verdict(p, geo, "81.2.69.142", "/v2/anything/below").rule == "de-embeddings"
    assert verdict(p, geo, "81.2.69.142", "/v1/chat/completions").rule == "defaults.action"
    assert verdict(p, geo, "81.2.69.142", "/v1/embeddings/x").rule == "defaults.action"  # exact unless '*'
    assert verdict(p, geo, "175.16.199.1", "/v1/embeddings").rule == "defaults.action"


DENY_FILES = """\
    version: 1
    {case}rules:
      - {{name: no-files, paths: ["/v1/files", "/v1/batches/*", "/v1/uploads/"], action: deny}}
      - {{name: everyone, action: allow}}
    """


@pytest.mark.parametrize(
    ("path", "sensitive", "insensitive"),
    [
        ("/v1/files", "no-files", "no-files"),
        ("/v1/files/", "no-files", "no-files"),  # a trailing slash: Express, Spring and others serve it the same
        ("/V1/files", "everyone", "no-files"),  # the report: ASP.NET routes it to /v1/files
        ("/v1/FILES/", "everyone", "no-files"),
        ("/V1/Batches/b1", "everyone", "no-files"),
        ("/v1/batches/b1", "no-files", "no-files"),
        ("/v1/uploads", "no-files", "no-files"),  # an exact pattern written with its trailing slash
        ("/v1/uploads/", "no-files", "no-files"),
        ("/v1/UPLOADS", "everyone", "no-files"),
        ("/v1/files/f1", "everyone", "everyone"),  # exact unless '*'
        ("/v1/files//", "no-files", "no-files"),  # as the proxy canonicalises it: /v1/files/
        ("/v1/batches", "everyone", "everyone"),  # '/v1/batches/*' is under the slash
        ("/", "everyone", "everyone"),
    ],
)
def test_paths_match_with_a_trailing_slash_and_optionally_in_any_case(
    geo: Geo, path: str, sensitive: str, insensitive: str
) -> None:
    canonical = request_path(path)
    exact = load(DENY_FILES.format(case=""), geo)
    folded = load(DENY_FILES.format(case="paths_case: insensitive\n    "), geo)
    for policy, rule in ((exact, sensitive), (folded, insensitive)):
        client, facts, decision = judge_ip(policy, geo, "81.2.69.142", canonical)
        assert decision.rule == rule
        assert trace(policy, client, facts, canonical).decision == decision  # explain --trace agrees


def test_first_match_wins(geo: Geo) -> None:
    p = load(
        """\
    version: 1
    rules:
      - {name: first, countries: [GB], action: deny}
      - {name: second, subdivisions: [GB-ENG], action: allow}
    """,
        geo,
    )
    assert verdict(p, geo, "81.2.69.142").rule == "first"


def test_subdivision_rule_with_ukrainian_data(ua_city_db: str) -> None:
    geo = Geo([ua_city_db])
    p = load(
        """\
    version: 1
    rules:
      - {name: occupied, subdivisions: [UA-43, UA-40, UA-14, UA-09], action: deny}
      - {name: supported, countries: [UA, GB], action: allow}
    """,
        geo,
    )
    assert verdict(p, geo, "198.51.100.43").rule == "occupied"
    assert verdict(p, geo, "::ffff:198.51.100.9").rule == "occupied"
    assert verdict(p, geo, "198.51.100.30").rule == "supported"


def test_registered_country_field(geo: Geo) -> None:
    p = load(
        """\
    version: 1
    geo: {field: registered_country}
    rules:
      - {name: us, countries: [US], action: allow}
    """,
        geo,
    )
    d = verdict(p, geo, "81.2.69.142")  # located in GB, registered to US
    assert d.rule == "us"


def test_invalid_client_uses_defaults_invalid_and_skips_rules(geo: Geo) -> None:
    p = load(
        """\
    version: 1
    defaults: {invalid: deny}
    rules:
      - {name: everyone, paths: ["/v1/*"], action: allow}
    """,
        geo,
    )
    client = ClientAddress(None, INVALID, "x-forwarded-for", "garbage", "bad")
    assert decide(p, client, NO_FACTS, "/v1/models").rule == "defaults.invalid"


def test_global_monitor_mode_lets_denials_through_and_says_so(geo: Geo) -> None:
    p = load(
        """\
    version: 1
    mode: monitor
    rules:
      - {name: gb, countries: [GB], action: allow}
    """,
        geo,
    )
    d = verdict(p, geo, "175.16.199.1")
    assert (d.verdict, d.action, d.allowed, d.rule) == ("monitor", "deny", True, "defaults.action")
    assert verdict(p, geo, "81.2.69.142").verdict == "allow"


def test_monitor_action_and_shadow_rules(geo: Geo) -> None:
    p = load(
        """\
    version: 1
    rules:
      - {name: watch-cn, countries: [CN], action: deny, mode: monitor}
      - {name: watch-all, action: monitor, mode: monitor}
      - {name: se, countries: [SE], action: monitor}
      - {name: cn, countries: [CN], action: allow}
    """,
        geo,
    )
    d = verdict(p, geo, "175.16.199.1")
    assert (d.verdict, d.rule, d.shadow) == ("allow", "cn", ("watch-cn", "watch-all"))
    d = verdict(p, geo, "89.160.20.112")
    assert (d.verdict, d.action, d.allowed, d.shadow) == ("monitor", "monitor", True, ("watch-all",))


def test_decisions_without_shadow_are_shared_objects(geo: Geo) -> None:
    """The hot path allocates no Decision: each rule's is built at load time."""
    p = parse_policy(EXAMPLE, "e.yaml", geo.capabilities)
    ip = parse_address("89.160.20.112")
    client = ClientAddress(ip, classify(ip), "peer", "89.160.20.112")
    facts = geo.lookup(ip)
    assert decide(p, client, facts, "/v1/x") is decide(p, client, facts, "/v1/x")


def test_block_body_is_openai_shaped() -> None:
    import json

    p = load("""\
    version: 1
    block: {status: 451, code: region_blocked, message: "Not here"}
    """)
    assert json.loads(p.block_body) == {
        "error": {"message": "Not here", "type": "request_forbidden", "param": None, "code": "region_blocked"}
    }


# --- errors, each with file and line -------------------------------------------------------


def error_of(text: str, geo: Geo | None = None) -> str:
    with pytest.raises(FileError) as e:
        load(text, geo, "p.yaml")
    return str(e.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: 1\nrulez: []\n", "p.yaml:2: unknown key 'rulez'"),
        ("version: 2\n", "p.yaml:1: version: 2 is not one of 1"),
        ("rules: []\n", "p.yaml:1: missing required key 'version'"),
        ("version: 1\nrules:\n  - {countries: [US]}\n", "p.yaml:3: rules[0]: missing required key 'action'"),
        ("version: 1\nrules:\n  - {countries: [US], action: block}\n", "p.yaml:3: rules[0].action: 'block'"),
        ("version: 1\nrules:\n  - {countries: [US], action: deny, colour: red}\n", "p.yaml:3: rules[0]: unknown key"),
        (
            "version: 1\nrules:\n  - countries:\n      - US\n      - UK\n    action: allow\n",
            "p.yaml:5: rules[0].countries: 'UK' is not an ISO 3166-1 alpha-2 code",
        ),
        ("version: 1\nrules:\n  - {subdivisions: [UA-99], action: deny}\n", "p.yaml:3: rules[0].subdivisions: 'UA-99'"),
        ("version: 1\nrules:\n  - {subdivisions: [43], action: deny}\n", "p.yaml:3: rules[0].subdivisions"),
        ("version: 1\nrules:\n  - {cidrs: [10.0.0.5/8], action: deny}\n", "p.yaml:3: rules[0].cidrs: '10.0.0.5/8'"),
        ("version: 1\nrules:\n  - {cidrs: [nonsense], action: deny}\n", "p.yaml:3: rules[0].cidrs: 'nonsense'"),
        ("version: 1\nrules:\n  - {countries: [], action: deny}\n", "p.yaml:3: rules[0].countries"),
        ("version: 1\nrules:\n  - {paths: [v1/x], action: deny}\n", "p.yaml:3: rules[0].paths"),
        ("version: 1\nrules:\n  - {anonymizer: [vpn], action: deny}\n", "p.yaml:3: rules[0].anonymizer[0]: 'vpn'"),
        (
            "version: 1\nrules:\n  - {name: a, countries: [US], action: deny}\n"
            "  - {name: a, countries: [GB], action: deny}\n",
            "duplicate rule name 'a'",
        ),
        ("version: 1\nrules: []\nrules: []\n", "p.yaml:3: duplicate key 'rules' (first at line 2)"),
        ("version: 1\nrules:\n  - {name: a\n", "YAML syntax error"),
        ("version: 1\nblock: {status: 200}\n", "p.yaml:2: block.status"),
        ("version: 1\nupstreams:\n  default: {url: 'ftp://x'}\n", "p.yaml:3: upstreams.default.url: must be an http"),
        ("version: 1\nupstreams:\n  default: {url: 'http://h/?q=1'}\n", "must not carry a query"),
        ("version: 1\ntests:\n  - {ip: 1.2.3.999, expect: deny}\n", "p.yaml:3: tests[0].ip"),
        ("version: 1\ntests:\n  - {ip: 1.2.3.4, expect: deny, rule: nope}\n", "tests[0].rule: no rule named 'nope'"),
        ("- 1\n- 2\n", "p.yaml:1: a policy must be a mapping"),
        ("", "the file is empty"),
    ],
)
def test_bad_policies_name_file_line_and_problem(text: str, expected: str) -> None:
    assert expected in error_of(text)


def test_norway_is_a_country_not_a_boolean() -> None:
    p = load("version: 1\nrules:\n  - {countries: [NO, SE], action: allow}\n")
    assert p.rules[0].countries == {"NO", "SE"}


def test_several_problems_are_reported_together() -> None:
    msg = error_of("version: 1\nrules:\n  - {countries: [XX], action: deny}\n  - {cidrs: [1.2.3.4/8], action: deny}\n")
    assert "p.yaml:3:" in msg and "p.yaml:4:" in msg


@pytest.mark.parametrize(
    ("rules", "unreachable"),
    [
        (
            "  - {name: a, countries: [US, GB], action: allow}\n"
            "  - {name: b, countries: [US], paths: [/v1/x], action: deny}\n",
            "b",
        ),
        ("  - {name: a, action: deny}\n  - {name: b, countries: [US], action: allow}\n", "b"),
        ("  - {name: a, cidrs: [10.0.0.0/8], action: deny}\n  - {name: b, cidrs: [10.1.0.0/16], action: allow}\n", "b"),
        ("  - {name: a, paths: ['/v1/*'], action: deny}\n  - {name: b, paths: [/v1/models], action: allow}\n", "b"),
        ("  - {name: a, countries: [CN], action: deny}\n  - {name: b, countries: [CN], action: deny}\n", "b"),
    ],
)
def test_unreachable_rules_are_errors(rules: str, unreachable: str) -> None:
    msg = error_of("version: 1\nrules:\n" + rules)
    assert f"({unreachable}) can never match" in msg and "p.yaml:4:" in msg


def test_reachable_rules_are_not_flagged() -> None:
    load("""\
    version: 1
    rules:
      - {name: a, countries: [US], paths: [/v1/x], action: deny}
      - {name: b, countries: [US], action: allow}
      - {name: c, cidrs: [10.0.0.0/16], action: deny}
      - {name: d, cidrs: [10.0.0.0/8], action: allow}
      - {name: shadow, action: deny, mode: monitor}
      - {name: e, countries: [GB], action: allow}
    """)


@pytest.mark.parametrize(
    ("rule", "needs"),
    [
        ("{subdivisions: [UA-43], action: deny}", "needs a City or Enterprise database"),
        ("{asns: [4837], action: deny}", "needs an ASN, ISP or Enterprise database"),
        ("{anonymizer: [tor_exit_node], action: deny}", "needs an Anonymous-IP database"),
    ],
)
def test_rule_needing_a_database_that_is_not_configured(rule: str, needs: str) -> None:
    msg = error_of(f"version: 1\nrules:\n  - {rule}\n", Geo([COUNTRY]))
    assert "p.yaml:3:" in msg and needs in msg


def test_registered_country_needs_a_maxmind_database() -> None:
    msg = error_of(
        "version: 1\ngeo: {field: registered_country}\nrules:\n  - {countries: [US], action: allow}\n", Geo([])
    )
    assert "p.yaml:2:" in msg and "registered_country" in msg


def test_country_data_is_needed_only_where_countries_are_told_apart() -> None:
    asn_only = Geo([ASN])
    load("version: 1\ndefaults: {action: allow, unknown: allow}\nrules:\n  - {asns: [4837], action: deny}\n", asn_only)
    msg = error_of("version: 1\nrules:\n  - {countries: [US], action: allow}\n", asn_only)
    assert "needs a Country, City or Enterprise database" in msg
    msg = error_of("version: 1\ndefaults: {action: allow, unknown: deny}\n", asn_only)
    assert "needs a Country, City or Enterprise database" in msg


def test_policy_tests_report_failures(geo: Geo) -> None:
    p = load(
        """\
    version: 1
    rules:
      - {name: gb, countries: [GB], action: allow}
    tests:
      - {ip: 175.16.199.1, expect: allow}
      - {ip: 81.2.69.142, expect: allow, rule: gb}
    """,
        geo,
    )
    results = run_tests(p, geo)
    assert [r.passed for r in results] == [False, True]
    assert results[0].line == 5 and "expected allow, got deny" in (results[0].problem or "")
