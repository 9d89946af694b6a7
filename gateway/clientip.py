"""Who is the client?

The TCP peer is the client unless the peer is a proxy we were told to trust.
Only then do forwarding headers count, and they are walked from the right:
each trusted hop appended the address it saw, so the first address from the
right that is *not* a trusted proxy is the last one nobody we trust vouched
for, which is the client. Everything left of it was written by the client
and can say anything.

Addresses are normalised before anything looks at them, so that an IPv4
address wearing an IPv6 costume (``::ffff:a.b.c.d``, ``::ffff:0:a.b.c.d``,
``::a.b.c.d``, 6to4, NAT64 and local-use NAT64, Teredo) gets exactly the
decision its IPv4 form gets (:mod:`.addresses`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final, Literal, NamedTuple

from . import forwarded
from .addresses import EMBEDDINGS as EMBEDDINGS
from .addresses import IPAddress as IPAddress
from .addresses import IPNetwork as IPNetwork
from .addresses import normalize as normalize
from .cidrs import CidrSet

AddressKind = Literal["public", "private", "invalid", "missing"]
PUBLIC: Final = "public"
PRIVATE: Final = "private"
INVALID: Final = "invalid"
MISSING: Final = "missing"


class ClientAddress(NamedTuple):
    """The client as the gateway judges it.

    ``kind`` is ``public``, ``private`` (RFC 1918, loopback, link-local, ULA),
    ``invalid`` (the address that would have been the client is not an
    address at all) or ``missing`` (a trusted proxy named no client; ``ip``
    is then the trusted address the request came from, so that ``cidrs``
    rules can still allow a proxy's own health checks); ``via`` names where
    it came from (``peer`` or a header);
    ``raw`` is the text it was read from, kept for logs and ``explain``.
    """

    ip: IPAddress | None
    kind: AddressKind
    via: str
    raw: str
    problem: str | None = None


class AddressError(ValueError):
    """Text that does not hold one unicast IP address."""


def _ranges(*cidrs: str) -> tuple[tuple[int, int], ...]:
    nets = [ipaddress.ip_network(c) for c in cidrs]
    return tuple((int(n.network_address), int(n.broadcast_address)) for n in nets)


_PRIVATE_V4 = _ranges("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16")
_PRIVATE_V6 = _ranges("::1/128", "fe80::/10", "fc00::/7", "fec0::/10")
_NOT_UNICAST_V4 = _ranges("0.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32")
_NOT_UNICAST_V6 = _ranges("::/128", "ff00::/8")
# By IP version, as (first, last) integers: for load-time checks elsewhere.
PRIVATE_RANGES = {4: _PRIVATE_V4, 6: _PRIVATE_V6}
NOT_UNICAST_RANGES = {4: _NOT_UNICAST_V4, 6: _NOT_UNICAST_V6}


def _in(value: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    for lo, hi in ranges:  # noqa: SIM110 - a plain loop: any() with a generator costs twice as much here
        if lo <= value <= hi:
            return True
    return False


def classify(ip: IPAddress) -> AddressKind:
    """``private`` or ``public`` for a normalised unicast address."""
    value = int(ip)
    ranges = _PRIVATE_V4 if ip.version == 4 else _PRIVATE_V6
    return PRIVATE if _in(value, ranges) else PUBLIC


_OWS = " \t"  # HTTP's optional whitespace; any other byte around an address makes it malformed


def parse_address(text: str) -> IPAddress:
    """Parse one address as headers and sockets write it, and normalise it.

    Accepts ``a.b.c.d``, ``a.b.c.d:port``, bare IPv6, ``[v6]`` and ``[v6]:port``,
    with an optional ``%zone``. Raises :class:`AddressError` with a reason.
    """
    s = text.strip(_OWS)
    if not s:
        raise AddressError("empty address")
    if len(s) > 64:
        raise AddressError("address too long")
    if s[0] == "[":
        end = s.find("]")
        if end < 0:
            raise AddressError(f"unclosed '[' in {s!r}")
        rest = s[end + 1 :]
        if rest and not (rest[0] == ":" and rest[1:].isdigit()):
            raise AddressError(f"junk after ']' in {s!r}")
        s = s[1:end]
    elif s.count(":") == 1:  # IPv4 with a port; bare IPv6 always has two or more colons
        host, _, port = s.partition(":")
        if not port.isdigit():
            raise AddressError(f"bad port in {s!r}")
        s = host
    zone = s.find("%")
    if zone >= 0:
        s = s[:zone]
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        raise AddressError(f"not an IP address: {text.strip(_OWS)!r}") from None
    ip = normalize(ip)
    if _in(int(ip), _NOT_UNICAST_V4 if ip.version == 4 else _NOT_UNICAST_V6):
        raise AddressError(f"not a unicast address: {text.strip(_OWS)!r}")
    return ip


def split_forwarded_for(values: Sequence[str]) -> list[str]:
    """Hops of ``X-Forwarded-For``, left to right, across repeated headers."""
    return [hop for value in values for hop in value.split(",")]


def split_forwarded(values: Sequence[str]) -> list[str]:
    """``for=`` values of RFC 7239 ``Forwarded``, one per element, left to right.

    Syntax only (see :mod:`gateway.forwarded`; raises its ``ForwardedError``
    when the field does not parse). An element without ``for=`` yields
    ``""``, which the caller treats as an invalid hop: a proxy that did not
    say whom it served cannot vouch for anyone.
    """
    return [e.get("for", "") for e in forwarded.elements(values)]


@lru_cache(maxsize=8192)
def _forwarded_hops(values: tuple[str, ...]) -> tuple[str, ...]:
    """Hops of a ``Forwarded`` field whose every element is well formed (cached: fields repeat)."""
    return tuple(("" if n is None else n.ip or n.text) for n in forwarded.for_nodes(values))


def _hop_problem(header: str, hop: str, error: AddressError) -> str:
    if header == "forwarded":
        if not hop:
            return "a Forwarded element without for= where the client should be"
        if hop.lower().startswith("unknown"):
            return "for=unknown: the proxy did not know the client"
        if hop.startswith("_"):
            return "for= holds an obfuscated identifier, not an address"
    return str(error)


@dataclass(frozen=True, slots=True)
class ClientIPConfig:
    """Whom to trust and which header they write the client into.

    ``header`` is ``x-forwarded-for``, ``forwarded`` or the lower-case name of
    a single-value header such as ``cf-connecting-ip``.
    """

    trusted: CidrSet
    header: str = "x-forwarded-for"
    header_bytes: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "header_bytes", self.header.encode("latin-1"))


@lru_cache(maxsize=8192)
def _peer_address(peer: str) -> ClientAddress:
    """Peers repeat (load balancers, keep-alive clients), so their parse is cached."""
    try:
        ip = parse_address(peer)
    except AddressError as e:
        return ClientAddress(None, INVALID, "peer", peer, str(e))
    return ClientAddress(ip, classify(ip), "peer", peer)


def resolve(peer: str | None, headers: Iterable[tuple[bytes, bytes]], config: ClientIPConfig) -> ClientAddress:
    """Find the client from the TCP peer and the request's raw (ASGI) headers.

    Headers are not even looked at unless the peer is a trusted proxy. A
    trusted peer that names no client (no header, an empty one, or only
    trusted hops in it) gives ``missing``: the request came from our own
    infrastructure, and nobody said for whom.
    """
    if peer is None:
        return ClientAddress(None, INVALID, "peer", "", "no peer address")
    client = _peer_address(peer)
    if client.ip is None or not config.trusted or client.ip not in config.trusted:
        return client
    wanted = config.header_bytes
    values = [v.decode("latin-1") for k, v in headers if k == wanted]
    header = config.header
    hops: Sequence[str]
    if not values:
        return ClientAddress(client.ip, MISSING, header, peer, f"trusted proxy sent no {header}")
    if header == "x-forwarded-for":
        if not "".join(values).strip(_OWS):
            return ClientAddress(client.ip, MISSING, header, peer, f"trusted proxy sent an empty {header}")
        hops = split_forwarded_for(values)
    elif header == "forwarded":
        try:
            hops = _forwarded_hops(tuple(values))
        except forwarded.ForwardedError as e:
            return ClientAddress(None, INVALID, header, ", ".join(values)[:100], f"malformed Forwarded: {e}")
        if not hops:
            return ClientAddress(client.ip, MISSING, header, peer, f"trusted proxy sent an empty {header}")
    elif len(values) == 1:
        if not values[0].strip(_OWS):
            return ClientAddress(client.ip, MISSING, header, peer, f"trusted proxy sent an empty {header}")
        hops = values
    else:
        return ClientAddress(None, INVALID, header, ", ".join(values)[:100], f"{header} sent more than once")
    ip, kind = client.ip, client.kind
    raw = peer
    for hop in reversed(hops):
        try:
            ip, kind = _hop_address(hop)
        except AddressError as e:
            return ClientAddress(None, INVALID, header, hop.strip(_OWS)[:100], _hop_problem(header, hop, e))
        raw = hop.strip(_OWS)
        if ip not in config.trusted:
            return ClientAddress(ip, kind, header, raw)
    return ClientAddress(ip, MISSING, header, raw, f"{header} holds only trusted proxies")


@lru_cache(maxsize=65536)
def _hop_address(hop: str) -> tuple[IPAddress, AddressKind]:
    """Callers repeat, so a hop's parse and class are cached (errors are not)."""
    ip = parse_address(hop)
    return ip, classify(ip)
