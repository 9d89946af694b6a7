from __future__ import annotations

import ipaddress

import pytest

from gateway.cidrs import CidrSet, parse_network
from gateway.clientip import parse_address


def test_membership_after_merging() -> None:
    s = CidrSet(["10.0.0.0/9", "10.128.0.0/9", "192.168.1.0/24", "2001:db8::/32"])
    assert parse_address("10.200.1.1") in s
    assert parse_address("192.168.1.255") in s
    assert parse_address("192.168.2.0") not in s
    assert parse_address("2001:db8:1::1") in s
    assert parse_address("2001:db9::1") not in s
    assert parse_address("::ffff:10.0.0.1") in s  # normalised to IPv4 before asking


def test_mapped_network_is_stored_as_ipv4() -> None:
    assert parse_network("::ffff:10.0.0.0/104") == ipaddress.ip_network("10.0.0.0/8")
    assert parse_address("10.9.9.9") in CidrSet(["::ffff:10.0.0.0/104"])


def test_host_bits_set_is_an_error() -> None:
    with pytest.raises(ValueError):
        parse_network("10.0.0.5/8")


def test_covers() -> None:
    s = CidrSet(["10.0.0.0/8"])
    assert s.covers(ipaddress.ip_network("10.1.0.0/16"))
    assert not s.covers(ipaddress.ip_network("11.0.0.0/16"))
    assert not s.covers(ipaddress.ip_network("0.0.0.0/0"))


def test_large_sets_stay_correct() -> None:
    nets = [f"10.{i}.{j}.0/24" for i in range(0, 40, 2) for j in range(0, 250, 5)]
    s = CidrSet(nets)
    for i in range(40):
        for j in range(0, 250, 5):
            assert (parse_address(f"10.{i}.{j}.7") in s) == (i % 2 == 0)
