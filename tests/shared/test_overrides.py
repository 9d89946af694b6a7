"""Runtime overrides: the pure judgement, then a real gateway with overrides in memory (no Redis)."""

from __future__ import annotations

import ipaddress
import time

import pytest

from gateway.clientip import PRIVATE, PUBLIC, ClientAddress
from gateway.geo import GeoFacts
from gateway.policy.callerkey import bearer_token, hash_key
from gateway.policy.overrides import (
    EMPTY,
    OverrideError,
    compile_overrides,
    judge,
    new_override,
    request_key_hash,
)
from support.overrides import (
    AUTH,
    CN,
    GB,
    add,
    list_ids,
    overrides_gateway,
    remove,
    status_of,
    wait_for,
)
from support.processes import GatewayFactory, Stub

KEY = b"k" * 32


def client(ip: str) -> ClientAddress:
    return ClientAddress(ipaddress.ip_address(ip), PUBLIC, "peer", ip)


def test_no_overrides_means_the_policy_decides() -> None:
    assert judge(EMPTY, client("1.2.3.4"), GeoFacts(country="CN"), None) is None


def test_cidr_override_names_itself_and_its_reason() -> None:
    o = new_override("deny", "cidr", "203.0.113.0/24", "abuse ticket 42", "alice", id="t1")
    d = judge(compile_overrides([o], time.time()), client("203.0.113.9"), GeoFacts(country="GB"), None)
    assert d is not None
    assert (d.verdict, d.rule) == ("deny", "override:t1")
    assert "abuse ticket 42" in d.reason and "alice" in d.reason
    assert judge(compile_overrides([o], time.time()), client("203.0.114.9"), GeoFacts(), None) is None


def test_ipv4_written_as_ipv6_gets_the_same_override() -> None:
    o = new_override("deny", "cidr", "::ffff:203.0.113.0/120", "x", "y", id="m")
    assert o.value == "203.0.113.0/24"
    c = compile_overrides([o], time.time())
    assert judge(c, client("203.0.113.1"), GeoFacts(), None) is not None


def test_narrowest_kind_wins_and_deny_beats_allow_within_a_kind() -> None:
    now = time.time()
    allow_gb = new_override("allow", "country", "gb", "open", "a", id="c")
    deny_net = new_override("deny", "cidr", "10.0.0.0/8", "bad net", "a", id="n")
    allow_host = new_override("allow", "cidr", "10.1.2.3/32", "customer", "a", id="h")
    deny_key = new_override("deny", "api_key", "sk-abc", "leaked", "a", id="k", key=KEY)
    c = compile_overrides([allow_gb, deny_net, allow_host, deny_key], now)
    facts = GeoFacts(country="GB")
    assert judge(c, client("192.0.2.1"), facts, None).rule == "override:c"  # type: ignore[union-attr]
    assert judge(c, client("10.1.2.3"), facts, None).rule == "override:n"  # type: ignore[union-attr]
    assert judge(c, client("10.1.2.3"), facts, hash_key(KEY, "sk-abc")).rule == "override:k"  # type: ignore[union-attr]
    assert judge(c, ClientAddress(ipaddress.ip_address("10.1.2.3"), PRIVATE, "peer", ""), GeoFacts(), None) is not None


def test_subdivision_override() -> None:
    o = new_override("deny", "subdivision", "gb-eng", "r", "b", id="s")
    c = compile_overrides([o], time.time())
    assert judge(c, client("81.2.69.160"), GeoFacts(country="GB", subdivisions=("GB-ENG",)), None) is not None
    assert judge(c, client("81.2.69.160"), GeoFacts(country="GB", subdivisions=("GB-SCT",)), None) is None


def test_expired_overrides_are_not_compiled() -> None:
    o = new_override("deny", "country", "CN", "r", "b", id="e", ttl=10, created_at=1000.0)
    assert compile_overrides([o], 1005.0).next_expiry == 1010.0
    assert not compile_overrides([o], 1010.0)


def test_the_api_key_is_never_kept() -> None:
    o = new_override("deny", "api_key", "sk-secret-token", "r", "b", key=KEY)
    assert "sk-secret-token" not in repr(o) and "sk-secret-token" not in str(o.as_dict())
    assert o.value == hash_key(KEY, "sk-secret-token")
    c = compile_overrides([o], time.time())
    assert request_key_hash(c, KEY, [(b"authorization", b"Bearer sk-secret-token")]) == o.value
    assert request_key_hash(EMPTY, KEY, [(b"authorization", b"Bearer sk-secret-token")]) is None
    assert bearer_token([(b"Authorization", b"Basic abc")]) is None


