"""The kinds of audit entries, as written to the stream and read back by verify and the report.

Every entry is one JSON object. Those a gateway writes now carry an
envelope (:class:`Entry`: ``kind``, ``time``, ``chain``, ``seq``, ``kid``,
``prev``, ``mac``) and the fields of their kind; entries written before the
chain existed have no ``kind`` and read as unchained requests. The writers
build plain dicts with the ``*_fields`` functions below (one place for the
field names); readers get frozen dataclasses from :func:`parse_entry`, which
checks every field's type and raises :class:`EntryError` rather than letting
a malformed entry through.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..usage import Usage

REQUEST, START, STOP, POLICY, GEOIP, OVERRIDE, GAP, COUNTS = (
    "request", "start", "stop", "policy", "geoip", "override", "gap", "counts",
)  # fmt: skip
TRIGGERS = ("start", "watch", "admin", "sighup")
OVERRIDE_ACTIONS = ("added", "removed", "expired")
ENVELOPE = ("kind", "time", "chain", "seq", "kid", "prev", "mac")
_OPTIONAL_ENVELOPE = frozenset(ENVELOPE[2:])


class EntryError(ValueError):
    """An entry that is not what its kind says (a field missing or of the wrong type)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """The envelope every chained entry has; ``chain`` and ``seq`` are None on a pre-chain entry."""

    kind: str
    time: str
    chain: str | None
    seq: int | None
    kid: str | None  # None: written without REGIONGATE_AUDIT_KEY (unsigned)
    prev: str | None
    mac: str | None

    KIND: ClassVar[str] = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestEntry(Entry):
    """A judged request: every refusal, or every decision with ``--audit all``."""

    request_id: str
    decision: str
    rule: str
    country: str | None
    subdivisions: list[str]
    asn: int | None
    path: str | None
    model: str | None
    policy: str
    client: str | None
    # The shadow policy's verdict and rule where they differed from the enforced decision (absent before).
    shadow_decision: str | None = None
    shadow_rule: str | None = None
    # The client key's name, when client keys were in force, and the tokens the response used
    # (usage_fields' shape), when it was read (both absent before issue 19).
    caller: str | None = None
    usage: dict[str, Any] | None = None

    KIND: ClassVar[str] = REQUEST

    def __post_init__(self) -> None:
        if self.usage is not None:
            check_usage(self.usage)


@dataclass(frozen=True, slots=True, kw_only=True)
class StartEntry(Entry):
    """A gateway worker process began writing: always ``seq`` 1 of its chain."""

    host: str
    pid: int
    worker: int
    version: str
    audit: str
    started_at: str

    KIND: ClassVar[str] = START


@dataclass(frozen=True, slots=True, kw_only=True)
class StopEntry(Entry):
    """The process stopped cleanly: the last entry of its chain."""

    reason: str
    written: int
    dropped: dict[str, int]
    sampled: int

    KIND: ClassVar[str] = STOP


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyEntry(Entry):
    """A policy (or shadow policy) put in force; its text is stored once per sha256 beside the stream."""

    role: str  # "policy" or "shadow"
    sha256: str
    version: str
    path: str
    loaded_at: str
    trigger: str  # one of TRIGGERS

    KIND: ClassVar[str] = POLICY


@dataclass(frozen=True, slots=True, kw_only=True)
class GeoipEntry(Entry):
    """A GeoIP database in force (at start, or swapped in by a reload)."""

    path: str
    type: str
    build: str | None  # the database's build date (ISO), None when it has none
    sha256: str
    trigger: str

    KIND: ClassVar[str] = GEOIP


@dataclass(frozen=True, slots=True, kw_only=True)
class OverrideEntry(Entry):
    """A runtime override added, removed, or expired, recorded by the gateway that did it."""

    action: str  # one of OVERRIDE_ACTIONS
    id: str
    override: str  # what it does: allow or deny
    match: str  # what it matches: cidr, country, subdivision, api_key
    value: str
    by: str
    reason: str
    ttl: int | None
    expires_at: str | None

    KIND: ClassVar[str] = OVERRIDE


