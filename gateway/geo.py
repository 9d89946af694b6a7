"""Where is an address? Geo facts from MaxMind-format databases or embedded data.

Any number of ``.mmdb`` files can be given; each one's type is read from its
metadata, and each fact (country, subdivisions, ASN, anonymizer flags) is
taken from the first file that can provide it. With no file at all, the
embedded ``iptocc`` package (RIR delegation data) provides countries only.

Decoding a City record costs about 10 µs, more than the whole rest of a
decision, so facts are cached by the *network* the databases return for an
address: every address in that network gets the same records from every
database, so one entry serves all of them, and the cache stays as small as
the set of networks actually seen rather than the set of callers.

Each file is read into a private, sealed in-memory copy when it is opened
(:func:`open_database`), so rewriting the file on disk in place can neither
crash a lookup (SIGBUS on a truncated mapping) nor change its answer; a new
file is served only once it has been reloaded and checked whole.
"""

from __future__ import annotations

import fcntl
import io
import ipaddress
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import maxminddb
import maxminddb.errors

from .addresses import IPAddress

# What a rule can ask about; a policy that asks for a fact no configured
# source provides is rejected at load time rather than silently never matching.
COUNTRY = "country"
REGISTERED_COUNTRY = "registered_country"
SUBDIVISIONS = "subdivisions"
ASN = "asn"
ANONYMIZER = "anonymizer"

ANONYMIZER_FLAGS = frozenset(
    {"anonymous", "anonymous_vpn", "hosting_provider", "public_proxy", "residential_proxy", "tor_exit_node"}
)

# Known database types, by the facts they hold. Matched by suffix so that
# GeoIP2-, GeoLite2- and other vendors' MaxMind-format files all work.
_TYPE_FACTS: tuple[tuple[str, frozenset[str]], ...] = (
    ("-Enterprise", frozenset({COUNTRY, REGISTERED_COUNTRY, SUBDIVISIONS, ASN})),
    ("-City", frozenset({COUNTRY, REGISTERED_COUNTRY, SUBDIVISIONS})),
    ("-City-Lite", frozenset({COUNTRY, REGISTERED_COUNTRY, SUBDIVISIONS})),
    ("-Country", frozenset({COUNTRY, REGISTERED_COUNTRY})),
    ("-Country-Lite", frozenset({COUNTRY, REGISTERED_COUNTRY})),
    ("-ASN", frozenset({ASN})),
    ("-ASN-Lite", frozenset({ASN})),
    ("-ISP", frozenset({ASN})),
    ("-Anonymous-IP", frozenset({ANONYMIZER})),
)

# How many networks to decode when a file is opened. Enough to catch a file
# whose tree or data section is broken near the start (all of MaxMind's own
# broken test files), bounded so that a 70 MB City file still opens fast.
_VERIFY_NETWORKS = 2000
_CACHE_MAX = 200_000
# Reads of a file that changed under them before giving up (until the next change).
_READ_ATTEMPTS = 3
# A private copy, once written, can never be written, shrunk or grown again, nor unsealed.
# (Linux only, like memfd itself: getattr keeps the module importable elsewhere.)
_SEALS = sum(getattr(fcntl, f"F_SEAL_{name}", 0) for name in ("SHRINK", "GROW", "WRITE", "SEAL"))

log = logging.getLogger("regiongate")


class GeoDataError(Exception):
    """A configured database cannot be used. The message names the file."""


@dataclass(frozen=True, slots=True)
class GeoFacts:
    """What the databases say about one network."""

    country: str | None = None
    registered_country: str | None = None
    subdivisions: tuple[str, ...] = ()
    asn: int | None = None
    as_org: str | None = None
    anonymizer: frozenset[str] = frozenset()
    network: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "country": self.country,
            "registered_country": self.registered_country,
            "subdivisions": list(self.subdivisions),
            "asn": self.asn,
            "as_org": self.as_org,
            "anonymizer": sorted(self.anonymizer),
            "network": self.network,
        }


