"""Runtime overrides: allow or deny one network, API key, country or subdivision now.

An override is an operator's decision that beats the policy until it is
removed or expires. Overrides are compiled into lookup tables like the
policy's, and :func:`judge` is pure, so the request path pays a dict or
bisect lookup and no I/O.

When several overrides match, the narrowest kind wins (API key, then CIDR,
then subdivision, then country), and within one kind a deny beats an
allow: a block placed on a customer's key holds even inside a country that
was opened for everyone.

API keys are never kept: an override holds the HMAC-SHA256 of the bearer
token under the override key (kept in Redis: :mod:`gateway.shared.store`), and the request path
hashes the caller's token with the same key.

An override's ``reason`` and ``by`` are shown in terminals, logs and
dashboards, so they may hold no control character (C0, C1, DEL) and no
character that reorders or breaks a line (bidi embeddings, overrides,
isolates and marks; line and paragraph separators): such text could forge a
row of ``override list`` or colour a terminal. Text stored before this rule
(or written to Redis by hand) is shown escaped (:func:`printable`). Country
and subdivision codes are checked against ISO 3166 as the policy's are, so
``UK`` is refused with "did you mean 'GB'?" instead of matching nobody.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from .. import iso3166
from ..addresses import IPAddress, IPNetwork
from ..cidrs import CidrSet, parse_network
from ..clientip import ClientAddress
from ..geo import GeoFacts
from .callerkey import bearer_token, hash_key
from .compiled import Decision
from .index import Intervals
from .schema import ALLOW, DENY

Action = Literal["allow", "deny"]
Kind = Literal["api_key", "cidr", "subdivision", "country"]
KINDS: tuple[Kind, ...] = ("api_key", "cidr", "subdivision", "country")  # narrowest first
# The text an operator sends, as the typed value it names (checked first: see new_override).
_ACTION_OF: dict[str, Action] = {ALLOW: ALLOW, DENY: DENY}
_KIND_OF: dict[str, Kind] = {k: k for k in KINDS}
_COUNTRY = re.compile(r"^[A-Z]{2}$")
_SUBDIVISION = re.compile(r"^[A-Z]{2}-[A-Z0-9]{1,3}$")
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_TEXT = 500
# C0 controls, DEL and C1 controls; the bidirectional formatting characters
# (LRM, RLM, ALM, embeddings and overrides U+202A-202E, isolates U+2066-2069);
# the line and paragraph separators.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


class OverrideError(ValueError):
    """An override that cannot be stored as given."""


@dataclass(frozen=True, slots=True)
class Override:
    id: str
    action: Action
    kind: Kind
    value: str  # the CIDR, country, subdivision, or the key's HMAC (hex) for api_key
    reason: str
    by: str
    created_at: float
    expires_at: float | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "action": self.action,
            "kind": self.kind,
            "value": self.value,
            "reason": self.reason,
            "by": self.by,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }

    def public(self) -> dict[str, Any]:
        """What may be shown: an API key only as a prefix of its hash."""
        value = f"hmac-sha256:{self.value[:16]}" if self.kind == "api_key" else self.value
        return self.as_dict() | {"value": value, "rule": f"override:{self.id}"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Override:
        return new_override(
            d["action"],
            d["kind"],
            d["value"],
            d.get("reason", ""),
            d.get("by", ""),
            id=d["id"],
            created_at=float(d["created_at"]),
            expires_at=None if d.get("expires_at") is None else float(d["expires_at"]),
            hashed=True,
        )


def check_text(reason: str, by: str) -> None:
    """Refuse a ``reason`` or ``by`` that could forge or colour what a terminal shows (naming the character only)."""
    for name, text in (("reason", reason), ("by", by)):
        bad = _UNSAFE.search(text)
        if bad is not None:
            raise OverrideError(
                f"{name}: character U+{ord(bad.group()):04X} at position {bad.start()} is not allowed "
                "(no control or bidirectional formatting characters)"
            )


_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _SHORT_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: str) -> str:
    """``text`` with every character :func:`check_text` refuses shown as an escape (``\\x1b``, ``\\u202e``)."""
    return _UNSAFE.sub(_escape, text)


def new_override(
    action: str,
    kind: str,
    value: str,
    reason: str,
    by: str,
    *,
    id: str | None = None,
    created_at: float | None = None,
    expires_at: float | None = None,
    ttl: float | None = None,
    hashed: bool = False,
    key: bytes | None = None,
) -> Override:
    """A checked override. ``value`` for ``api_key`` is the token (hashed here with ``key``) unless ``hashed``."""
    if action not in (ALLOW, DENY):
        raise OverrideError(f"action must be allow or deny, not {action[:20]!r}")
    if kind not in KINDS:
        raise OverrideError(f"kind must be one of {', '.join(KINDS)}")
    if len(reason) > MAX_TEXT or len(by) > MAX_TEXT:
        raise OverrideError(f"reason and by are limited to {MAX_TEXT} characters")
    if not hashed:  # a new override; one read back from the store is shown escaped instead
        check_text(reason, by)
    value = value.strip()
    if kind == "cidr":
        try:
            value = str(parse_network(value))
        except ValueError as e:
            raise OverrideError(f"cidr: {e}") from None
    elif kind == "country":
        value = value.upper()
        if not _COUNTRY.match(value):
            raise OverrideError(f"country: {printable(value[:20])!r} is not a two-letter ISO 3166-1 code")
        if not hashed and not iso3166.is_country(value):
            raise OverrideError(f"country: {value!r} {iso3166.country_problem(value)}")
    elif kind == "subdivision":
        value = value.upper()
        if not _SUBDIVISION.match(value):
            raise OverrideError(f"subdivision: {printable(value[:20])!r} is not an ISO 3166-2 code like GB-ENG")
        if not hashed and not iso3166.is_subdivision(value):
            raise OverrideError(f"subdivision: {value!r} {iso3166.subdivision_problem(value)}")
    elif hashed:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise OverrideError("api_key: the stored hash is not 64 hex digits")
    else:
        if not value:
            raise OverrideError("api_key: empty")
        if key is None:
            raise OverrideError("api_key: the override key is not known yet (Redis unreachable?)")
        value = hash_key(key, value)
    if id is None:
        id = secrets.token_hex(6)
    elif not _ID.match(id):
        raise OverrideError("id: 1 to 64 letters, digits, '.', '_' or '-'")
    now = time.time() if created_at is None else created_at
    if ttl is not None:
        if ttl <= 0:
            raise OverrideError("ttl must be more than zero")
        expires_at = now + ttl
    return Override(id, _ACTION_OF[action], _KIND_OF[kind], value, reason, by, now, expires_at)


@dataclass(frozen=True, slots=True)
class _Net:
    network: IPNetwork
    override: Override


@dataclass(frozen=True)
class Compiled:
    """Overrides as lookup tables; immutable, swapped whole when anything changes."""

    overrides: tuple[Override, ...] = ()
    by_key: dict[str, Override] = field(default_factory=dict)
    by_subdivision: dict[str, Override] = field(default_factory=dict)
    by_country: dict[str, Override] = field(default_factory=dict)
    cidrs: CidrSet = field(default_factory=CidrSet)
    nets: tuple[_Net, ...] = ()  # deny first, then the longest prefix: the first that holds an address wins
    # Per family, address intervals to the positions in ``nets`` that hold them (.index), so that the
    # winner is one bisect however many CIDR overrides there are.
    net_index: dict[int, Intervals] = field(default_factory=dict)
    next_expiry: float | None = None
    decisions: dict[str, Decision] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.overrides)

    def counts(self) -> dict[str, int]:
        return {kind: sum(o.kind == kind for o in self.overrides) for kind in KINDS}


EMPTY = Compiled()


def _pick(a: Override | None, b: Override) -> Override:
    """Of two overrides for the same subject, the deny (then the newer)."""
    if a is None:
        return b
    if a.action != b.action:
        return a if a.action == DENY else b
    return a if a.created_at >= b.created_at else b


def compile_overrides(overrides: Iterable[Override], now: float) -> Compiled:
    live = sorted((o for o in overrides if not o.expired(now)), key=lambda o: (o.created_at, o.id))
    tables: dict[Kind, dict[str, Override]] = {"api_key": {}, "subdivision": {}, "country": {}}
    nets: list[_Net] = []
    for o in live:
        if o.kind == "cidr":
            nets.append(_Net(ipaddress.ip_network(o.value), o))
        else:
            table = tables[o.kind]
            table[o.value] = _pick(table.get(o.value), o)
    # Deny before allow, then the longest prefix: the first hit in a scan is the one that wins.
    nets.sort(key=lambda n: (n.override.action != DENY, -n.network.prefixlen))
    expiries = [o.expires_at for o in live if o.expires_at is not None]
    return Compiled(
        overrides=tuple(live),
        by_key=tables["api_key"],
        by_subdivision=tables["subdivision"],
        by_country=tables["country"],
        cidrs=CidrSet(n.network for n in nets),
        nets=tuple(nets),
        net_index={
            version: Intervals(
                [
                    (int(n.network.network_address), int(n.network.broadcast_address), i)
                    for i, n in enumerate(nets)
                    if n.network.version == version
                ]
            )
            for version in (4, 6)
        },
        next_expiry=min(expiries) if expiries else None,
        decisions={o.id: _decision(o) for o in live},
    )


def _decision(o: Override) -> Decision:
    reason = f"override {o.id} by {o.by or 'unknown'}: {o.reason}" if o.reason else f"override {o.id}"
    return Decision(o.action, o.action, f"override:{o.id}", reason, "default" if o.action == ALLOW else None)


def _in_nets(compiled: Compiled, ip: IPAddress) -> Override | None:
    """The CIDR override that wins for ``ip``: the first in ``nets``' order that holds it."""
    family = compiled.net_index.get(ip.version)
    held = family.at(int(ip)) if family is not None else ()
    return compiled.nets[held[0]].override if held else None


def judge(compiled: Compiled, client: ClientAddress, facts: GeoFacts, key_hash: str | None) -> Decision | None:
    """The override's decision for this request, or None to let the policy decide. Pure."""
    if not compiled.overrides:
        return None
    hit: Override | None = None
    if key_hash is not None and compiled.by_key:
        hit = compiled.by_key.get(key_hash)
    ip = client.ip
    if hit is None and ip is not None and compiled.nets:
        hit = _in_nets(compiled, ip)
    if hit is None and compiled.by_subdivision:
        for s in facts.subdivisions:
            found = compiled.by_subdivision.get(s)
            if found is not None:
                hit = _pick(hit, found)
    if hit is None and facts.country is not None:
        hit = compiled.by_country.get(facts.country)
    return None if hit is None else compiled.decisions[hit.id]


def request_key_hash(compiled: Compiled, key: bytes | None, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The hash of the caller's API key, computed only when some override is keyed on one."""
    if not compiled.by_key or key is None:
        return None
    token = bearer_token(headers)
    return None if token is None else hash_key(key, token)
