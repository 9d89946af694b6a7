"""The pure half of token budgets: whose budget (subject, keys), what a request costs and reserves, and
the arithmetic of a check (GCRA with a cost, quota windows), held to what it promises by Hypothesis."""

from __future__ import annotations

import ipaddress
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.clientip import MISSING, PUBLIC, ClientAddress
from gateway.geo import GeoFacts
from gateway.policy.ratelimit import gcra
from gateway.policy.tokenlimit import (
    Budget,
    Concurrency,
    TokenBy,
    TokenLimit,
    cost,
    gcra_cost,
    gcra_settle,
    quota_check,
    quota_settle,
    quota_window,
    reservation,
    slot_key,
    subject,
    token_key,
)

CLIENT = ClientAddress(ipaddress.ip_address("2001:db8::1"), PUBLIC, "peer", "2001:db8::1")
NOBODY = ClientAddress(None, MISSING, "x-forwarded-for", "")
FACTS = GeoFacts(country="DE", subdivisions=("DE-BY", "DE"), asn=3320)
ALL: tuple[TokenBy, ...] = ("ip", "api_key", "country", "subdivision", "asn", "model", "rule")


def limit(**kw: object) -> TokenLimit:
    fields: dict[str, object] = {"rule": "eu", "index": 0, "tokens": 1000, "per": 60.0, "by": ("ip",)} | kw
    return TokenLimit(**fields)  # type: ignore[arg-type]


# --- subject and keys -----------------------------------------------------------------------------


def test_a_composite_subject_names_each_key_in_order() -> None:
    assert subject(ALL, CLIENT, FACTS, "team-a", "gpt-4o", "eu") == "2001%3Adb8%3A%3A1:team-a:DE:DE-BY:3320:gpt-4o:eu"
    assert subject(("model", "country"), CLIENT, FACTS, None, "gpt-4o", "eu") == "gpt-4o:DE"


def test_what_is_not_known_has_its_own_subject() -> None:
    assert subject(ALL, NOBODY, GeoFacts(), None, None, "eu") == "unknown:%none:unknown:unknown:unknown:%none:eu"


def test_a_hashed_address_replaces_the_address() -> None:
    """With --log-address hashed the caller passes the keyed hash; the address itself is never a subject."""
    who = subject(("ip", "country"), CLIENT, FACTS, None, None, "eu", address="h:0123abcd")
    assert who == "h%3A0123abcd:DE" and "2001" not in who


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("a}b{c", "a%7Db%7Bc"),  # never closes the hash tag early
        ("x:y", "x%3Ay"),  # never passes for two parts
        ("%none", "%25none"),  # never passes for "no model"
        ("Ärger model", "%C3%84rger%20model"),
        ("tab\there", "tab%09here"),
    ],
)
def test_parts_are_escaped_so_they_can_neither_break_the_key_nor_pass_for_another(model: str, expected: str) -> None:
    assert subject(("model",), CLIENT, FACTS, None, model, "eu") == expected


def test_a_long_part_is_kept_as_its_hash() -> None:
    long_a, long_b = "m" * 500 + "a", "m" * 500 + "b"
    a, b = (subject(("model",), CLIENT, FACTS, None, m, "eu") for m in (long_a, long_b))
    assert a.startswith("%h") and len(a) == 34 and a != b
    assert subject(("model",), CLIENT, FACTS, None, "m" * 128, "eu") == "m" * 128  # at the bound: kept as is


@settings(max_examples=300)
@given(st.lists(st.one_of(st.none(), st.text(max_size=40)), min_size=2, max_size=2))
def test_different_values_never_share_a_subject(models: list[str | None]) -> None:
    a, b = (subject(("model", "api_key"), CLIENT, FACTS, m, m, "eu") for m in models)
    assert (a == b) == (models[0] == models[1])
    assert "{" not in a and "}" not in a