NO_FACTS = GeoFacts()


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """One geo source, as ``/readyz``, ``/metrics`` and ``explain`` describe it."""

    type: str
    path: str | None
    build_epoch: int
    facts: frozenset[str]
    description: str = ""

    @property
    def build_date(self) -> str | None:
        """``build_epoch`` as a UTC date, for people; None when unknown."""
        return time.strftime("%Y-%m-%d", time.gmtime(self.build_epoch)) if self.build_epoch else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "path": self.path,
            "build_epoch": self.build_epoch,
            "build_date": self.build_date,
            "facts": sorted(self.facts),
            "description": self.description,
        }


def facts_for_type(database_type: str) -> frozenset[str] | None:
    for suffix, facts in _TYPE_FACTS:
        if database_type.endswith(suffix):
            return facts
    return None


def _country(rec: dict[str, Any], key: str) -> str | None:
    node = rec.get(key)
    return node.get("iso_code") if isinstance(node, dict) else None


def _subdivisions(rec: dict[str, Any]) -> tuple[str, ...]:
    cc = _country(rec, "country")
    subs = rec.get("subdivisions")
    if not cc or not subs:
        return ()
    return tuple(f"{cc}-{s['iso_code']}" for s in subs if s.get("iso_code"))


def _asn(rec: dict[str, Any]) -> tuple[int | None, str | None]:
    node = rec.get("traits", rec)
    return node.get("autonomous_system_number"), node.get("autonomous_system_organization")


def _anonymizer(rec: dict[str, Any]) -> frozenset[str]:
    return frozenset(k[3:] for k, v in rec.items() if v is True and k[3:] in ANONYMIZER_FLAGS)


@dataclass
class _Database:
    path: str
    reader: Any
    info: SourceInfo
    provides: set[str] = field(default_factory=set)  # the facts this file is the source of
    identity: tuple[int, ...] = ()  # the file that was opened, to notice a replacement


