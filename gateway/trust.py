"""How far a trusted-proxy list reaches into the public internet.

Whoever is trusted may write the client address, so trusting a public range
lets everyone in it choose the country they are judged as. Trusting all of
it (``0.0.0.0/0``, ``::/0``, or blocks that add up to the same) turns the
gateway's address check off; a wide public block is usually a typo for a
narrow one. Both are told to the operator before anything listens.
"""

from __future__ import annotations

import ipaddress

from .addresses import IPNetwork
from .cidrs import CidrSet
from .clientip import NOT_UNICAST_RANGES, PRIVATE_RANGES

# Widest public blocks that are still plausibly "our proxies" (a cloud region, a CDN's range).
WIDEST_PUBLIC = {4: 16, 6: 32}

_V4_ALL = ipaddress.IPv4Network("0.0.0.0/0")
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")  # every IPv6 address in use on the internet


def _networks(ranges: tuple[tuple[int, int], ...], version: int) -> list[IPNetwork]:
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    out: list[IPNetwork] = []
    for lo, hi in ranges:
        out += ipaddress.summarize_address_range(cls(lo), cls(hi))
    return out


# Addresses that are never judged as public clients: private, loopback, link-local, ULA,
# not unicast, and (IPv4) the reserved 240.0.0.0/4.
_NOT_PUBLIC: dict[int, list[IPNetwork]] = {
    v: [*_networks(PRIVATE_RANGES[v], v), *_networks(NOT_UNICAST_RANGES[v], v)] for v in (4, 6)
}
_NOT_PUBLIC[4].append(ipaddress.IPv4Network("240.0.0.0/4"))
_NOT_PUBLIC_SETS = {v: CidrSet(nets) for v, nets in _NOT_PUBLIC.items()}


def trusts_everyone(trusted: CidrSet) -> list[int]:
    """The IP versions (4, 6) for which the list covers every public address."""
    out = []
    v4 = [n for n in trusted.networks if n.version == 4]
    if v4 and CidrSet([*v4, *_NOT_PUBLIC[4]]).covers(_V4_ALL):
        out.append(4)
    if trusted.covers(_V6_GLOBAL_UNICAST):
        out.append(6)
    return out


def wide_public(trusted: CidrSet) -> list[IPNetwork]:
    """Blocks wider than :data:`WIDEST_PUBLIC` that hold public addresses."""
    return [
        n
        for n in trusted.networks
        if n.prefixlen < WIDEST_PUBLIC[n.version] and not _NOT_PUBLIC_SETS[n.version].covers(n)
    ]
