"""IPv6 prefixes that carry IPv4 addresses: the same decision as the IPv4 form, and no dead CIDRs."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.cidrs import CidrSet, parse_network
from gateway.clientip import EMBEDDINGS, normalize, parse_address
from gateway.geo import Geo
from gateway.policy import judge_ip, parse_policy
from gateway.yamlfile import FileError
from support.processes import CITY, GatewayFactory, Stub, write

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
GB, SE, CN = "2.125.160.216", "89.160.20.112", "175.16.199.1"


def forms(v4: str) -> dict[str, str]:
    """Every IPv6 spelling of an IPv4 address the gateway normalises."""
    value = int(V4(v4))
    return {
        "mapped": f"::ffff:{v4}",
        "siit": f"::ffff:0:{v4}",
        "compat": f"::{v4}",
        "nat64": f"64:ff9b::{v4}",
        "nat64-local": f"64:ff9b:1::{v4}",
        "nat64-local-subnet": str(V6((0x0064FF9B0001 << 80) | (0xBEEF << 48) | value)),
        "6to4": str(V6((0x2002 << 112) | (value << 80) | 0x1234)),
        # Teredo: server 65.54.227.120, flags and port, then the client's address with every bit flipped
        "teredo": str(V6((0x20010000_4136E378_8000_63BF << 32) | (~value & 0xFFFFFFFF))),
    }


@pytest.mark.parametrize("form", sorted(forms(CN)))
def test_each_form_normalises_to_the_ipv4_address(form: str) -> None:
    assert parse_address(forms(CN)[form]) == V4(CN)
    assert parse_address(f"[{forms(CN)[form]}]:443") == V4(CN)


@given(st.integers(min_value=0x01000000, max_value=0xDFFFFFFF))
def test_property_every_form_of_every_address_normalises(value: int) -> None:
    v4 = str(V4(value))
    for name, text in forms(v4).items():
        assert parse_address(text) == V4(value), name


@pytest.mark.parametrize("text", ["::1", "2001:db8::1", "64:ff9b:2::1", "::fffe:0:1:2", "2003::1", "2001:1::1"])
def test_neighbours_of_the_prefixes_stay_ipv6(text: str) -> None:
    assert normalize(ipaddress.IPv6Address(text)).version == 6


POLICY = """\
version: 1
defaults: {action: deny, unknown: deny, private: allow, invalid: deny}
rules:
  - {name: office, cidrs: [175.16.199.0/24], paths: [/v1/embeddings], action: allow}
  - {name: supported, countries: [GB, SE], action: allow}
"""


@pytest.fixture(scope="module")
def city() -> Geo:
    return Geo([CITY])


@pytest.mark.parametrize("v4", [GB, SE, CN, "10.1.2.3", "214.1.1.1"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
def test_each_form_gets_the_ipv4_forms_decision_and_facts(city: Geo, v4: str, path: str) -> None:
    policy = parse_policy(POLICY, "p.yaml", city.capabilities)
    _, facts, expected = judge_ip(policy, city, v4, path)
    for name, text in forms(v4).items():
        _, f, d = judge_ip(policy, city, text, path)
        assert (d.verdict, d.rule, f) == (expected.verdict, expected.rule, facts), name


# --- CIDRs inside the prefixes can never match: load-time errors naming the IPv4 form ------------


@pytest.mark.parametrize(
    ("cidr", "prefix", "ipv4"),
    [
        ("2002:af10:c700::/40", "6to4", "175.16.199.0/24"),
        ("2002:af10:c701:1::/64", "6to4", "175.16.199.1/32"),
        ("64:ff9b::af10:c700/120", "NAT64", "175.16.199.0/24"),
        ("64:ff9b:1::af10:c700/120", "local-use NAT64", "175.16.199.0/24"),
        ("::ffff:0:af10:c700/120", "SIIT", "175.16.199.0/24"),
        ("::af10:c700/120", "IPv4-compatible", "175.16.199.0/24"),
        ("2001:0:4136:e378:8000:63bf:50ef:3800/120", "Teredo", "175.16.199.0/24"),
    ],
)
def test_cidr_inside_a_transition_prefix_is_an_error_naming_the_ipv4_form(cidr: str, prefix: str, ipv4: str) -> None:
    with pytest.raises(ValueError, match=f"{prefix}.*write {ipv4} instead"):
        parse_network(cidr)
    # ... and the IPv4 form it names is what the addresses in it are judged as.
    inside = ipaddress.IPv6Network(cidr)[1]
    assert parse_address(str(inside)) in CidrSet([ipv4])


@pytest.mark.parametrize("cidr", ["2002::/16", "2001::/32", "64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96"])
def test_a_whole_transition_prefix_is_an_error_too(cidr: str) -> None:
    with pytest.raises(ValueError, match="every IPv4 address"):
        parse_network(cidr)


@pytest.mark.parametrize("cidr", ["::1/128", "::/127", "2001:db8::/32", "2000::/3", "2001::/31", "64:ff9b::/95"])
def test_networks_that_can_match_are_fine(cidr: str) -> None:
    assert parse_network(cidr).version == 6


def test_mapped_networks_still_mean_their_ipv4_network() -> None:
    assert parse_network("::ffff:175.16.199.0/120") == ipaddress.ip_network("175.16.199.0/24")


def test_every_embedding_is_covered_by_the_tests() -> None:
    assert len(EMBEDDINGS) == 7


def test_policy_names_file_line_and_the_ipv4_form() -> None:
    text = textwrap.dedent("""\
        version: 1
        rules:
          - name: office
            cidrs:
              - 203.0.113.0/24
              - "2002:cb00:7100::/40"
            action: allow
        """)
    with pytest.raises(FileError) as e:
        parse_policy(text, "p.yaml")
    assert "p.yaml:6: rules[0].cidrs: '2002:cb00:7100::/40'" in e.value.render()
    assert "write 203.0.113.0/24 instead" in e.value.render()


def test_trusted_proxy_in_a_transition_prefix_stops_startup_with_one_line(gateway: GatewayFactory) -> None:
    gw = gateway("--trusted-proxy", "2002:7f00::/24", wait=False)
    assert gw.proc.wait(timeout=15) == 2
    err = gw.stderr()
    assert "--trusted-proxy" in err and "write 127.0.0.0/8 instead" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "2002:7f00::/24" in line]) == 1


# --- through a running gateway with a real City database ------------------------------------------


def test_running_gateway_judges_every_form_like_the_ipv4_address(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path
) -> None:
    policy = write(tmp_path, "p.yaml", POLICY)
    gw = gateway("--policy", policy, "--geoip", CITY, "--upstream", stub.url, "--trusted-proxy", "127.0.0.1/32")
    sent = 0
    for v4, status in ((CN, 403), (GB, 200)):
        for name, text in {"ipv4": v4, **forms(v4)}.items():
            r = httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": text})
            assert r.status_code == status, (v4, name)
            sent += 1
    lines = gw.wait_log(sent)
    assert {(line["client"], line["country"]) for line in lines} == {(CN, "CN"), (GB, "GB")}