def file_identity(path: str) -> tuple[int, ...]:
    """Which file a path names now: a rename-over gives a new inode, an in-place write a new mtime."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_whole(path: str) -> tuple[bytes, tuple[int, ...]]:
    """The file's bytes and identity, read while nothing changed it (or GeoDataError).

    An in-place rewrite (``cp new.mmdb City.mmdb``: truncate, then write)
    caught half-way changes the identity: read again, a few times, then give
    up until the next change (the watcher sees the write finish).
    """
    for _ in range(_READ_ATTEMPTS):
        before = file_identity(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise GeoDataError(f"{path}: cannot read: {e.strerror or e}") from None
        if before and file_identity(path) == before and len(data) == before[2]:
            return data, before
    raise GeoDataError(f"{path}: the file kept changing while it was read")


def _private_reader(data: bytes, path: str) -> Any:
    """A reader over a private, sealed in-memory copy of ``data`` (libmaxminddb's C decoding).

    The copy is a memfd sealed against writes and resizing, mapped by
    libmaxminddb like any file: nothing outside this process can change or
    truncate what the mapping reads, so an in-place rewrite of the file on
    disk cannot SIGBUS or mislead a lookup. Workers forked after the load
    share its pages. Without memfd (not Linux), the pure-Python reader over
    the bytes (``MODE_FD``: slower decoding, the cache hides most of it).
    """
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        return maxminddb.open_database(io.BytesIO(data), maxminddb.MODE_FD)
    fd = os.memfd_create("regiongate-geoip", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        copy = f"/proc/self/fd/{fd}"
        try:
            return maxminddb.open_database(copy, maxminddb.MODE_AUTO)
        except (OSError, ValueError, maxminddb.errors.InvalidDatabaseError) as e:
            raise type(e)(str(e).replace(copy, path)) from None  # the error names the file, not the copy
    finally:
        os.close(fd)  # the mapping keeps the copy alive; closing the reader frees it


def open_database(path: str) -> _Database:
    """Open one file, check its type and decode its first networks.

    The file is read whole into a private copy (:func:`_private_reader`), so
    a later rewrite in place cannot touch what is served. Corruption shows up
    at open (bad metadata, bad node count) or only when a record is decoded
    (bad data section), so both are done here, at startup, where a clear
    error is cheap, and not on the first unlucky request.
    """
    if not os.path.isfile(path):
        raise GeoDataError(f"{path}: no such GeoIP database file")
    data, identity = _read_whole(path)
    try:
        reader = _private_reader(data, path)
    except (OSError, ValueError, maxminddb.errors.InvalidDatabaseError) as e:
        raise GeoDataError(f"{path}: not a readable MaxMind DB file: {e}") from None
    finally:
        del data
    meta = reader.metadata()
    facts = facts_for_type(meta.database_type)
    if facts is None:
        reader.close()
        raise GeoDataError(
            f"{path}: database type {meta.database_type!r} is not supported "
            "(use a Country, City, Enterprise, ASN, ISP or Anonymous-IP database)"
        )
    try:
        for _network, record in itertools.islice(reader, _VERIFY_NETWORKS):
            if record is not None and not isinstance(record, dict):
                raise GeoDataError(f"{path}: record is a {type(record).__name__}, not a map")
    except (maxminddb.errors.InvalidDatabaseError, ValueError, RuntimeError) as e:
        reader.close()
        raise GeoDataError(f"{path}: corrupt MaxMind DB file: {e}") from None
    description = meta.description.get("en", "") if isinstance(meta.description, dict) else ""
    info = SourceInfo(meta.database_type, path, int(meta.build_epoch), facts, description)
    return _Database(path, reader, info, identity=identity)


def _embedded_info() -> SourceInfo:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("iptocc")
    except PackageNotFoundError:
        return SourceInfo("embedded-iptocc", None, 0, frozenset({COUNTRY}), "iptocc missing")
    return SourceInfo(
        "embedded-iptocc",
        None,
        embedded_data_epoch(dist),
        frozenset({COUNTRY}),
        f"iptocc {dist.version}: RIR delegation data, countries only",
    )


def embedded_data_epoch(dist: Any) -> int:
    """When iptocc's embedded data was built, as a Unix time; 0 when unknown.

    The data carries no date of its own: iptocc refreshes it from the five
    RIRs nightly, and a changed table is tagged and released as a wheel
    straight away. That wheel ships a CycloneDX SBOM whose ``timestamp`` is
    its build time, which is the best date there is for the data inside.
    (The files' mtimes are when pip unpacked them, not when the data was
    made.)
    """
    for f in dist.files or ():
        if f.name.endswith(".cyclonedx.json") and "sboms" in f.parts:
            try:
                stamp = json.loads(f.read_text())["metadata"]["timestamp"]
                return int(datetime.fromisoformat(stamp[:19]).replace(tzinfo=UTC).timestamp())
            except (OSError, ValueError, KeyError, TypeError):
                return 0
    return 0


class Geo:
    """All configured sources behind one ``lookup``."""

    def __init__(self, paths: Sequence[str] = ()) -> None:
        self.embedded = not paths
        self._databases: list[_Database] = []
        self._embedded_lookup: Callable[[str], str | None] | None = None
        if self.embedded:
            import iptocc

            self._embedded_lookup = iptocc.country_code
            self.sources: tuple[SourceInfo, ...] = (_embedded_info(),)
            self._by_country: dict[str | None, GeoFacts] = {None: NO_FACTS}
        else:
            seen: set[str] = set()
            for p in paths:
                db = open_database(p)
                db.provides = set(db.info.facts - seen)
                seen |= db.info.facts
                if db.provides:  # a file that adds no new fact is not consulted
                    self._databases.append(db)
                else:
                    db.reader.close()
            self.sources = tuple(db.info for db in self._databases)
        self.capabilities: frozenset[str] = frozenset().union(*(s.facts for s in self.sources))
        self._cache: dict[int, dict[int, dict[int, GeoFacts]]] = {4: {}, 6: {}}
        self._cache_size = 0
        self.lookup_errors = 0

    def close(self) -> None:
        for db in self._databases:
            db.reader.close()

    # --- replacing a file while serving (gateway.live) ---------------------------

    @property
    def paths(self) -> tuple[str, ...]:
        """The files consulted; only these are worth watching."""
        return tuple(db.path for db in self._databases)

    def replaced(self, path: str) -> bool:
        """Whether the file at ``path`` is no longer the one that was opened."""
        db = self._by_path(path)
        return db is not None and file_identity(path) != db.identity

    def open_replacement(self, path: str) -> _Database:
        """Open and check the new file at ``path``; nothing changes yet.

        Safe to run in a thread: it touches only the new file. A file of
        another type would change what the loaded policy can ask, and an
        older build is most likely a mistake (a restored backup), so both are
        refused along with anything :func:`open_database` refuses.
        """
        old = self._by_path(path)
        if old is None:
            raise GeoDataError(f"{path}: not a configured database")
        new = open_database(path)
        problem = None
        if new.info.type != old.info.type:
            problem = f"database type {new.info.type!r} differs from the running {old.info.type!r}"
        elif new.info.build_epoch < old.info.build_epoch:
            problem = f"build_epoch {new.info.build_epoch} is older than the running one's ({old.info.build_epoch})"
        if problem:
            new.reader.close()
            raise GeoDataError(f"{path}: {problem}")
        new.provides = old.provides
        return new

    def swap(self, new: _Database) -> _Database:
        """Serve ``new`` from now on; returns the old database for the caller to close later.

        Lookups are synchronous on the event loop, so none is half-way
        through here: each one sees the old list and cache or the new ones.
        The cache is dropped because its entries came from the old data.
        """
        old = self._by_path(new.path)
        assert old is not None
        self._databases = [new if db is old else db for db in self._databases]
        self.sources = tuple(db.info for db in self._databases)
        self._cache = {4: {}, 6: {}}
        self._cache_size = 0
        return old

    def _by_path(self, path: str) -> _Database | None:
        return next((db for db in self._databases if db.path == path), None)

    def lookup(self, ip: IPAddress) -> GeoFacts:
        """Facts for a normalised public address."""
        if self._embedded_lookup is not None:
            cc = self._embedded_lookup(str(ip))
            facts = self._by_country.get(cc)
            if facts is None:
                facts = self._by_country[cc] = GeoFacts(country=cc)
            return facts
        value = int(ip)
        bits = 32 if ip.version == 4 else 128
        by_len = self._cache[ip.version]
        for plen, table in by_len.items():
            facts = table.get(value >> (bits - plen))
            if facts is not None:
                return facts
        try:
            facts, plen = self._read(ip)
        except (maxminddb.errors.InvalidDatabaseError, ValueError) as e:
            # A record broken past what open_database verified: judge the address
            # as one with no data (the policy's `unknown` default), do not cache it.
            # The address is personal data (--log-address): the log names the problem only.
            log.error("geo lookup of an IPv%d address failed: %s", ip.version, str(e).replace(str(ip), "<address>"))
            self.lookup_errors += 1
            return NO_FACTS
        if self._cache_size >= _CACHE_MAX:
            for t in by_len.values():
                t.clear()
            self._cache_size = 0
        by_len.setdefault(plen, {})[value >> (bits - plen)] = facts
        self._cache_size += 1
        return facts

    def _read(self, ip: IPAddress) -> tuple[GeoFacts, int]:
        """Decode every database and merge; the network is the narrowest returned."""
        values: dict[str, Any] = {}
        plen = 0
        for db in self._databases:
            rec, p = db.reader.get_with_prefix_len(ip)
            plen = max(plen, p)
            if not rec:
                continue
            provides = db.provides
            if COUNTRY in provides:
                values["country"] = _country(rec, "country")
            if REGISTERED_COUNTRY in provides:
                values["registered_country"] = _country(rec, "registered_country")
            if SUBDIVISIONS in provides:
                values["subdivisions"] = _subdivisions(rec)
            if ASN in provides:
                values["asn"], values["as_org"] = _asn(rec)
            if ANONYMIZER in provides:
                values["anonymizer"] = _anonymizer(rec)
        net_type = ipaddress.IPv4Network if ip.version == 4 else ipaddress.IPv6Network
        network = net_type((int(ip), plen), strict=False)
        return GeoFacts(network=str(network), **values), plen
