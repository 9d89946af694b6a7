"""Reading the evidence back from Redis: the chained stream, the policy texts and the hourly counts.

What ``regiongate audit verify`` and ``audit export --format chain`` (and
the evidence report) read. The stream is read in pages of 1,000 (XRANGE),
so a long stream is never one reply; entries are decoded but otherwise
handed on as stored, for :mod:`gateway.evidence.chain` to judge.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..evidence.exportfile import Export
from .auditcounts import EVIDENCE_TAG, counts_key, hour_text

PAGE = 1000


@dataclass
class Evidence:
    """What one read gave: entries in stream order, policy texts by sha256, hourly count rows."""

    items: list[tuple[str, Any]] = field(default_factory=list)
    policy_texts: dict[str, str] = field(default_factory=dict)
    hourly: list[dict[str, Any]] = field(default_factory=list)

    def as_export(self, header: dict[str, Any]) -> Export:
        return Export(header, self.items, self.policy_texts, self.hourly)


def _decode(fields: Mapping[bytes, bytes]) -> Any:
    try:
        return orjson.loads(fields[b"e"])
    except (KeyError, orjson.JSONDecodeError):
        return None  # not an entry: verify names it as malformed


async def read_evidence(
    url: str,
    prefix: str,
    env: dict[str, str],
    *,
    since: float | None = None,
    until: float | None = None,
    hourly: bool = True,
) -> Evidence:
    """Everything between ``since`` and ``until`` (Unix times; None: the whole stream, up to now);
    the hourly counts only with ``hourly`` (verify needs the entries alone).

    Raises ``RedisUnavailable`` (with the URL redacted) when Redis cannot be read.
    """
    from .redisconn import PASSWORD_ENV, RedisUnavailable, connect, describe_error, parse_url

    target = parse_url(url)
    client = connect(target, env.get(PASSWORD_ENV) or None, 5.0)
    out = Evidence()
    try:
        start = f"{int(since * 1000)}-0" if since is not None else "-"
        end = f"{int(until * 1000)}-99999999" if until is not None else "+"
        while True:
            page = await client.xrange(f"{prefix}audit", min=start, max=end, count=PAGE)
            for entry_id, fields in page:
                out.items.append((entry_id.decode(), _decode(fields)))
                start = "(" + entry_id.decode()
            if len(page) < PAGE:
                break
        shas = sorted(
            {e["sha256"] for _, e in out.items if isinstance(e, dict) and e.get("kind") == "policy" and "sha256" in e}
        )
        if shas:
            texts = await client.hmget(f"{prefix}{EVIDENCE_TAG}:policies", shas)
            out.policy_texts = {sha: t.decode() for sha, t in zip(shas, texts, strict=True) if t is not None}
        if hourly:
            first = int((since if since is not None else _first_time(out)) // 3600)
            last = int((until if until is not None else time.time()) // 3600)
            hours = [hour_text(h) for h in range(first, last + 1)]
            for i in range(0, len(hours), 500):  # one round trip per 500 hours (three weeks)
                pipe = client.pipeline(transaction=False)
                for text in hours[i : i + 500]:
                    pipe.hgetall(counts_key(prefix, text))
                for text, got in zip(hours[i : i + 500], await pipe.execute(), strict=True):
                    for f, n in got.items():
                        country, sub, decision, rule = orjson.loads(f)
                        row = {"country": country, "subdivision": sub, "decision": decision, "rule": rule}
                        out.hourly.append({"hour": text, **row, "n": int(n)})
        return out
    except Exception as e:
        if isinstance(e, asyncio.CancelledError):
            raise
        raise RedisUnavailable(f"Redis {target.url}: {describe_error(e)}") from None
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


def _first_time(ev: Evidence) -> float:
    """The stream's first entry's time (its id starts with milliseconds); now when the stream is empty."""
    if not ev.items:
        return time.time()
    return int(ev.items[0][0].split("-")[0]) / 1000
