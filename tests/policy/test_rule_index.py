"""The rule index decides as the ordered walk does, and finds unreachable rules as comparing every pair did.

``decide()`` asks :class:`gateway.policy.index.RuleIndex` for the first matching
rule; ``decide_in_order()`` tries each rule in turn, the definition. On generated
policies (overlapping v4 and v6 CIDRs, countries, subdivisions, ASNs, anonymizer
flags, path and model patterns, every action, ``mode: monitor`` rules, keys
given as empty lists) and generated requests, the two must return the same
:class:`Decision`, field for field. The unreachable-rule check is compared with
the pairwise loop it replaced, kept here as the oracle, and the CIDR overrides'
intervals with the scan in precedence order they replaced.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.addresses import IPAddress
from gateway.cidrs import CidrSet, parse_network
from gateway.clientip import INVALID, MISSING, PRIVATE, PUBLIC, AddressKind, ClientAddress
from gateway.geo import ANONYMIZER_FLAGS, GeoFacts
from gateway.policy import UNREAD, GeoField, PathSet, Patterns, Policy, Rule, RuleAction, decide, parse_policy
from gateway.policy.compile import _enforced_cover
from gateway.policy.compiled import make_decision
from gateway.policy.decide import decide_in_order
from gateway.policy.index import RuleIndex
from gateway.policy.overrides import Compiled, Override, compile_overrides, judge, new_override
from gateway.policy.tokenlimit import Budget, TokenLimit

ACTIONS: list[RuleAction] = ["allow", "deny", "monitor", "route"]
FIELDS: list[GeoField] = ["country", "registered_country"]
KINDS: list[AddressKind] = [PUBLIC, PUBLIC, PRIVATE, MISSING, INVALID]
BASE = parse_policy("version: 1\ndefaults: {action: deny, unknown: monitor, private: allow, missing: deny}\n", "p.yaml")
COUNTRIES = ["GB", "US", "DE", "CN", "SE"]
SUBDIVISIONS = ["GB-ENG", "US-CA", "CN-22", "UA-43"]
ASNS = [1, 2, 3]
FLAGS = sorted(ANONYMIZER_FLAGS)[:3]
PATHS = ["/v1/*", "/v1/chat/completions", "/v1/embeddings", "/v1/", "/", "/*", "/v1/models/", "/V1/*", "/v1/chat*"]
MODELS = ["gpt-4o", "gpt-4o*", "o1*", "o", "gpt-4o-mini", "*"]
REQUEST_PATHS = [
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/models/",
    "/V1/Chat/Completions",
    "/",
    "/x",
]
REQUEST_MODELS = [UNREAD, None, "gpt-4o", "gpt-4o-mini", "o1-preview", "o", "qwen"]
# Few anchors, so that generated blocks overlap and nest; ::ffff:0:0 gives IPv4-mapped blocks (stored as IPv4).
V4_ANCHORS = [int(ipaddress.IPv4Address(a)) for a in ("10.0.0.0", "10.1.0.0", "192.0.2.0", "0.0.0.0")]
V6_ANCHORS = [int(ipaddress.IPv6Address(a)) for a in ("2001:db8::", "fd00::", "::ffff:10.0.0.0")]


@st.composite
def networks(draw: st.DrawFn) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if draw(st.booleans()):
        value = draw(st.sampled_from(V4_ANCHORS)) + draw(st.integers(0, 2**16 - 1))
        return ipaddress.IPv4Network((value, draw(st.sampled_from([0, 8, 15, 16, 24, 30, 32]))), strict=False)
    value = draw(st.sampled_from(V6_ANCHORS)) + draw(st.integers(0, 2**20 - 1))
    net = ipaddress.IPv6Network((value, draw(st.sampled_from([0, 32, 48, 104, 112, 124, 128]))), strict=False)
    try:
        parse_network(net)
    except ValueError:  # inside a transition prefix: refused at load, so never in a compiled rule
        return None
    return net


@st.composite
def addresses(draw: st.DrawFn) -> IPAddress:
    if draw(st.booleans()):
        return ipaddress.IPv4Address(draw(st.sampled_from(V4_ANCHORS)) + draw(st.integers(0, 2**16 - 1)))
    return ipaddress.IPv6Address(draw(st.sampled_from(V6_ANCHORS)) + draw(st.integers(0, 2**20 - 1)))


def some(values: list[Any]) -> st.SearchStrategy[list[Any] | None]:
    """A key left out (None), given as an empty list, or a few values."""
    return st.one_of(st.none(), st.lists(st.sampled_from(values), max_size=3))


@st.composite
def rules(draw: st.DrawFn, i: int, monitor_mode: bool) -> Rule:
    name = f"r{i}"
    action: RuleAction = draw(st.sampled_from(ACTIONS))
    cidrs = draw(st.one_of(st.none(), st.lists(networks(), max_size=3)))
    paths = draw(some(PATHS))
    models = draw(some(MODELS))
    countries, subdivisions, asns, flags = (draw(some(v)) for v in (COUNTRIES, SUBDIVISIONS, ASNS, FLAGS))
    decision = make_decision(action, name, f"rule {name!r}", monitor_mode, "eu" if action == "route" else None)
    if action in ("allow", "route") and draw(st.booleans()):  # a budget and client keys travel with the decision
        budget = Budget(name, (TokenLimit(name, 0, draw(st.integers(1, 9)), 60.0, ("country", "model")),))
        decision = dataclasses.replace(decision, budget=budget, client_keys=draw(st.booleans()))
    return Rule(
        name=name,
        line=i + 1,
        action=action,
        shadow=draw(st.booleans()),
        countries=frozenset(countries) if countries is not None else None,
        subdivisions=frozenset(subdivisions) if subdivisions is not None else None,
        asns=frozenset(asns) if asns is not None else None,
        anonymizer=frozenset(flags) if flags is not None else None,
        cidrs=CidrSet(n for n in cidrs if n is not None) if cidrs is not None else None,
        paths=PathSet(paths, draw(st.booleans())) if paths is not None else None,
        decision=decision,
        models=Patterns(models) if models is not None else None,
        unknown_matches=draw(st.booleans()),
    )


def policy_of(rule_list: list[Rule], field: GeoField = "country") -> Policy:
    return dataclasses.replace(BASE, rules=tuple(rule_list), index=RuleIndex(rule_list), field=field)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    monitor_mode = draw(st.booleans())
    count = draw(st.integers(0, 10))
    field: GeoField = draw(st.sampled_from(FIELDS))
    return policy_of([draw(rules(i, monitor_mode)) for i in range(count)], field)


facts_strategy = st.builds(
    GeoFacts,
    country=st.sampled_from([None, *COUNTRIES]),
    registered_country=st.sampled_from([None, *COUNTRIES]),
    subdivisions=st.lists(st.sampled_from(SUBDIVISIONS), max_size=2).map(tuple),
    asn=st.sampled_from([None, *ASNS, 99]),
    anonymizer=st.frozensets(st.sampled_from(FLAGS), max_size=2),
)


@st.composite
def clients(draw: st.DrawFn) -> ClientAddress:
    kind: AddressKind = draw(st.sampled_from(KINDS))
    ip = None if kind == INVALID or draw(st.integers(0, 9)) == 0 else draw(addresses())
    return ClientAddress(ip, kind, "peer", str(ip))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    policy=policies(),
    client=clients(),
    facts=facts_strategy,
    path=st.sampled_from(REQUEST_PATHS),
    model=st.sampled_from(REQUEST_MODELS),
)
def test_the_index_decides_as_the_ordered_walk_does(
    policy: Policy, client: ClientAddress, facts: GeoFacts, path: str, model: Any
) -> None:
    assert decide(policy, client, facts, path, model) == decide_in_order(policy, client, facts, path, model)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(policy=policies(), client=clients(), facts=facts_strategy, path=st.sampled_from(REQUEST_PATHS))
def test_the_index_lists_every_match_in_order(
    policy: Policy, client: ClientAddress, facts: GeoFacts, path: str
) -> None:
    """Not just the first: every rule a request matches, in order (what a chain of shadow rules walks)."""
    country = facts.country if policy.field == "country" else facts.registered_country
    for model in REQUEST_MODELS:
        expected = [
            i
            for i, r in enumerate(policy.rules)
            if r.matches(client.ip, country, facts, path) and (model is UNREAD or r.model_matches(model))
        ]
        assert list(policy.index.matching(client.ip, country, facts, path, model)) == expected
        assert policy.index.first(client.ip, country, facts, path, model) == (expected[0] if expected else None)


def first_cover_pairwise(rule_list: list[Rule], later_i: int) -> int | None:
    """The check as it was: every earlier rule, in order (the oracle)."""
    for earlier_i in range(later_i):
        if _enforced_cover(rule_list[earlier_i], rule_list[later_i]):
            return earlier_i
    return None


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(policy=policies())
def test_unreachable_rules_are_found_as_the_pairwise_check_found_them(policy: Policy) -> None:
    rule_list = list(policy.rules)
    index = RuleIndex(rule_list)
    for i in range(len(rule_list)):
        assert index.first_cover(rule_list, i, _enforced_cover) == first_cover_pairwise(rule_list, i)


def test_unreachable_rule_warnings_are_unchanged_on_a_policy_with_many() -> None:
    """The messages themselves, line for line, on a policy where several rules are covered."""
    text = """version: 1