def test_keys_are_hash_tagged_per_rule_limit_and_subject() -> None:
    who = subject(("country", "model"), CLIENT, FACTS, None, "gpt-4o", "eu")
    assert token_key("rg:", limit(index=1), who) == "rg:tl:{eu:1:DE:gpt-4o}"
    assert slot_key("rg:", Concurrency("eu", 3, ("country",)), "DE") == "rg:cc:{eu:DE}"
    # A rule's name cannot break the tag or pass for another rule's limit.
    assert token_key("rg:", limit(rule="a:1}"), "x") == "rg:tl:{a%3A1%7D:0:x}"
    # A rate (a string) and a quota (a hash) never meet on one key when a reload changes a limit's kind.
    assert token_key("rg:", limit(index=1, kind="quota"), who) == "rg:tq:{eu:1:DE:gpt-4o}"


# --- cost and reservation -------------------------------------------------------------------------


def test_cost_counts_as_the_limit_says() -> None:
    assert [cost(limit(count=c), 30, 12) for c in ("input", "output", "total")] == [30, 12, 42]


def test_a_reservation_is_the_estimate_plus_the_output_cap_or_the_default() -> None:
    budget = Budget("eu", (limit(count="total"), limit(index=1, count="output"), limit(index=2, count="input")))
    assert reservation(budget, 100, 50) == (150, 50, 100)
    assert reservation(budget, 100, None) == (4196, 4096, 100)
    assert reservation(Budget("eu", budget.tokens, output_default=7), 100, None) == (107, 7, 100)
    assert reservation(budget, None, 50) == (8192, 8192, 8192)  # unreadable: the whole default, everywhere


# --- GCRA with a cost -----------------------------------------------------------------------------


def test_gcra_cost_of_one_is_the_request_gcra() -> None:
    tat = None
    for now in (0.0, 0.1, 0.2, 0.3, 0.4, 5.0, 5.01):
        check, new = gcra(tat, now, 1.0, 3.0)
        token, new_t = gcra_cost(tat, now, 1.0, 3.0, 1)
        assert (token.allowed, token.remaining, token.retry_after, token.reset) == (
            check.allowed,
            check.remaining,
            check.retry_after,
            check.reset,
        )
        assert new == new_t
        tat = new


def test_gcra_cost_worked_example() -> None:
    """1000 tokens a minute, burst 1000: 0.06 s per token."""
    lim = limit()
    check, tat = gcra_cost(None, 100.0, lim.interval, lim.tolerance, 600)
    assert check.allowed and check.remaining == 400 and tat == pytest.approx(136.0)
    check, tat2 = gcra_cost(tat, 100.0, lim.interval, lim.tolerance, 500)  # 100 short
    assert not check.allowed and check.remaining == 400 and check.retry_after == pytest.approx(6.0)
    assert tat2 == tat  # a refusal changes nothing
    check, _ = gcra_cost(tat, 106.0, lim.interval, lim.tolerance, 500)  # 6 s later it fits
    assert check.allowed and check.remaining == 0
    never, same = gcra_cost(None, 100.0, lim.interval, lim.tolerance, 1001)
    assert never.never and not never.allowed and same == 100.0


@settings(max_examples=300)
@given(
    tokens=st.integers(1, 10**9),
    per=st.sampled_from([1.0, 60.0, 3600.0, 86400.0]),
    burst_share=st.floats(0.01, 1.0),
    steps=st.lists(st.tuples(st.floats(0, 120), st.integers(0, 10**9)), max_size=40),
)
def test_what_gcra_admits_never_exceeds_the_burst_plus_the_refill(
    tokens: int, per: float, burst_share: float, steps: list[tuple[float, int]]
) -> None:
    """Over any arrivals, admitted tokens from the start to any moment stay within burst + rate * time."""
    burst = max(1, int(tokens * burst_share))
    interval, tolerance = per / tokens, burst * per / tokens
    tat: float | None = None
    now, admitted = 0.0, 0
    for wait, want in steps:
        now += wait
        check, tat = gcra_cost(tat, now, interval, tolerance, want)
        if check.allowed:
            admitted += want
            assert 0 <= check.remaining <= burst
        assert check.never == (want > burst)
        assert admitted <= burst + now / interval + 1e-6 * max(1, admitted)


