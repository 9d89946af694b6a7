"""What a client can make the audit stream hold: a bound per entry, per stream and per source.

A refusal is written whatever the client sent, so the client decides how
big its entry is and how many there are. Three bounds keep that from filling
Redis (a scanner with 8 KiB paths once wrote about 1 GiB under
``MAXLEN ~100000``, which bounds entries, not bytes):

- **per field**: every string a client or a database can make long is cut
  to a fixed number of bytes *as JSON* (so escapes count), ending in
  ``...[truncated: N bytes]`` with the original size, so an entry is at most
  :data:`MAX_ENTRY_BYTES`;
- **per stream**: ``XADD ... MAXLEN ~ N`` then bounds the stream's memory to
  :func:`stream_budget` (N entries of at most that size, plus Redis's own
  per-entry overhead and the slack of approximate trimming);
- **per source**: a token bucket per client network (the /24 or /48 its
  address is in) and worker lets a burst of refusals through and then a
  steady few a second; the rest are dropped and counted
  (``regiongate_audit_dropped_total{reason="sampled"}``), so one scanner
  cannot push everyone else's refusals out of the stream. Allowed requests
  (``--audit all``) are never sampled.
"""

from __future__ import annotations

import ipaddress

import orjson

# Bytes of a field's JSON text (quotes excluded). Paths of the OpenAI API are under 100 bytes
# (/v1/threads/{id}/runs/{id}/steps/{id} is about 90), model names under 64.
PATH_BYTES = 512
MODEL_BYTES = 256
RULE_BYTES = 128  # a policy rule's name, or override:<id>
CALLER_BYTES = 64  # a client key's name (issue 19)
CODE_BYTES = 40  # a country or subdivision code from a database (2 to 6 characters); no less: the marker fits
CLIENT_BYTES = 64  # an address, its /24 or /48, or h:<16 hex>; the policy's sha256 too
MAX_SUBDIVISIONS = 2  # what City databases give

# The largest request entry that the bounds above allow, as JSON and with the chain's envelope (kind,
# chain id, seq, key id, prev and mac: about 330 bytes; tests/shared/test_audit_bound.py builds the
# worst one: about 2,070 bytes since the caller and the usage object, about 170 more, came with token
# budgets), rounded up; an entry past it is dropped and counted, never written.
MAX_ENTRY_BYTES = 2304
# The same for the entries of what is in force (policy, GeoIP, override, counts, gap, start, stop):
# written by the gateway, not chosen by a client, and a few per reload or flush.
MAX_RECORD_BYTES = 16_384
# What Redis adds to each entry in a stream's listpack (entry id deltas, lengths, flags: about
# 10 bytes, measured at about 20 with the radix-tree nodes shared over 100 entries), rounded up,
# and how far past MAXLEN approximate trimming may leave it (whole nodes of stream-node-max-entries,
# 100 by default).
ENTRY_OVERHEAD = 64
TRIM_SLACK = 100

# Refusals per source and worker: a burst, then a steady rate.
SOURCE_BURST = 50
SOURCE_RATE = 5.0  # per second
MAX_SOURCES = 10_000  # sources remembered per worker (about 2 MB); past it, idle ones are forgotten

_MARK = "...[truncated: {} bytes]"


def clip(text: str, limit: int) -> str:
    """``text`` if its JSON text fits in ``limit`` bytes; else a prefix that does, with the marker."""
    try:
        size = len(orjson.dumps(text)) - 2
    except orjson.JSONEncodeError:  # a lone surrogate: keep what can be shown
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        size = len(orjson.dumps(text)) - 2
    if size <= limit:
        return text
    mark = _MARK.format(size)
    room = max(0, limit - len(mark))  # every limit above leaves room for the marker
    kept = text[:room]
    while kept and (excess := len(orjson.dumps(kept)) - 2 - room) > 0:
        kept = kept[: len(kept) - max(1, excess // 6)]  # a character is at most 6 bytes of JSON (\uXXXX)
    return kept + mark


def stream_budget(maxlen: int) -> int:
    """The most memory (bytes) a stream capped at ``MAXLEN ~ maxlen`` can take, entries included."""
    return (maxlen + TRIM_SLACK) * (MAX_ENTRY_BYTES + ENTRY_OVERHEAD)


Source = int | None  # a client network as a number; None for a request without an address


def source_of(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> Source:
    """The network one bucket covers: the /24 or the /48 (what ``--log-address truncated`` writes)."""
    if ip is None:
        return None
    if ip.version == 4:
        return int(ip) >> 8
    return (int(ip) >> 80) | (1 << 48)  # above every /24, so the two families never share a bucket


class SourceBuckets:
    """A token bucket per source; ``take`` says whether one more refusal may be written."""

    def __init__(self, burst: int = SOURCE_BURST, rate: float = SOURCE_RATE, max_sources: int = MAX_SOURCES) -> None:
        self.burst = float(burst)
        self.rate = rate
        self.max_sources = max_sources
        self._buckets: dict[Source, tuple[float, float]] = {}  # tokens, when they were counted

    def take(self, source: Source, now: float) -> bool:
        tokens, then = self._buckets.get(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1:
            self._buckets[source] = (tokens, now)
            return False
        if source not in self._buckets and len(self._buckets) >= self.max_sources:
            self._forget_idle(now)
        self._buckets[source] = (tokens - 1, now)
        return True

    def _forget_idle(self, now: float) -> None:
        """Drop the sources whose bucket is full again (forgetting them changes nothing); if that
        is not enough (a flood of sources), start afresh: every source gets its burst once more."""
        full = self.burst / self.rate
        self._buckets = {s: (t, at) for s, (t, at) in self._buckets.items() if now - at < full}
        if len(self._buckets) >= self.max_sources:
            self._buckets.clear()