rules:
  - {name: eu, countries: [DE, FR], action: allow}
  - {name: watch, cidrs: [10.0.0.0/8], action: deny, mode: monitor}
  - {name: net, cidrs: ["10.0.0.0/8", "2001:db8::/32"], action: deny}
  - {name: de, countries: [DE], action: deny}
  - {name: inner, cidrs: [10.1.0.0/16], action: allow}
  - {name: v6, cidrs: ["2001:db8:1::/48", "::ffff:10.2.0.0/112"], action: allow}
  - {name: de-path, countries: [DE], paths: ["/v1/*"], action: deny}
  - {name: everyone, action: deny}
  - {name: after-all, asns: [1], action: allow}
"""
    with pytest.raises(Exception) as e:
        parse_policy(text, "p.yaml")
    assert str(e.value).splitlines() == [
        "p.yaml:6: rules[3] (de) can never match: rule 'eu' (line 3) matches everything it does",
        "p.yaml:7: rules[4] (inner) can never match: rule 'net' (line 5) matches everything it does",
        "p.yaml:8: rules[5] (v6) can never match: rule 'net' (line 5) matches everything it does",
        "p.yaml:9: rules[6] (de-path) can never match: rule 'eu' (line 3) matches everything it does",
        "p.yaml:11: rules[8] (after-all) can never match: rule 'everyone' (line 10) matches everything it does",
    ]


def client(address: str) -> ClientAddress:
    return ClientAddress(ipaddress.ip_address(address), PUBLIC, "peer", address)


def test_a_later_narrower_cidr_rule_wins_only_where_the_earlier_one_does_not_hold() -> None:
    policy = parse_policy(
        """version: 1