@settings(max_examples=200)
@given(tokens=st.integers(1, 10**7), want=st.integers(0, 10**7), idle=st.floats(0, 10**6))
def test_an_idle_subject_admits_anything_up_to_its_burst(tokens: int, want: int, idle: float) -> None:
    interval = 60.0 / tokens
    check, _ = gcra_cost(idle, 2 * 10**6, interval, tokens * interval, want)
    assert check.allowed == (want <= tokens)


def test_settling_charges_more_as_spent_now_and_gives_less_back() -> None:
    interval = 0.06
    assert gcra_settle(136.0, 100.0, interval, 0) == 136.0
    assert gcra_settle(136.0, 100.0, interval, -100) == pytest.approx(130.0)
    # A request that ran long: its overshoot is charged from now, not hidden in the time it took.
    assert gcra_settle(136.0, 500.0, interval, 100) == pytest.approx(506.0)
    assert gcra_settle(None, 500.0, interval, 100) == pytest.approx(506.0)  # the key expired meanwhile
    assert gcra_settle(None, 500.0, interval, -100) is None


# --- quotas ---------------------------------------------------------------------------------------


def test_quota_windows_are_aligned_to_the_epoch() -> None:
    assert quota_window(86400 * 20000 + 3600, 86400.0) == (20000, 82800.0)  # 01:00 UTC: 23 h left
    assert quota_window(59.5, 60.0) == (0, 0.5)
    assert quota_window(60.0, 60.0) == (1, 60.0)


def test_a_quota_empties_and_says_when_it_is_whole_again() -> None:
    check, used = quota_check(0, 1000, 600, 30.0)
    assert check.allowed and check.remaining == 400 and used == 600
    check, same = quota_check(used, 1000, 500, 30.0)
    assert not check.allowed and not check.never and check.retry_after == 30.0 and same == 600
    check, same = quota_check(used, 1000, 1001, 30.0)
    assert check.never and same == 600
    assert quota_settle(600, -700) == 0 and quota_settle(600, 50) == 650


@settings(max_examples=300)
@given(tokens=st.integers(1, 10**12), costs=st.lists(st.integers(0, 10**12), max_size=50))
def test_a_quota_never_admits_more_than_its_tokens(tokens: int, costs: list[int]) -> None:
    used = 0
    for want in costs:
        check, used = quota_check(used, tokens, want, 1.0)
        assert used <= tokens and check.remaining == tokens - used
        assert check.never == (want > tokens)


@settings(max_examples=300)
@given(
    budget=st.integers(1, 10**6),
    requests=st.lists(st.tuples(st.integers(0, 10**5), st.integers(0, 2 * 10**5)), max_size=60),
)
def test_the_overshoot_bound_holds(budget: int, requests: list[tuple[int, int]]) -> None:
    """The guarantee docs/limits.md states: whatever order reservations and settlements come in, the
    tokens admitted in a window exceed the budget by at most the overshoot of the requests whose real
    usage exceeded their reservation."""
    used, in_flight, overshoot = 0, [], 0
    for reserved, actual in requests:
        check, used = quota_check(used, budget, reserved, 1.0)
        if check.allowed:
            in_flight.append((reserved, actual))
        if len(in_flight) > 3:  # settle the oldest: some overlap, as concurrent requests do
            held, real = in_flight.pop(0)
            used = quota_settle(used, real - held)
            overshoot += max(0, real - held)
    for held, real in in_flight:
        used = quota_settle(used, real - held)
        overshoot += max(0, real - held)
    assert used <= budget + overshoot
    assert math.isfinite(used)
