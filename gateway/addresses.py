"""IP addresses and the IPv6 prefixes that carry an IPv4 address.

Addresses are normalised before anything looks at them, so that an IPv4
address wearing an IPv6 costume (``::ffff:a.b.c.d``, ``::ffff:0:a.b.c.d``,
``::a.b.c.d``, 6to4, NAT64 and local-use NAT64, Teredo) gets exactly the
decision its IPv4 form gets: :func:`normalize` for an address,
:func:`embedding` for the prefix a CIDR block sits in (:mod:`.cidrs`).

The bottom of the address modules: it imports nothing from the gateway, so
:mod:`.cidrs` and :mod:`.clientip` both build on it and neither on the other's
types.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


_V4_MAX = 0xFFFFFFFF


class Embedding(NamedTuple):
    """An IPv6 prefix whose addresses carry an IPv4 address, and where it sits.

    ``shift``: the IPv4 address is bits ``shift .. shift+31`` counted from the
    right; ``invert``: it is stored with every bit flipped (Teredo).
    """

    name: str
    network: ipaddress.IPv6Network
    shift: int = 0
    invert: bool = False

    def ipv4(self, value: int) -> int:
        v4 = (value >> self.shift) & _V4_MAX
        return v4 ^ _V4_MAX if self.invert else v4


EMBEDDINGS = (
    Embedding("IPv4-mapped", ipaddress.IPv6Network("::ffff:0:0/96")),
    Embedding("IPv4-translated (SIIT)", ipaddress.IPv6Network("::ffff:0:0:0/96")),
    Embedding("IPv4-compatible", ipaddress.IPv6Network("::/96")),  # but :: and ::1 are themselves
    Embedding("NAT64", ipaddress.IPv6Network("64:ff9b::/96")),
    # RFC 8215 local-use NAT64: the IPv4 address is taken as the last 32 bits (a /96 inside the /48).
    Embedding("local-use NAT64", ipaddress.IPv6Network("64:ff9b:1::/48")),
    Embedding("6to4", ipaddress.IPv6Network("2002::/16"), shift=80),
    Embedding("Teredo", ipaddress.IPv6Network("2001::/32"), invert=True),
)
_EMBEDDING_SPANS = tuple((int(e.network.network_address), int(e.network.broadcast_address), e) for e in EMBEDDINGS)


def embedding(value: int) -> Embedding | None:
    """The transition prefix an IPv6 address (as an integer) is in, if it carries an IPv4 address."""
    for lo, hi, e in _EMBEDDING_SPANS:
        if lo <= value <= hi:
            return None if value <= 1 else e  # ::/128 and ::1 are not IPv4-compatible addresses
    return None


def normalize(ip: IPAddress) -> IPAddress:
    """Return the IPv4 address an IPv6 address carries, or the address itself.

    The embedded forms are the ones a client (or a dual-stack socket) can use
    to present an IPv4 address over IPv6; a GeoIP database or a CIDR rule
    written for IPv4 must see them as IPv4, or a blocked IPv4 caller could
    walk in by spelling its address differently.
    """
    if ip.version == 4:
        return ip
    value = int(ip)
    e = embedding(value)
    return ip if e is None else ipaddress.IPv4Address(e.ipv4(value))
