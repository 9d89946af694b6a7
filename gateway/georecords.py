"""What MaxMind says about an address, in words, through ``geoip2``'s models.

The request path reads a handful of fields with ``maxminddb`` directly
(:mod:`gateway.geo`); an operator asking "why was this caller refused?"
wants the rest of the record too: place names, the registered and
represented country, the accuracy radius, the network's owner, every
anonymizer flag. ``geoip2`` knows each database type's layout, so this module
only picks the fields worth showing. Used by ``explain`` and
``/admin/explain``, never per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import geoip2.database
import geoip2.errors
import maxminddb.errors

from .addresses import IPAddress


@dataclass(frozen=True, slots=True)
class Record:
    """One database's answer. ``fields`` keep their display order."""

    database_type: str
    path: str
    found: bool
    network: str | None
    fields: tuple[tuple[str, Any], ...]
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "database_type": self.database_type,
            "path": self.path,
            "found": self.found,
            "network": self.network,
            "fields": dict(self.fields),
            "error": self.error,
        }


def _place(node: Any) -> str | None:
    """``United Kingdom (GB)`` from any geoip2 place record."""
    if node is None:
        return None
    name, code = node.name, getattr(node, "iso_code", None) or getattr(node, "code", None)
    if name and code:
        return f"{name} ({code})"
    return name or code


def _city_fields(m: Any) -> list[tuple[str, Any]]:
    subs = [
        f"{s.name or s.iso_code} ({m.country.iso_code}-{s.iso_code})" if s.iso_code else s.name
        for s in getattr(m, "subdivisions", ())
    ]
    represented = _place(m.represented_country)
    if represented and m.represented_country.type:
        represented += f", {m.represented_country.type}"
    return [
        ("continent", _place(getattr(m, "continent", None))),
        ("country", _place(m.country)),
        ("registered_country", _place(m.registered_country)),
        ("represented_country", represented),
        ("subdivisions", subs or None),
        ("city", getattr(getattr(m, "city", None), "name", None)),
        ("postal_code", getattr(getattr(m, "postal", None), "code", None)),
        ("accuracy_radius_km", getattr(getattr(m, "location", None), "accuracy_radius", None)),
        ("time_zone", getattr(getattr(m, "location", None), "time_zone", None)),
    ]


_TRAIT_FIELDS = (
    "autonomous_system_number",
    "autonomous_system_organization",
    "isp",
    "organization",
    "connection_type",
    "user_type",
    "domain",
)
_FLAGS = (
    "is_anonymous",
    "is_anonymous_vpn",
    "is_hosting_provider",
    "is_public_proxy",
    "is_residential_proxy",
    "is_tor_exit_node",
)


def _attrs(obj: Any, names: Sequence[str]) -> list[tuple[str, Any]]:
    return [(n, getattr(obj, n, None)) for n in names]


def _flags(obj: Any) -> list[tuple[str, Any]]:
    return [("anonymizer", [n[3:] for n in _FLAGS if getattr(obj, n, False)])]


# database type suffix -> reader method and what to show from its model
_KINDS: tuple[tuple[str, str], ...] = (
    ("-Enterprise", "enterprise"),
    ("-City", "city"),
    ("-City-Lite", "city"),
    ("-Country", "country"),
    ("-Country-Lite", "country"),
    ("-ASN", "asn"),
    ("-ASN-Lite", "asn"),
    ("-ISP", "isp"),
    ("-Anonymous-IP", "anonymous_ip"),
    ("-Connection-Type", "connection_type"),
)


def _fields(method: str, m: Any) -> list[tuple[str, Any]]:
    if method in ("enterprise", "city", "country"):
        out = _city_fields(m)
        if method == "enterprise":
            out += _attrs(m.traits, _TRAIT_FIELDS) + _flags(m.traits)
        return out
    if method in ("asn", "isp"):
        return _attrs(m, _TRAIT_FIELDS)
    if method == "anonymous_ip":
        return _flags(m)
    return _attrs(m, ("connection_type",))


def lookup(path: str, ip: IPAddress) -> Record:
    """The full record ``path`` holds for ``ip``; errors are part of the answer, not raised."""
    try:
        reader = geoip2.database.Reader(path, locales=["en"])
    except (OSError, ValueError, maxminddb.errors.InvalidDatabaseError) as e:
        return Record("?", path, False, None, (), f"cannot open: {e}")
    with reader:
        db_type = reader.metadata().database_type
        method = next((m for suffix, m in _KINDS if db_type.endswith(suffix)), None)
        if method is None:
            return Record(db_type, path, False, None, (), "database type not shown by explain")
        try:
            model = getattr(reader, method)(str(ip))
        except geoip2.errors.AddressNotFoundError as e:
            return Record(db_type, path, False, str(e.network) if e.network else None, ())
        except (ValueError, maxminddb.errors.InvalidDatabaseError, geoip2.errors.GeoIP2Error) as e:
            return Record(db_type, path, False, None, (), f"lookup failed: {e}")
        traits = getattr(model, "traits", model)
        network = getattr(traits, "network", None)
        # An Anonymous-IP record with no flag set is an answer too: "none".
        keep_empty = method == "anonymous_ip"
        fields = tuple((k, v) for k, v in _fields(method, model) if v not in (None, "") and (v != [] or keep_empty))
        return Record(db_type, path, True, str(network) if network else None, fields)


def lookup_all(paths: Sequence[str], ip: IPAddress) -> list[Record]:
    return [lookup(p, ip) for p in paths]


def render(record: Record) -> list[str]:
    """Text lines for ``explain``."""
    head = f"{record.database_type} ({record.path})"
    if record.error:
        return [f"{head}: {record.error}"]
    if not record.found:
        return [f"{head}: no record" + (f" (network {record.network})" if record.network else "")]
    out = [head + (f": network {record.network}" if record.network else "")]
    for key, value in record.fields:
        shown = (", ".join(str(v) for v in value) or "none") if isinstance(value, list) else str(value)
        out.append(f"    {key.replace('_', ' ')}: {shown}")
    return out
