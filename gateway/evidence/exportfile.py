"""The chained export file: the audit stream, the policy texts and the hourly counts, verifiable offline.

JSON Lines, UTF-8, one object a line:

1. a header: ``{"regiongate_export": 1, "exported_at", "prefix", "since", "until"}``;
2. each stream entry, in stream order: ``{"id": "<stream id>", "e": {...the entry as stored...}}``;
3. each policy text the entries name: ``{"policy_text": {"sha256", "text"}}``;
4. each hourly count: ``{"hourly": {"hour", "country", "subdivision", "decision", "rule", "n"}}``.

The entries carry their chain (``seq``, ``prev``, ``mac``), so
:func:`gateway.evidence.chain.verify` checks a file as it checks Redis; a
policy text is checked against its sha256 on reading. Reading is strict:
a line that is not one of these is an :class:`ExportError` with its line
number, never skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

FORMAT_VERSION = 1


class ExportError(ValueError):
    """A file that is not a readable export; the message names the line."""


@dataclass(frozen=True, slots=True)
class Export:
    header: dict[str, Any]
    items: list[tuple[str, Any]] = field(default_factory=list)  # (stream id, entry) in stream order
    policy_texts: dict[str, str] = field(default_factory=dict)  # sha256 -> text
    hourly: list[dict[str, Any]] = field(default_factory=list)


def header_line(exported_at: str, prefix: str, since: str | None, until: str | None) -> bytes:
    return _line(
        {
            "regiongate_export": FORMAT_VERSION,
            "exported_at": exported_at,
            "prefix": prefix,
            "since": since,
            "until": until,
        }
    )


def entry_line(stream_id: str, entry: Any) -> bytes:
    return _line({"id": stream_id, "e": entry})


def policy_line(sha256: str, text: str) -> bytes:
    return _line({"policy_text": {"sha256": sha256, "text": text}})


def hourly_line(hour: str, country: str, subdivision: str, decision: str, rule: str, n: int) -> bytes:
    row = {"hour": hour, "country": country, "subdivision": subdivision, "decision": decision, "rule": rule, "n": n}
    return _line({"hourly": row})


def _line(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj) + b"\n"


def load_export(lines: Iterable[bytes | str], origin: str = "export") -> Export:
    """Read an export file's lines; :class:`ExportError` (with ``origin:line``) if it is not one."""
    it: Iterator[bytes | str] = iter(lines)
    first = next(it, None)
    try:
        header = orjson.loads(first) if first is not None else None
    except orjson.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("regiongate_export") != FORMAT_VERSION:
        raise ExportError(f"{origin}:1: not a regiongate audit export (version {FORMAT_VERSION})")
    out = Export(header)
    for n, line in enumerate(it, 2):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise ExportError(f"{origin}:{n}: not JSON ({e})") from None
        if isinstance(obj, dict) and isinstance(obj.get("id"), str) and "e" in obj:
            out.items.append((obj["id"], obj["e"]))
        elif isinstance(obj, dict) and isinstance(pt := obj.get("policy_text"), dict):
            sha, text = pt.get("sha256"), pt.get("text")
            if not isinstance(sha, str) or not isinstance(text, str):
                raise ExportError(f"{origin}:{n}: policy_text needs sha256 and text")
            if hashlib.sha256(text.encode()).hexdigest() != sha:
                raise ExportError(f"{origin}:{n}: policy text does not match its sha256 {sha[:12]}")
            out.policy_texts[sha] = text
        elif isinstance(obj, dict) and isinstance(row := obj.get("hourly"), dict):
            out.hourly.append(row)
        else:
            raise ExportError(f"{origin}:{n}: expected an entry, a policy_text or an hourly line")
    return out