defaults: {action: deny}
rules:
  - {name: narrow-first, cidrs: [10.1.2.0/24], action: deny}
  - {name: wide, cidrs: [10.0.0.0/8], action: allow}
  - {name: narrower-later-v6, cidrs: ["2001:db8::/32"], action: allow}
  - {name: everything, cidrs: [0.0.0.0/0, "::/0"], action: deny}
""",
        "p.yaml",
    )
    facts = GeoFacts(country="GB")
    cases = {
        "10.1.2.3": "narrow-first",
        "10.1.3.3": "wide",
        "10.255.255.255": "wide",
        "11.0.0.0": "everything",
        "2001:db8::1": "narrower-later-v6",
        "2001:db9::1": "everything",
        "0.0.0.0": "everything",
    }
    for address, rule in cases.items():
        assert decide(policy, client(address), facts, "/v1/x").rule == rule, address
        assert decide_in_order(policy, client(address), facts, "/v1/x").rule == rule, address


def test_an_ipv4_mapped_block_holds_the_ipv4_address_and_a_rule_without_address_keys_still_decides() -> None:
    policy = parse_policy(
        """version: 1
defaults: {action: allow}
rules:
  - {name: watch, countries: [GB], action: deny, mode: monitor}
  - {name: mapped, cidrs: ["::ffff:10.0.0.0/104"], action: deny}
  - {name: gb, countries: [GB], action: allow}
  - {name: rest, action: deny}
""",
        "p.yaml",
    )
    gb, us = GeoFacts(country="GB"), GeoFacts(country="US")
    assert decide(policy, client("10.9.9.9"), gb, "/").rule == "mapped"
    assert decide(policy, client("10.9.9.9"), gb, "/").shadow == ("watch",)
    assert decide(policy, client("11.9.9.9"), gb, "/").rule == "gb"
    assert decide(policy, client("11.9.9.9"), us, "/").rule == "rest"
    assert decide(policy, client("2001:db8::1"), us, "/").rule == "rest"


def test_deciding_tries_no_rule_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path asks the index only: Rule.matches, the walk's question, is never asked."""
    rule_list = [f"  - {{name: r{i}, cidrs: [198.18.{i // 256}.{i % 256}/32], action: deny}}\n" for i in range(1500)]
    text = "version: 1\nrules:\n" + "".join(rule_list) + "  - {name: gb, countries: [GB], action: allow}\n"
    policy = parse_policy(text, "p.yaml")

    def tried(*args: object) -> bool:
        raise AssertionError("decide() tried a rule one by one")

    monkeypatch.setattr(Rule, "matches", tried)
    assert decide(policy, client("2.125.160.216"), GeoFacts(country="GB"), "/").rule == "gb"
    assert decide(policy, client("198.18.5.1"), GeoFacts(country="GB"), "/").rule == "r1281"
    assert decide(policy, client("198.18.5.1"), GeoFacts(country="GB"), "/").verdict == "deny"


def scanned(compiled: Compiled, ip: IPAddress) -> Override | None:
    """The CIDR override as judge() found it before the index: the first block in precedence order."""
    return next((n.override for n in compiled.nets if n.network.version == ip.version and ip in n.network), None)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    blocks=st.lists(st.tuples(networks(), st.sampled_from(["allow", "deny"])), max_size=12),
    probes=st.lists(addresses(), min_size=1, max_size=8),
)
def test_cidr_overrides_are_found_by_the_index_as_the_scan_found_them(
    blocks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network | None, str]], probes: list[IPAddress]
) -> None:
    made = [
        new_override(action, "cidr", str(net), "", "", id=f"o{i}", created_at=float(i))
        for i, (net, action) in enumerate(blocks)
        if net is not None
    ]
    compiled = compile_overrides(made, now=0.0)
    for ip in probes:
        want = scanned(compiled, ip)
        got = judge(compiled, ClientAddress(ip, PUBLIC, "peer", str(ip)), GeoFacts(), None)
        assert (got.rule if got else None) == (f"override:{want.id}" if want else None)
