"""Trusting everyone is refused; trusting a wide public range is warned about."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest

from gateway.cidrs import CidrSet
from gateway.trust import trusts_everyone, wide_public
from support.processes import Gateway, GatewayFactory, Stub


@pytest.mark.parametrize(
    ("nets", "everyone"),
    [
        (["0.0.0.0/0"], [4]),
        (["::/0"], [6]),
        (["0.0.0.0/0", "::/0"], [4, 6]),
        (["0.0.0.0/1", "128.0.0.0/1"], [4]),  # adds up to everything
        (["1.0.0.0/8", "2.0.0.0/7", "4.0.0.0/6", "8.0.0.0/5", "16.0.0.0/4", "32.0.0.0/3", "64.0.0.0/2",
          "128.0.0.0/2", "192.0.0.0/3"], [4]),  # every public unicast block, without 0/8 and 224/3
        (["::ffff:0:0/96"], [4]),  # mapped: all of IPv4
        (["2000::/3"], [6]),  # every IPv6 address in use
        (["0.0.0.0/1"], []),
        (["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "fc00::/7", "::1/128"], []),
        ([], []),
    ],
)  # fmt: skip
def test_trusts_everyone(nets: list[str], everyone: list[int]) -> None:
    assert trusts_everyone(CidrSet(nets)) == everyone


@pytest.mark.parametrize(
    ("nets", "wide"),
    [
        (["1.0.0.0/8"], ["1.0.0.0/8"]),
        (["172.0.0.0/8"], ["172.0.0.0/8"]),  # holds 172.16/12, but public addresses too
        (["203.0.0.0/15"], ["203.0.0.0/15"]),
        (["203.0.0.0/16", "198.51.100.0/24"], []),
        (["10.0.0.0/8", "172.16.0.0/12", "100.64.0.0/16"], []),
        (["fc00::/7", "fe80::/10"], []),
        (["2001:db8::/31"], ["2001:db8::/31"]),
        (["2001:db8::/32"], []),
    ],
)
def test_wide_public(nets: list[str], wide: list[str]) -> None:
    assert [str(n) for n in wide_public(CidrSet(nets))] == wide


def readyz(gw: Gateway) -> dict[str, Any]:
    with urllib.request.urlopen(gw.admin + "/readyz", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "args",
    [
        ["--trusted-proxy", "0.0.0.0/0"],
        ["--trusted-proxy", "::/0"],
        ["--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "::/0"],
        ["--trusted-proxy", "0.0.0.0/1", "--trusted-proxy", "128.0.0.0/1"],
        ["--trusted-proxy", "::ffff:0:0/96"],
    ],
)
def test_trust_all_is_refused_with_one_line(gateway: GatewayFactory, stub: Stub, args: list[str]) -> None:
    gw = gateway("--upstream", stub.url, *args, wait=False)
    assert gw.proc.wait(timeout=15) == 2
    err = gw.stderr()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "--allow-trust-all" in line]
    assert len(lines) == 1 and "--trusted-proxy" in lines[0] and "every public" in lines[0], err


def test_trust_all_via_the_environment_is_refused_too(gateway: GatewayFactory, stub: Stub) -> None:
    gw = gateway("--upstream", stub.url, env={"REGIONGATE_TRUSTED_PROXY": "0.0.0.0/0"}, wait=False)
    assert gw.proc.wait(timeout=15) == 2 and "--allow-trust-all" in gw.stderr()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_trust_all_when_allowed_starts_and_warns(gateway: GatewayFactory, stub: Stub, how: str) -> None:
    if how == "flag":
        gw = gateway("--upstream", stub.url, "--trusted-proxy", "0.0.0.0/0", "--allow-trust-all")
    else:
        gw = gateway("--upstream", stub.url, "--trusted-proxy", "0.0.0.0/0", env={"REGIONGATE_ALLOW_TRUST_ALL": "1"})
    warnings = readyz(gw)["warnings"]
    assert any("0.0.0.0/0" in w and "every public IPv4" in w for w in warnings)
    assert "warning: --trusted-proxy 0.0.0.0/0" in gw.stderr()


def test_bad_allow_trust_all_value_is_a_clear_error(gateway: GatewayFactory, stub: Stub) -> None:
    gw = gateway("--upstream", stub.url, env={"REGIONGATE_ALLOW_TRUST_ALL": "perhaps"}, wait=False)
    assert gw.proc.wait(timeout=15) == 2
    # One line naming the variable that was wrong, in plain words (errors name their source).
    err = gw.stderr()
    assert "REGIONGATE_ALLOW_TRUST_ALL: must be true or false" in err and "Traceback" not in err


def test_wide_public_ranges_warn_at_startup_and_in_readyz(gateway: GatewayFactory, stub: Stub) -> None:
    gw = gateway(
        "--upstream", stub.url,
        "--trusted-proxy", "1.0.0.0/8", "--trusted-proxy", "2001:db8::/31",
        "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "198.51.100.0/24",
    )  # fmt: skip
    warnings = [w for w in readyz(gw)["warnings"] if "--trusted-proxy" in w]
    assert len(warnings) == 2
    assert "1.0.0.0/8" in warnings[0] and "wider than /16" in warnings[0]
    assert "2001:db8::/31" in warnings[1] and "wider than /32" in warnings[1]
    for w in warnings:
        assert f"warning: {w}" in gw.stderr()


def test_narrow_or_private_trust_has_no_trust_warning(gateway: GatewayFactory, stub: Stub) -> None:
    gw = gateway("--upstream", stub.url, "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "203.0.113.0/24")
    assert not [w for w in readyz(gw)["warnings"] if "--trusted-proxy" in w]
