"""Sets of CIDR blocks that answer "is this address inside?" in O(log n).

Used for trusted proxies and for ``cidrs:`` rules. Blocks are merged into
sorted, disjoint integer ranges, so a list of ten thousand blocks costs one
bisect per lookup. An IPv4-mapped IPv6 block (``::ffff:10.0.0.0/104``) is
stored as the IPv4 block it means, because addresses are normalised to IPv4
before they are asked about.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable

from .addresses import EMBEDDINGS, Embedding, IPAddress, IPNetwork, embedding


def parse_network(text: str | IPNetwork) -> IPNetwork:
    """A CIDR block; host bits set is an error, since ``10.0.0.5/8`` is usually a typo.

    A block inside an IPv6 prefix that carries IPv4 addresses (6to4, NAT64,
    Teredo, ...) is an error too: addresses there are normalised to their
    IPv4 form before any set is asked, so the block could never match. The
    message names the IPv4 block to write instead. IPv4-mapped blocks are
    the exception, kept for compatibility: they are stored as the IPv4 block
    they mean.
    """
    net = ipaddress.ip_network(text.strip(), strict=True) if isinstance(text, str) else text
    if isinstance(net, ipaddress.IPv6Network):
        e = embedding(int(net.network_address))
        if e is not None and net.subnet_of(e.network):
            v4 = _ipv4_form(net, e)
            if e is EMBEDDINGS[0]:  # IPv4-mapped
                return v4
            hint = (
                f"write {v4} instead"
                if v4.prefixlen
                else "it stands for every IPv4 address, so write the IPv4 networks you mean instead"
            )
            raise ValueError(
                f"{net} is inside the {e.name} prefix {e.network}, whose addresses are judged as the "
                f"IPv4 address they carry, so it can never match: {hint}"
            )
    return net


def _ipv4_form(net: ipaddress.IPv6Network, e: Embedding) -> ipaddress.IPv4Network:
    """The IPv4 block that the addresses of ``net`` normalise to."""
    first_bit = 128 - e.shift - 32  # where the IPv4 address starts, counted from the left
    length = min(max(net.prefixlen - first_bit, 0), 32)
    mask = (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF
    return ipaddress.IPv4Network((e.ipv4(int(net.network_address)) & mask, length))


def _merge(nets: Iterable[IPNetwork]) -> tuple[list[int], list[int]]:
    spans = sorted((int(n.network_address), int(n.broadcast_address)) for n in nets)
    starts: list[int] = []
    ends: list[int] = []
    for lo, hi in spans:
        if ends and lo <= ends[-1] + 1:
            ends[-1] = max(ends[-1], hi)
        else:
            starts.append(lo)
            ends.append(hi)
    return starts, ends


class CidrSet:
    __slots__ = ("_v4", "_v6", "networks")

    def __init__(self, networks: Iterable[str | IPNetwork] = ()) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(parse_network(n) for n in networks)
        self._v4 = _merge(n for n in self.networks if n.version == 4)
        self._v6 = _merge(n for n in self.networks if n.version == 6)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, ip: IPAddress) -> bool:
        starts, ends = self._v4 if ip.version == 4 else self._v6
        value = int(ip)
        i = bisect_right(starts, value) - 1
        return i >= 0 and value <= ends[i]

    def spans(self, version: int) -> tuple[list[int], list[int]]:
        """The merged ranges of one family, as (first addresses, last addresses): for the rule index."""
        return self._v4 if version == 4 else self._v6

    def covers(self, net: IPNetwork) -> bool:
        """Whether every address of ``net`` is in this set (for unreachable-rule checks)."""
        starts, ends = self._v4 if net.version == 4 else self._v6
        lo, hi = int(net.network_address), int(net.broadcast_address)
        i = bisect_right(starts, lo) - 1
        return i >= 0 and hi <= ends[i]

    def __repr__(self) -> str:
        return f"CidrSet({[str(n) for n in self.networks]})"