@dataclass(frozen=True, slots=True, kw_only=True)
class GapEntry(Entry):
    """Evidence this process lost (queue full, Redis away), recorded once it could write again.

    ``prev`` is the MAC of entry ``after``, the last one known written;
    ``lost_seq`` the sequence numbers a failed write may have left out.
    """

    after: int
    from_: str
    to: str
    lost: int
    reasons: dict[str, int]
    lost_seq: list[int] | None

    KIND: ClassVar[str] = GAP
    RENAMED: ClassVar[dict[str, str]] = {"from_": "from"}


@dataclass(frozen=True, slots=True, kw_only=True)
class CountsEntry(Entry):
    """Decisions counted in one UTC hour since this process's previous flush.

    ``rows`` are ``[country, subdivision, decision, rule, n]``; ``sampled``
    the refusals not stored one by one because of per-source sampling.
    """

    hour: str  # YYYY-MM-DDTHH
    rows: list[list[Any]]
    sampled: int

    KIND: ClassVar[str] = COUNTS


# The ``usage`` object of a request entry and of an access-log line, member by member; ``cached`` and
# ``reasoning`` only when not 0 (most responses have neither), the others always.
USAGE_TYPES: dict[str, type] = {"input": int, "output": int, "cached": int, "reasoning": int, "source": str}
USAGE_OPTIONAL = frozenset({"cached", "reasoning"})


def usage_fields(usage: Usage) -> dict[str, Any]:
    """``usage`` as the audit stream and the access log write it (``usage.input``, ``usage.source``, ...)."""
    out: dict[str, Any] = {"input": usage.input, "output": usage.output}
    if usage.cached:
        out["cached"] = usage.cached
    if usage.reasoning:
        out["reasoning"] = usage.reasoning
    out["source"] = usage.source
    return out


def check_usage(raw: Mapping[str, Any]) -> None:
    """:class:`EntryError` unless ``raw`` has :data:`USAGE_TYPES`' members (the optional ones may be
    missing) and no others, each of its type, counts not negative."""
    if not set(USAGE_TYPES) - USAGE_OPTIONAL <= set(raw) <= set(USAGE_TYPES):
        raise EntryError(f"request entry: 'usage' has {sorted(raw)}, expected {sorted(USAGE_TYPES)}")
    for key, value in raw.items():
        kind = USAGE_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, kind) or (isinstance(value, int) and value < 0):
            raise EntryError(f"request entry: 'usage.{key}' is {value!r}, expected a {kind.__name__}")
    if raw["source"] not in ("usage", "estimate"):
        raise EntryError(f"request entry: 'usage.source' is {raw['source']!r}, expected usage or estimate")


KINDS: dict[str, type[Entry]] = {
    c.KIND: c
    for c in (RequestEntry, StartEntry, StopEntry, PolicyEntry, GeoipEntry, OverrideEntry, GapEntry, CountsEntry)
}

_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "str | None": (str, type(None)),
    "int": (int,),
    "int | None": (int, type(None)),
    "list[str]": (list,),
    "list[int] | None": (list, type(None)),
    "list[list[Any]]": (list,),
    "dict[str, int]": (dict,),
    "dict[str, Any] | None": (dict, type(None)),
}


def parse_entry(raw: Mapping[str, Any]) -> Entry:
    """The entry ``raw`` (one decoded stream item) as its dataclass; :class:`EntryError` if malformed."""
    if not isinstance(raw, Mapping):
        raise EntryError("an entry is a JSON object")
    kind = raw.get("kind", REQUEST)  # entries from before the chain are requests without an envelope
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise EntryError(f"unknown entry kind {kind!r}")
    renamed: dict[str, str] = getattr(cls, "RENAMED", {})
    values: dict[str, Any] = {}
    for f in fields(cls):
        key = renamed.get(f.name, f.name)
        value = raw.get(key, kind if key == "kind" else None)
        allowed = _TYPES[str(f.type)]
        if isinstance(value, bool) or not isinstance(value, allowed):  # bool is an int to Python, not to us
            if value is None and f.name in _OPTIONAL_ENVELOPE:  # a pre-chain entry has no envelope
                values[f.name] = None
                continue
            raise EntryError(f"{kind} entry: {key!r} is {type(value).__name__}, expected {f.type}")
        values[f.name] = value
    return cls(**values)
