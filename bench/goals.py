"""The gateway's performance targets, each reported PASS or MISS with its margin.

A target that compares with a figure measured once (the previous data plane's CPU per relayed
event, measured before that plane was removed) reads it from docs/internals/benchmarks.md, the
one place the dated figures are kept, not from a constant here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import REPO_DIR, BenchError
from .wrk import THROUGHPUT_CONNECTIONS, TargetResult

TARGET_RPS = 10000.0
TARGET_ADDED_P50_MS = 0.15
TARGET_STREAM_CPU_RATIO = 1 / 3  # native CPU per relayed event vs the previous data plane's
TARGET_HELD_KIB = 8.0
TARGET_TAP_CPU_RATIO = 1.3  # CPU per relayed event through a usage tap (a token budget) vs the plain relay's
# The dated figures: one table row per recorded figure, `| `key` | value | unit | date | how |`.
RECORDED = REPO_DIR / "docs" / "internals" / "benchmarks.md"
PREVIOUS_STREAM_CPU = "previous_stream_cpu_us"  # the figure TARGET_STREAM_CPU_RATIO compares with
_ROW = re.compile(r"^\|\s*`(?P<key>[a-z0-9_]+)`\s*\|\s*(?P<value>[0-9]+(?:\.[0-9]+)?)\s*\|", re.M)


def recorded_figures(path: Path = RECORDED) -> dict[str, float]:
    """The recorded figures by key, read before anything starts so that a missing one stops the run."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise BenchError(f"cannot read the recorded figures: {e}") from None
    figures = {m["key"]: float(m["value"]) for m in _ROW.finditer(text)}
    if PREVIOUS_STREAM_CPU not in figures:
        raise BenchError(f"{path}: no recorded figure `{PREVIOUS_STREAM_CPU}` in its table of recorded figures")
    return figures


@dataclass(frozen=True)
class Goal:
    name: str
    measured: float
    threshold: float
    unit: str
    passed: bool
    margin: float  # positive when met, by how much; negative when missed


def evaluate(
    results: dict[str, TargetResult], streams: dict[str, Any] | None, recorded: Mapping[str, float]
) -> list[Goal]:
    """The gateway's performance targets; missing one is reported, not an error."""
    gw = results.get("gateway")
    if gw is None:
        return []
    goals = stream_goals(streams or {}, recorded[PREVIOUS_STREAM_CPU])
    goals[:0] = [
        Goal(
            f"gateway req/s @{THROUGHPUT_CONNECTIONS} >= {TARGET_RPS:,.0f}",
            gw.throughput.rps, TARGET_RPS, "req/s",
            gw.throughput.rps >= TARGET_RPS, gw.throughput.rps - TARGET_RPS,
        ),
    ]  # fmt: skip
    if gw.added_p50_ms is not None:
        goals.append(
            Goal(
                f"gateway added p50 @1 < {TARGET_ADDED_P50_MS:g} ms",
                gw.added_p50_ms, TARGET_ADDED_P50_MS, "ms",
                gw.added_p50_ms < TARGET_ADDED_P50_MS, TARGET_ADDED_P50_MS - gw.added_p50_ms,
            )
        )  # fmt: skip
    return goals


def stream_goals(streams: dict[str, Any], previous_cpu_us: float) -> list[Goal]:
    """``previous_cpu_us``: the previous data plane's CPU per relayed event, as recorded."""
    goals = []
    native = streams.get("gateway")
    if native:
        new, old = native["relay"]["cpu_us_per_event"], previous_cpu_us
        if new:
            ratio = new / old
            goals.append(
                Goal(
                    f"stream CPU per event <= {TARGET_STREAM_CPU_RATIO:.2f} x the previous data plane's "
                    f"({previous_cpu_us:g} µs, recorded)",
                    round(ratio, 3), TARGET_STREAM_CPU_RATIO, "x",
                    ratio <= TARGET_STREAM_CPU_RATIO, TARGET_STREAM_CPU_RATIO - ratio,
                )
            )  # fmt: skip
    tapped = streams.get("gateway-tokens")
    if native and tapped and native["relay"]["cpu_us_per_event"] and tapped["relay"]["cpu_us_per_event"]:
        ratio = tapped["relay"]["cpu_us_per_event"] / native["relay"]["cpu_us_per_event"]
        goals.append(
            Goal(
                f"stream CPU per event with a token budget (usage tap) <= {TARGET_TAP_CPU_RATIO:g} x the plain relay's",
                round(ratio, 3), TARGET_TAP_CPU_RATIO, "x",
                ratio <= TARGET_TAP_CPU_RATIO, TARGET_TAP_CPU_RATIO - ratio,
            )
        )  # fmt: skip
    if native and native["held"]["kib_per_stream"] is not None:
        kib = native["held"]["kib_per_stream"]
        goals.append(
            Goal(
                f"held stream memory <= {TARGET_HELD_KIB:g} KiB ({native['held']['streams']:,} streams)",
                kib, TARGET_HELD_KIB, "KiB", kib <= TARGET_HELD_KIB, TARGET_HELD_KIB - kib,
            )
        )  # fmt: skip
    return goals
