"""The HMAC chain over audit entries: canonical form, sealing, and verification.

Each gateway worker process keeps one chain (``chain`` = host/pid/start
milliseconds), so replicas and workers never share state or contend for a
lock. The :class:`Sealer` numbers every entry it writes (``seq`` 1, 2, ...),
names the key (``kid``), stores the previous entry's MAC (``prev``) and adds
``mac`` = HMAC-SHA256(key, ``regiongate-audit-v1\\n`` + canonical form),
where the canonical form is the entry without ``mac`` as JSON with sorted
keys, no whitespace, UTF-8 (orjson). ``prev`` is inside what is MACed, so
each MAC covers the entry's content and the MAC before it.

:func:`verify` walks each chain in stream (or file) order and reports, per
chain, OK or the first entry altered (its MAC does not match), removed (a
sequence number missing, with the neighbours' numbers and times) or
reordered (a number that comes after a larger one). A ``gap`` entry that
the gateway wrote itself (it lost entries while Redis was away) links back
to the last entry known written and is reported as a declared gap, not as
tampering. What a chain cannot show by itself is said as a notice, not a
failure: a chain that begins past ``seq`` 1 (the stream's ``MAXLEN``
trims the oldest entries) and one without a ``stop`` entry (still running,
killed, or its tail removed).

Pure: the keys and entries come from the caller.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from .entries import GAP, START, STOP

DOMAIN = b"regiongate-audit-v1\n"
MIN_KEY_BYTES = 16  # 128 bits; `openssl rand -hex 32` gives 64 characters
MAX_PROBLEMS = 20  # per chain: the first names where to look, the rest how far it goes
_KID = re.compile(r"[A-Za-z0-9._-]{1,32}")


class AuditKeyError(ValueError):
    """A key or key id that cannot be used; the message never holds the secret."""


@dataclass(frozen=True, slots=True)
class AuditKey:
    """One HMAC key and its id. ``repr`` never shows the secret."""

    kid: str
    secret: bytes = field(repr=False)


def make_key(kid: str, secret: str) -> AuditKey:
    if not _KID.fullmatch(kid):
        raise AuditKeyError(f"audit key id {kid[:40]!r}: use 1 to 32 of A-Z a-z 0-9 . _ -")
    raw = secret.encode()
    if len(raw) < MIN_KEY_BYTES:
        raise AuditKeyError(
            f"audit key {kid!r} is {len(raw)} bytes; at least {MIN_KEY_BYTES} (e.g. openssl rand -hex 32)"
        )
    return AuditKey(kid, raw)


KEY_ENV, KEY_ID_ENV = "REGIONGATE_AUDIT_KEY", "REGIONGATE_AUDIT_KEY_ID"
DEFAULT_KID = "default"


def key_from_env(env: Mapping[str, str]) -> AuditKey | None:
    """The signing key: ``REGIONGATE_AUDIT_KEY``, named by ``REGIONGATE_AUDIT_KEY_ID``; None if unset."""
    secret = env.get(KEY_ENV)
    if not secret:
        return None
    return make_key(env.get(KEY_ID_ENV) or DEFAULT_KID, secret)


def parse_key_file(text: str, origin: str = "key file") -> dict[str, bytes]:
    """``kid:secret`` lines (blank lines and ``#`` comments skipped) as ``{kid: secret}``."""
    keys: dict[str, bytes] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kid, sep, secret = line.partition(":")
        if not sep:
            raise AuditKeyError(f"{origin}:{n}: expected kid:secret")
        try:
            key = make_key(kid.strip(), secret.strip())
        except AuditKeyError as e:
            raise AuditKeyError(f"{origin}:{n}: {e}") from None
        keys[key.kid] = key.secret
    return keys


def canonical(entry: Mapping[str, Any]) -> bytes:
    """The bytes a MAC covers: every field but ``mac``, sorted keys, compact JSON, UTF-8."""
    return orjson.dumps({k: v for k, v in entry.items() if k != "mac"}, option=orjson.OPT_SORT_KEYS)


def mac(secret: bytes, entry: Mapping[str, Any]) -> str:
    return hmac.new(secret, DOMAIN + canonical(entry), hashlib.sha256).hexdigest()


class Sealer:
    """Numbers, links and MACs one process's entries, in the order they are written."""

    __slots__ = ("chain", "key", "prev", "seq")

    def __init__(self, chain: str, key: AuditKey | None) -> None:
        self.chain = chain
        self.key = key
        self.seq = 0
        self.prev: str | None = None

    def seal(self, entry: dict[str, Any]) -> bytes:
        """``entry`` with its envelope, linked to the entry sealed before it, as the JSON to store."""
        return self.seal_after(entry, self.prev)

    def seal_after(self, entry: dict[str, Any], prev: str | None) -> bytes:
        """The same, linked to ``prev`` instead: a gap entry links to the last entry known written."""
        self.seq += 1
        entry = dict(entry)  # the caller's dict stays as it was (one may be queued more than once)
        entry["chain"] = self.chain
        entry["seq"] = self.seq
        if self.key is None:  # unsigned: numbered, so verify can still say what is missing, but not MACed
            entry["kid"] = entry["prev"] = entry["mac"] = None
            return orjson.dumps(entry)
        entry["kid"] = self.key.kid
        entry["prev"] = prev
        body = canonical(entry)
        entry["mac"] = self.prev = hmac.new(self.key.secret, DOMAIN + body, hashlib.sha256).hexdigest()
        return body[:-1] + b',"mac":"' + self.prev.encode() + b'"}'


# --- verification ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with a chain, located."""

    what: str  # altered | removed | reordered | unsigned | unknown_key
    seq: int | None  # the entry named (for removed: the first missing number)
    stream_id: str  # where the entry named is (for removed: the entry after the hole)
    time: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class DeclaredGap:
    """Entries the gateway itself says it lost (a ``gap`` entry)."""

    seq: int
    start: str
    end: str
    lost: int
    reasons: dict[str, int]


@dataclass(frozen=True, slots=True)
class ChainReport:
    chain: str
    entries: int
    first_seq: int
    last_seq: int
    first_time: str
    last_time: str
    stopped: bool  # ends with a stop entry
    gaps: tuple[DeclaredGap, ...]
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def notices(self) -> list[str]:
        out = []
        if self.first_seq > 1:
            out.append(f"begins at seq {self.first_seq} ({self.first_time}): earlier entries trimmed or removed")
        if not self.stopped:
            out.append(
                f"no stop entry after seq {self.last_seq} ({self.last_time}): running, killed, or its end removed"
            )
        return out


@dataclass(frozen=True, slots=True)
class Verification:
    chains: tuple[ChainReport, ...]
    unchained: int  # entries from before the chain (no chain id): not covered
    malformed: tuple[str, ...]  # stream ids of entries that are not entries at all

    @property
    def ok(self) -> bool:
        return not self.malformed and all(c.ok for c in self.chains)


def verify(items: Iterable[tuple[str, Any]], keys: Mapping[str, bytes]) -> Verification:
    """Check every chain in ``items`` (stream id, decoded entry), in their order, with ``keys`` by kid."""
    chains: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    unchained = 0
    malformed: list[str] = []
    for sid, raw in items:
        if not isinstance(raw, Mapping):
            malformed.append(sid)
            continue
        chain, seq = raw.get("chain"), raw.get("seq")
        if chain is None and "kind" not in raw:
            unchained += 1
        elif not isinstance(chain, str) or not isinstance(seq, int) or isinstance(seq, bool):
            malformed.append(sid)
        else:
            chains.setdefault(chain, []).append((sid, raw))
    reports = tuple(_verify_chain(name, got, keys) for name, got in chains.items())
    return Verification(reports, unchained, tuple(malformed))


def _verify_chain(name: str, got: list[tuple[str, Mapping[str, Any]]], keys: Mapping[str, bytes]) -> ChainReport:
    problems: list[Problem] = []
    gaps: list[DeclaredGap] = []
    order = sorted({raw["seq"] for _, raw in got})  # to find a missing number elsewhere in O(log n), however large
    macs: dict[int, Any] = {}
    last_seq: int | None = None
    last_time = ""

    def problem(what: str, seq: int | None, sid: str, time: Any, detail: str) -> None:
        problems.append(Problem(what, seq, sid, time if isinstance(time, str) else None, detail))

    for sid, raw in got:
        seq: int = raw["seq"]
        time = raw.get("time")
        kid = raw.get("kid")
        if kid is None:
            problem("unsigned", seq, sid, time, "written without REGIONGATE_AUDIT_KEY: cannot be checked")
        elif not isinstance(kid, str) or kid not in keys:
            problem("unknown_key", seq, sid, time, f"key id {str(kid)[:40]!r} not given to verify")
        elif not _mac_matches(keys[kid], raw):
            problem("altered", seq, sid, time, f"seq {seq}: its MAC does not match its content")
        if last_seq is None:
            if seq == 1 and raw.get("kind") != START:
                problem("altered", seq, sid, time, "seq 1 is not a start entry")
            elif (earlier := _present_between(order, 0, seq)) is not None:
                problem("reordered", seq, sid, time, f"seq {seq} comes before seq {earlier}")
        elif seq <= last_seq:
            problem("reordered", seq, sid, time, f"seq {seq} comes after seq {last_seq}")
            continue  # keep judging what follows against the furthest entry seen
        elif _declared(raw, macs):  # before the link check: a gap links to the last entry known written
            gaps.append(_gap(raw))
        elif seq == last_seq + 1:
            if kid is not None and raw.get("prev") != macs.get(last_seq):
                problem("removed", seq, sid, time, f"seq {seq} does not follow the seq {last_seq} present")
        else:
            hole = range(last_seq + 1, seq)
            if (moved := _present_between(order, last_seq, seq)) is not None:
                problem("reordered", seq, sid, time, f"seq {seq} comes before seq {moved}")
            else:
                missing = f"seq {hole.start}..{hole.stop - 1} missing"
                problem("removed", hole.start, sid, time, f"{missing}, between {last_time} (seq {last_seq}) and {time}")
        macs[seq] = raw.get("mac")
        last_seq, last_time = seq, time if isinstance(time, str) else ""
    first = got[0][1]
    return ChainReport(
        chain=name,
        entries=len(got),
        first_seq=first["seq"],
        last_seq=last_seq if last_seq is not None else first["seq"],
        first_time=str(first.get("time")),
        last_time=last_time,
        stopped=got[-1][1].get("kind") == STOP,
        gaps=tuple(gaps),
        problems=tuple(problems[:MAX_PROBLEMS]),
    )


def _present_between(order: list[int], low: int, high: int) -> int | None:
    """The smallest sequence number present strictly between ``low`` and ``high``, if any."""
    i = bisect.bisect_right(order, low)
    return order[i] if i < len(order) and order[i] < high else None


def _mac_matches(secret: bytes, raw: Mapping[str, Any]) -> bool:
    try:
        expected = mac(secret, raw)
    except (orjson.JSONEncodeError, TypeError):  # a value no writer could have written (an integer past 64 bits)
        return False
    return hmac.compare_digest(str(raw.get("mac")).encode(), expected.encode())


def _declared(raw: Mapping[str, Any], macs: Mapping[int, Any]) -> bool:
    """A gap entry that links to an entry present: the gateway's own account of what it lost."""
    after = raw.get("after")
    return (
        raw.get("kind") == GAP
        and isinstance(after, int)
        and after in macs
        and (raw.get("kid") is None or raw.get("prev") == macs[after])
    )


def _gap(raw: Mapping[str, Any]) -> DeclaredGap:
    reasons = raw.get("reasons")
    lost = raw.get("lost")
    return DeclaredGap(
        seq=raw["seq"],
        start=str(raw.get("from")),
        end=str(raw.get("to")),
        lost=lost if isinstance(lost, int) else 0,
        reasons=dict(reasons) if isinstance(reasons, dict) else {},
    )