@pytest.mark.parametrize(
    ("kind", "value", "problem"),
    [
        ("cidr", "10.0.0.5/8", "host bits"),
        ("cidr", "nonsense", "cidr"),
        ("country", "GBR", "two-letter"),
        ("subdivision", "ENG", "ISO 3166-2"),
        ("api_key", "sk", "not known"),
    ],
)
def test_bad_overrides_say_what_is_wrong(kind: str, value: str, problem: str) -> None:
    with pytest.raises(OverrideError, match=problem):
        new_override("deny", kind, value, "r", "b")


# --- a real gateway, overrides in memory ---------------------------------------------------------


def test_memory_override_added_enforced_listed_and_removed(gateway: GatewayFactory, stub: Stub) -> None:
    gw = overrides_gateway(gateway, stub)
    assert status_of(gw, GB) == 200
    o = add(gw, {"action": "deny", "cidr": "2.125.160.0/24", "reason": "abuse #7", "by": "oncall"})
    assert o["rule"] == f"override:{o['id']}"
    assert status_of(gw, GB) == 403  # this process applied it before answering
    line = gw.wait_log(2)[-1]
    assert line["rule"] == f"override:{o['id']}" and line["decision"] == "deny"
    assert f'rule="override:{o["id"]}"' in gw.metrics()
    assert 'regiongate_overrides_active{kind="cidr"} 1.0' in gw.metrics()
    assert o["id"] in list_ids(gw)
    remove(gw, o["id"])
    assert status_of(gw, GB) == 200
    assert 'regiongate_overrides_active{kind="cidr"} 0.0' in gw.metrics()


def test_memory_allow_override_lifts_a_policy_block(gateway: GatewayFactory, stub: Stub) -> None:
    gw = overrides_gateway(gateway, stub)
    assert status_of(gw, CN) == 403
    add(gw, {"action": "allow", "country": "CN", "reason": "customer pilot"})
    assert status_of(gw, CN) == 200


def test_memory_api_key_override(gateway: GatewayFactory, stub: Stub) -> None:
    gw = overrides_gateway(gateway, stub)
    o = add(gw, {"action": "deny", "api_key": "sk-leaked-0001", "reason": "leaked key"})
    assert o["value"].startswith("hmac-sha256:") and "sk-leaked" not in str(o)
    assert status_of(gw, GB, token="sk-leaked-0001") == 403
    assert status_of(gw, GB, token="sk-other") == 200
    assert "sk-leaked-0001" not in gw.stderr() and "sk-leaked-0001" not in gw.access_log.read_text()


def test_memory_override_expires(gateway: GatewayFactory, stub: Stub) -> None:
    gw = overrides_gateway(gateway, stub)
    add(gw, {"action": "deny", "country": "GB", "reason": "brief", "ttl": 1})
    assert status_of(gw, GB) == 403
    wait_for(lambda: status_of(gw, GB) == 200, 10, "the override to expire")
    assert list_ids(gw) == []


def test_explain_shows_the_override_and_its_reason(gateway: GatewayFactory, stub: Stub) -> None:
    import httpx

    gw = overrides_gateway(gateway, stub)
    o = add(gw, {"action": "deny", "subdivision": "GB-ENG", "reason": "regional hold"})
    r = httpx.get(gw.admin + "/admin/explain", params={"ip": "81.2.69.160"}, headers=AUTH).json()
    assert r["decision"] == "deny" and r["rule"] == f"override:{o['id']}"
    assert "regional hold" in r["reason"] and r["override"]["id"] == o["id"]


def test_bad_override_bodies_get_422_and_unknown_ids_404(gateway: GatewayFactory, stub: Stub) -> None:
    import httpx

    gw = overrides_gateway(gateway, stub)
    for body in (
        {"action": "deny", "reason": "none given"},
        {"action": "deny", "cidr": "10.0.0.1/8", "reason": "x"},
        {"action": "deny", "country": "GB", "cidr": "10.0.0.0/8", "reason": "two"},
        {"action": "maybe", "country": "GB", "reason": "x"},
    ):
        r = httpx.post(gw.admin + "/admin/overrides", json=body, headers=AUTH)
        assert r.status_code == 422, body
    assert httpx.delete(gw.admin + "/admin/overrides/nope", headers=AUTH).status_code == 404
    assert httpx.get(gw.admin + "/admin/overrides").status_code == 401


def test_workers_without_redis_warn_that_overrides_are_per_worker(gateway: GatewayFactory, stub: Stub) -> None:
    gw = overrides_gateway(gateway, stub, "--workers", "2")
    assert "--workers 2 without --redis: each worker keeps its own runtime overrides" in gw.stderr()
    single = overrides_gateway(gateway, stub)
    assert "without --redis" not in single.stderr()
    assert "overrides: in this process's memory" in single.stderr()
