"""Client address: parsing, normalisation, trust, and the walk from the right."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.cidrs import CidrSet
from gateway.clientip import (
    INVALID,
    MISSING,
    PRIVATE,
    PUBLIC,
    AddressError,
    ClientIPConfig,
    classify,
    parse_address,
    resolve,
    split_forwarded,
)

V4 = ipaddress.IPv4Address


@pytest.mark.parametrize(
    "text",
    [
        "175.16.199.1",
        " 175.16.199.1 ",
        "175.16.199.1:443",
        "::ffff:175.16.199.1",  # IPv4-mapped
        "::ffff:afb0:c701".replace("afb0", "af10"),  # the same, in hex
        "[::ffff:175.16.199.1]",
        "[::ffff:175.16.199.1]:8443",
        "::175.16.199.1",  # IPv4-compatible
        "2002:af10:c701::1",  # 6to4
        "2002:af10:c701:1234:5678::9",
        "64:ff9b::175.16.199.1",  # NAT64 well-known prefix
        "64:ff9b::af10:c701",
        "::ffff:175.16.199.1%eth0",  # zone id
    ],
)
def test_ipv4_in_any_costume_is_the_ipv4_address(text: str) -> None:
    assert parse_address(text) == V4("175.16.199.1")


def test_teredo_carries_the_client_ipv4() -> None:
    # Teredo: server 65.54.227.120, client 192.0.2.45 (obfuscated as 3fff:fdd2)
    assert parse_address("2001:0000:4136:e378:8000:63bf:3fff:fdd2") == V4("192.0.2.45")


@pytest.mark.parametrize(
    "text",
    ["2001:250::1", "[2001:250::1]:443", "2001:250::1%3", "fe80::1%eth0"],
)
def test_plain_ipv6_stays_ipv6(text: str) -> None:
    assert parse_address(text).version == 6


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  ",
        "unknown",
        "_hidden",
        "1.2.3",
        "1.2.3.4.5",
        "256.1.1.1",
        "1.2.3.4:port",
        "1.2.3.4:",
        "[::1",
        "[::1]x",
        "::1::2",
        "a" * 100,
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "255.255.255.255",
        "ff02::1",
        "1.2.3.4/24",
        "١٢٣.1.1.1",
    ],
)
def test_malformed_or_non_unicast_is_an_address_error(text: str) -> None:
    with pytest.raises(AddressError):
        parse_address(text)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("10.1.2.3", PRIVATE),
        ("172.16.0.1", PRIVATE),
        ("172.31.255.255", PRIVATE),
        ("192.168.1.1", PRIVATE),
        ("127.0.0.1", PRIVATE),
        ("169.254.1.1", PRIVATE),
        ("::1", PRIVATE),
        ("fe80::1", PRIVATE),
        ("fd00::1", PRIVATE),
        ("fc00::1", PRIVATE),
        ("::ffff:10.0.0.1", PRIVATE),
        ("2002:a00:1::", PRIVATE),
        ("172.32.0.1", PUBLIC),
        ("8.8.8.8", PUBLIC),
        ("2001:250::1", PUBLIC),
        ("203.0.113.5", PUBLIC),
    ],
)
def test_classify(text: str, kind: str) -> None:
    assert classify(parse_address(text)) == kind


@given(st.integers(min_value=0x01000000, max_value=0xDFFFFFFF))
def test_every_ipv6_form_of_an_ipv4_address_normalises_to_it(value: int) -> None:
    v4 = V4(value)
    forms = [
        f"::ffff:{v4}",
        f"[::ffff:{v4}]:443",
        f"::{v4}",
        str(ipaddress.IPv6Address((0x2002 << 112) | (value << 80) | 1)),
        f"64:ff9b::{v4}",
    ]
    for form in forms:
        assert parse_address(form) == v4, form


TRUST_LOOPBACK = ClientIPConfig(CidrSet(["127.0.0.0/8", "10.0.0.0/8"]))


def xff(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-for", value.encode())]


def test_untrusted_peer_headers_are_ignored() -> None:
    c = resolve("198.51.100.7", xff("81.2.69.142"), TRUST_LOOPBACK)
    assert (c.ip, c.via) == (V4("198.51.100.7"), "peer")


def test_no_trusted_proxies_by_default_means_headers_never_count() -> None:
    c = resolve("127.0.0.1", xff("81.2.69.142"), ClientIPConfig(CidrSet()))
    assert (c.ip, c.kind, c.via) == (V4("127.0.0.1"), PRIVATE, "peer")


def test_trusted_peer_walks_from_the_right_skipping_trusted_hops() -> None:
    # The client wrote "6.6.6.6" itself; 81.2.69.142 is what our first proxy saw.
    c = resolve("127.0.0.1", xff("6.6.6.6, 81.2.69.142, 10.1.1.1"), TRUST_LOOPBACK)
    assert (c.ip, c.kind, c.via) == (V4("81.2.69.142"), PUBLIC, "x-forwarded-for")


def test_repeated_headers_are_one_list_in_order() -> None:
    headers = xff("6.6.6.6") + xff("81.2.69.142, 10.0.0.2")
    assert resolve("127.0.0.1", headers, TRUST_LOOPBACK).ip == V4("81.2.69.142")


def test_mapped_peer_is_trusted_like_its_ipv4_form() -> None:
    assert resolve("::ffff:127.0.0.1", xff("81.2.69.142"), TRUST_LOOPBACK).ip == V4("81.2.69.142")


def test_all_hops_trusted_gives_the_leftmost_as_missing() -> None:
    # Only our own proxies in the header: nobody named a client (issue 5, item 3).
    c = resolve("127.0.0.1", xff("10.0.0.2, 10.0.0.3"), TRUST_LOOPBACK)
    assert (c.ip, c.kind) == (V4("10.0.0.2"), MISSING)


def test_garbage_left_of_the_client_is_never_read() -> None:
    assert resolve("127.0.0.1", xff("garbage, 81.2.69.142"), TRUST_LOOPBACK).ip == V4("81.2.69.142")


@pytest.mark.parametrize("value", ["garbage", "81.2.69.142, ", "1.2.3.4.5, 10.0.0.1", "unknown"])
def test_malformed_hop_where_the_client_should_be_is_invalid(value: str) -> None:
    c = resolve("127.0.0.1", xff(value), TRUST_LOOPBACK)
    assert c.kind == INVALID and c.ip is None and c.problem


def test_ipv6_forms_in_the_header_are_normalised() -> None:
    assert resolve("127.0.0.1", xff("[2002:af10:c701::1]:1234"), TRUST_LOOPBACK).ip == V4("175.16.199.1")


def test_missing_peer_is_invalid() -> None:
    assert resolve(None, [], TRUST_LOOPBACK).kind == INVALID


def test_rfc7239_forwarded() -> None:
    cfg = ClientIPConfig(CidrSet(["127.0.0.1/32"]), "forwarded")
    header = b'for=6.6.6.6, for="[2001:db8:cafe::17]:4711";proto=https, for=81.2.69.142;by=127.0.0.1'
    assert resolve("127.0.0.1", [(b"forwarded", header)], cfg).ip == V4("81.2.69.142")
    assert resolve("127.0.0.1", [(b"forwarded", b'for="_hidden"')], cfg).kind == INVALID
    assert resolve("127.0.0.1", [(b"forwarded", b"proto=https")], cfg).kind == INVALID


def test_forwarded_quoted_separators() -> None:
    assert split_forwarded(['for="a,b;c";proto=x, for=1.2.3.4']) == ["a,b;c", "1.2.3.4"]


def test_single_value_header() -> None:
    cfg = ClientIPConfig(CidrSet(["127.0.0.1/32"]), "cf-connecting-ip")
    assert resolve("127.0.0.1", [(b"cf-connecting-ip", b"81.2.69.142")], cfg).ip == V4("81.2.69.142")
    # X-Forwarded-For is not what this deployment trusts
    assert resolve("127.0.0.1", xff("81.2.69.142"), cfg).ip == V4("127.0.0.1")
    twice = [(b"cf-connecting-ip", b"81.2.69.142"), (b"cf-connecting-ip", b"6.6.6.6")]
    assert resolve("127.0.0.1", twice, cfg).kind == INVALID


@given(st.text(max_size=200))
def test_any_header_text_gives_a_result_never_an_exception(text: str) -> None:
    c = resolve("127.0.0.1", [(b"x-forwarded-for", text.encode("utf-8", "replace"))], TRUST_LOOPBACK)
    assert c.kind in (PUBLIC, PRIVATE, INVALID, MISSING)
    assert (c.ip is None) == (c.kind == INVALID)
    if c.kind == MISSING:  # only a trusted proxy's own address stands in for a missing client
        assert c.ip is not None and c.ip in TRUST_LOOPBACK.trusted


# --- X-Forwarded-For: quotes and stray bytes mean nothing, and never reach past a comma ----------


@given(st.text(max_size=60))
def test_property_client_text_never_reaches_past_the_appended_hop(client_text: str) -> None:
    # The proxy appended ", 175.16.199.1"; whatever the client wrote before it is not read.
    value = (client_text + ", 175.16.199.1").encode("utf-8")
    c = resolve("127.0.0.1", [(b"x-forwarded-for", value)], TRUST_LOOPBACK)
    assert (c.ip, c.kind) == (V4("175.16.199.1"), PUBLIC)


@pytest.mark.parametrize(
    "hop",
    ['"81.2.69.142"', '81.2.69.142"', "81.2.69.142\x0b", "\x8581.2.69.142", "81.2.69.142\x00", "81.2.69.142;x"],
)
def test_stray_bytes_in_the_client_hop_make_it_invalid(hop: str) -> None:
    c = resolve("127.0.0.1", [(b"x-forwarded-for", hop.encode("latin-1"))], TRUST_LOOPBACK)
    assert c.kind == INVALID and c.problem


def test_a_quote_in_client_text_does_not_swallow_the_appended_hop() -> None:
    c = resolve("127.0.0.1", xff('81.2.69.142", 175.16.199.1'), TRUST_LOOPBACK)
    assert c.ip == V4("175.16.199.1")
