"""Decisions counted per UTC hour by country, subdivision, decision and rule: allowed traffic screened cheaply.

The request path adds one to a plain dict (one ``time.time()``, one tuple,
one dict update: no I/O, no lock; a worker is one thread). The audit writer
takes the dict every :data:`.audit.FLUSH_EVERY` seconds and at stop, puts
its rows in the chain as ``counts`` entries, and adds them to one Redis hash
per hour, ``<prefix>{evidence}:counts:<YYYY-MM-DDTHH>`` (HINCRBY, field
``["country","subdivision","decision","rule"]`` as JSON), summed over every
gateway, kept :data:`COUNTS_TTL`. The dict holds at most one key per
(hour, country, named subdivision, decision, rule): bounded by the policy
(rules, the subdivisions its rules name) and the ~250 country values, not by
traffic. A subdivision is kept only where a rule names it, so a country's
regions do not multiply the keys.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Sequence
from typing import Any

import orjson

EVIDENCE_TAG = "{evidence}"  # one hash slot in a Cluster for every evidence key
COUNTS_TTL = 400 * 86_400  # a SOC 2 window is 12 months; a month to spare for the report
ROWS_PER_ENTRY = 40  # a row is at most about 250 bytes (a rule name is cut at 128): an entry stays under 12 KiB

CountKey = tuple[int, str, str, str, str]  # hour (epoch hours), country, subdivision, decision, rule


def hour_text(hour: int) -> str:
    return time.strftime("%Y-%m-%dT%H", time.gmtime(hour * 3600))


def counts_key(prefix: str, hour: str) -> str:
    return f"{prefix}{EVIDENCE_TAG}:counts:{hour}"


class HourlyCounts:
    """One worker's counts since its last flush."""

    __slots__ = ("_counts", "named", "sampled")

    def __init__(self) -> None:
        self._counts: dict[CountKey, int] = {}
        self.named: frozenset[str] = frozenset()  # subdivisions some rule of the active policy names
        self.sampled = 0  # refusals not stored one by one (per-source sampling) since the last flush

    def add(self, country: str, subdivisions: Sequence[str], verdict: str, rule: str) -> None:
        sub = ""
        if self.named:
            for s in subdivisions:
                if s in self.named:
                    sub = s
                    break
        key = (int(time.time()) // 3600, country, sub, verdict, rule)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1

    def take(self) -> list[dict[str, Any]]:
        """The counts as ``counts`` entries (empty when nothing was counted), and start afresh."""
        counts, self._counts = self._counts, {}
        sampled, self.sampled = self.sampled, 0
        by_hour: dict[int, list[list[Any]]] = {}
        for (hour, country, sub, verdict, rule), n in counts.items():
            by_hour.setdefault(hour, []).append([country, sub, verdict, rule, n])
        if sampled and not by_hour:
            by_hour[int(time.time()) // 3600] = []
        out: list[dict[str, Any]] = []
        for hour, rows in sorted(by_hour.items()):
            for i in range(0, max(len(rows), 1), ROWS_PER_ENTRY):
                out.append(
                    {
                        "kind": "counts",
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime()),
                        "hour": hour_text(hour),
                        "rows": rows[i : i + ROWS_PER_ENTRY],
                        "sampled": sampled if not out else 0,
                    }
                )
        return out

    def merge(self, entry: dict[str, Any]) -> None:
        """Put a ``counts`` entry that could not be written back, to go out with the next flush."""
        hour = calendar.timegm(time.strptime(entry["hour"], "%Y-%m-%dT%H"))
        for country, sub, verdict, rule, n in entry["rows"]:
            key = (hour // 3600, country, sub, verdict, rule)
            self._counts[key] = self._counts.get(key, 0) + n
        self.sampled += entry["sampled"]

    @staticmethod
    def write(pipe: Any, prefix: str, entry: dict[str, Any]) -> None:
        """Queue a ``counts`` entry's HINCRBYs (and the hash's expiry) on a Redis pipeline."""
        key = counts_key(prefix, entry["hour"])
        for row in entry["rows"]:
            pipe.hincrby(key, orjson.dumps(row[:4]), row[4])
        pipe.expire(key, COUNTS_TTL)
