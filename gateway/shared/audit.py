"""The audit stream: refusals (or every decision) appended to a Redis stream, off the request path.

The request path only puts a small dict on a bounded in-process queue;
when the queue is full the entry is dropped and counted, never waited for.
A background task writes the queue to ``<prefix>audit`` in batches
(one pipeline of ``XADD ... MAXLEN ~ N``), so the stream stays capped at
about N entries, and, with every entry cut to a bounded size and refusals
sampled per client network (:mod:`.auditbound`), at about
:func:`.auditbound.stream_budget` bytes. Client addresses are written as the
access log writes them (``--log-address full|truncated|hashed``).

The writer seals each entry into this worker's HMAC chain
(:mod:`gateway.evidence.chain`) as it writes it, beside the entries of what
is in force (``record``: policy, GeoIP, override; :mod:`gateway.live.inforce`),
the hourly counts (:mod:`.auditcounts`), the worker's start and stop, and a
``gap`` entry for whatever it could not write; :mod:`.auditread` reads it
all back for ``audit verify`` and exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import itertools
import os
import socket
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from .. import __version__
from ..evidence.chain import AuditKey, Sealer
from ..evidence.entries import COUNTS, GAP, OVERRIDE, REQUEST, START, STOP, usage_fields
from ..policy.overrides import Override
from ..usage import Usage
from .auditbound import (
    CALLER_BYTES,
    CLIENT_BYTES,
    CODE_BYTES,
    MAX_ENTRY_BYTES,
    MAX_RECORD_BYTES,
    MAX_SUBDIVISIONS,
    MODEL_BYTES,
    PATH_BYTES,
    RULE_BYTES,
    Source,
    SourceBuckets,
    clip,
)
from .auditcounts import EVIDENCE_TAG, HourlyCounts

AuditMode = Literal["off", "refusals", "all"]
QUEUE_SIZE = 10_000
_REFUSALS = frozenset({"deny", "rate_limited"})
BATCH = 200
FLUSH_EVERY = 60.0  # seconds between hourly-count flushes: at most a minute of counts lost to a kill -9
GAP_RETRY = 1.0  # seconds: a pending gap is written this soon after Redis answers, traffic or not
FIELDS = (
    "time",
    "request_id",
    "decision",
    "rule",
    "country",
    "subdivisions",
    "asn",
    "path",
    "model",
    "policy",
    "client",
)


def now_iso(at: float | None = None) -> str:
    moment = datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC)
    return moment.isoformat(timespec="milliseconds")


class _Gap:
    """What this process lost since its last successful write: the content of the next ``gap`` entry."""

    __slots__ = ("after", "first", "last", "lost", "lost_seq", "prev", "reasons")

    def __init__(self, after: int, prev: str | None) -> None:
        self.after, self.prev = after, prev  # the last entry known written: the gap links to it
        self.first = self.last = time.time()
        self.lost = 0
        self.reasons: dict[str, int] = {}
        self.lost_seq: list[int] | None = None

    def add(self, n: int, reason: str, seqs: tuple[int, int] | None = None) -> None:
        self.last = time.time()
        self.lost += n
        self.reasons[reason] = self.reasons.get(reason, 0) + n
        if seqs is not None:
            lo, hi = seqs
            self.lost_seq = [min(self.lost_seq[0], lo), max(self.lost_seq[1], hi)] if self.lost_seq else [lo, hi]

    def rest(self, lost: int, reasons: dict[str, int], last: float, confirmed: tuple[int, str | None]) -> _Gap | None:
        """What was lost after a gap entry saying (``lost``, ``reasons``, ``last``) was built, if anything."""
        if self.lost == lost:
            return None
        rest = _Gap(*confirmed)
        rest.first, rest.last, rest.lost = last, self.last, self.lost - lost
        rest.reasons = {k: v - reasons.get(k, 0) for k, v in self.reasons.items() if v > reasons.get(k, 0)}
        return rest

    def entry(self) -> dict[str, Any]:
        return {
            "kind": GAP,
            "time": now_iso(),
            "after": self.after,
            "from": now_iso(self.first),
            "to": now_iso(self.last),
            "lost": self.lost,
            "reasons": dict(self.reasons),
            "lost_seq": self.lost_seq,
        }


class Audit:
    """Queue, chain and writer for one worker process.

    ``wants``, ``put`` and ``count`` are what the request path calls (each
    O(1), never waiting); ``record`` takes what was put in force (policy,
    GeoIP database, override). The writer seals each entry into this
    process's chain (:class:`gateway.evidence.chain.Sealer`) just before it
    is written, so the chain holds exactly what reached Redis, and a write
    that fails becomes a ``gap`` entry once Redis answers again.
    """

    def __init__(self, mode: AuditMode, maxlen: int, key: AuditKey | None = None) -> None:
        self.mode = mode
        self.maxlen = maxlen
        self.key = key
        self.enabled = mode != "off"
        self.queue: asyncio.Queue[dict[str, Any]] | None = None
        self.dropped = 0  # request entries not written (sampled included)
        self.written = 0  # request entries written
        self.recorded = 0  # other entries written (start, policy, geoip, override, gap, counts, stop)
        self.sampled = 0
        self.chain = ""
        self.sealer: Sealer | None = None
        self.counts = HourlyCounts()
        self._tasks: list[asyncio.Task[None]] = []
        self._store: Any = None
        self._sources = SourceBuckets()
        self._gap: _Gap | None = None
        self._confirmed: tuple[int, str | None] = (0, None)  # seq and MAC of the last entry known written
        self._texts: dict[str, str] = {}  # policy texts to store (once per sha256) with the next write
        self._dropped_by: dict[str, int] = {}
        self._busy = False  # a batch is being written

    def wants(self, verdict: str, shadow: str | None = None) -> bool:
        """Whether a request judged ``verdict`` (``shadow``: the shadow policy's, where it differs) is written:
        every refusal, every refusal the shadow policy would have made, or with ``--audit all`` everything."""
        return self.enabled and (self.mode == "all" or verdict in _REFUSALS or shadow == "deny")

    def count(self, country: str, subdivisions: Sequence[str], verdict: str, rule: str) -> None:
        """One decision in this hour's counts (:class:`.auditcounts.HourlyCounts`); O(1)."""
        if self.queue is not None:
            self.counts.add(country, subdivisions, verdict, rule)

    def put(self, entry: dict[str, Any], source: Source = None) -> None:
        """Queue ``entry``; a refusal only while its source (:func:`.auditbound.source_of`) has budget."""
        if self.queue is None:
            return
        refusal = entry["decision"] in _REFUSALS or entry.get("shadow_decision") == "deny"  # one budget for both
        if refusal and not self._sources.take(source, time.monotonic()):
            self.sampled += 1
            self.counts.sampled += 1
            self._drop(1, "sampled")
            return
        try:
            self.queue.put_nowait(entry)
        except asyncio.QueueFull:
            self._drop(1, "queue_full")

    def record(self, entry: dict[str, Any], text: tuple[str, str] | None = None) -> None:
        """Queue an entry of what is in force (never sampled); ``text`` = (sha256, policy text) to keep."""
        if self.queue is None:
            return
        if text is not None:
            self._texts.setdefault(*text)
        try:
            self.queue.put_nowait(entry)
        except asyncio.QueueFull:
            self._drop(1, "queue_full", request=False)

    def override_event(self, action: str, o: Override) -> None:
        """An override this replica added, removed, or saw expire (:attr:`.store.OverrideStore.audit_hook`)."""
        self.record(
            {
                "kind": OVERRIDE,
                "time": now_iso(),
                "action": action,
                "id": o.id,
                "override": o.action,
                "match": o.kind,
                "value": o.value,
                "by": o.by,
                "reason": o.reason,
                "ttl": None if o.expires_at is None else round(o.expires_at - o.created_at),
                "expires_at": None if o.expires_at is None else now_iso(o.expires_at),
            }
        )

    def _drop(self, n: int, reason: str, *, request: bool = True, seqs: tuple[int, int] | None = None) -> None:
        if n <= 0 and seqs is None:
            return
        if request:
            self.dropped += n
        self._dropped_by[reason] = self._dropped_by.get(reason, 0) + n
        if reason != "sampled":  # sampling is the bound working, not lost evidence: counted, not a gap
            if self._gap is None:
                self._gap = _Gap(*self._confirmed)
            self._gap.add(n, reason, seqs)
        if n > 0:
            with contextlib.suppress(Exception):
                self._store.observer.audit_dropped(reason, n)

    def start(self, store: Any, opening: Sequence[dict[str, Any]] = (), *, worker: int = 0) -> None:
        """Begin this process's chain: a ``start`` entry, then ``opening`` (what is in force now)."""
        if not self.enabled:
            return
        self._store = store
        self.queue = asyncio.Queue(QUEUE_SIZE)
        started = time.time()
        host = socket.gethostname()[:64]
        self.chain = f"{host}/{os.getpid()}/{int(started * 1000)}"
        self.sealer = Sealer(self.chain, self.key)
        self.queue.put_nowait(
            {
                "kind": START,
                "time": now_iso(started),
                "host": host,
                "pid": os.getpid(),
                "worker": worker,
                "version": __version__,
                "audit": self.mode,
                "started_at": now_iso(started),
            }
        )
        for e in opening:
            self.record(e)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write_loop()), loop.create_task(self._flush_loop())]

    async def close(self) -> None:
        """Flush the counts, write the ``stop`` entry, and end (each step bounded)."""
        if not self._tasks:
            return
        assert self.queue is not None
        self._flush_counts()
        self.record(
            {
                "kind": STOP,
                "time": now_iso(),
                "reason": "shutdown",
                "written": self.written,
                "dropped": dict(self._dropped_by),
                "sampled": self.sampled,
            }
        )
        with contextlib.suppress(TimeoutError):  # a last flush, bounded
            async with asyncio.timeout(2):
                while not self.queue.empty() or self._busy:
                    await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 1)
        self._tasks = []

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            self._flush_counts()

    def _flush_counts(self) -> None:
        """This period's counts as chained ``counts`` entries (the writer also adds them to the hourly hashes)."""
        for e in self.counts.take():
            self.record(e)

    async def _write_loop(self) -> None:
        assert self.queue is not None
        while True:
            if self._gap is not None and self.queue.empty():
                # Something was lost: say so as soon as Redis answers, even with nothing else to write.
                batch = []
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(GAP_RETRY):
                        batch = await self._next_batch()
            else:
                batch = await self._next_batch()
            self._busy = True
            try:
                await self._write(batch)
            finally:
                self._busy = False

    async def _next_batch(self) -> list[dict[str, Any]]:
        assert self.queue is not None
        first = await self.queue.get()
        return [first, *self._take(BATCH - 1)]

    def _take(self, n: int = BATCH) -> list[dict[str, Any]]:
        assert self.queue is not None
        out: list[dict[str, Any]] = []
        while len(out) < n and not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        """Seal and write ``batch`` (after the pending gap entry, if any) in one pipeline."""
        from .redisconn import RedisUnavailable

        store, sealer = self._store, self.sealer
        assert sealer is not None
        gap = self._gap
        sealed: list[tuple[dict[str, Any], bytes]] = []
        if gap is not None:
            told = (gap.lost, dict(gap.reasons), gap.last)  # what this gap entry says; later losses go in the next
            e = gap.entry()
            sealed.append((e, sealer.seal_after(e, gap.prev)))
        first_seq = sealer.seq if sealed else sealer.seq + 1
        for e in batch:
            request = e.get("kind", REQUEST) == REQUEST
            before = sealer.seq, sealer.prev
            try:
                data = sealer.seal(e)
            except (orjson.JSONEncodeError, TypeError):
                sealer.seq, sealer.prev = before  # never written, never numbered: a gap without a hole
                self._drop(1, "error", request=request)
                continue
            if len(data) > (MAX_ENTRY_BYTES if request else MAX_RECORD_BYTES):  # cannot happen with the bounds
                sealer.seq, sealer.prev = before
                self._drop(1, "oversize", request=request)
                continue
            sealed.append((e, data))
        if not sealed:
            return
        texts, self._texts = self._texts, {}
        hours = [e for e, _ in sealed if e.get("kind") == COUNTS]

        async def write() -> None:
            pipe = store.client.pipeline(transaction=False)
            for sha, text in texts.items():
                pipe.hsetnx(f"{store.prefix}{EVIDENCE_TAG}:policies", sha, text)
            for e in hours:
                HourlyCounts.write(pipe, store.prefix, e)
            for _, data in sealed:
                pipe.xadd(store.k_audit, {"e": data}, maxlen=self.maxlen, approximate=True)
            await pipe.execute()

        requests = sum(1 for e, _ in sealed if e.get("kind", REQUEST) == REQUEST)
        others = len(sealed) - requests - (gap is not None)
        try:
            await store.breaker.call("audit", write, timeout=max(store.timeout, 0.5))
        except Exception as e:  # RedisUnavailable, or anything else: never let the writer die
            reason = "redis" if isinstance(e, RedisUnavailable) else "error"
            self._texts = texts | self._texts  # for the next write: each text is stored once all the same
            for c in hours:  # the counts are not lost: they go out with the next flush
                self.counts.merge(c)
            seqs = (first_seq, sealer.seq)
            self._drop(requests, reason, seqs=seqs)
            self._drop(others, reason, request=False, seqs=seqs)
            return
        self.written += requests
        self.recorded += len(sealed) - requests
        self._confirmed = (sealer.seq, sealer.prev)
        if gap is not None:  # said; what was lost while it was being written goes in the next one
            self._gap = gap.rest(*told, self._confirmed) if self._gap is gap else self._gap


def entry(
    request_id: str,
    verdict: str,
    rule: str,
    country: str | None,
    subdivisions: Iterable[str],
    asn: int | None,
    path: str | None,
    policy: str,
    client: str | None,
    model: str | None = None,
    shadow: tuple[str, str] | None = None,
    usage: Usage | None = None,
    caller: str | None = None,
) -> dict[str, Any]:
    """One entry, every string cut to its bound (:mod:`.auditbound`): the client chose the path and the model.

    ``shadow``: the shadow policy's verdict and rule where they differ from the enforced one, so that a
    refusal the shadow policy would have made is evidence too (a would-be refusal); absent otherwise.
    ``usage`` (the tokens the response used) and ``caller`` (the client key's name) only when known, so
    that other entries keep their fields.
    """
    e: dict[str, Any] = {
        "kind": REQUEST,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "request_id": request_id,
        "decision": verdict,
        "rule": clip(rule, RULE_BYTES),
        "country": clip(country, CODE_BYTES) if country is not None else None,
        "subdivisions": [clip(s, CODE_BYTES) for s in itertools.islice(subdivisions, MAX_SUBDIVISIONS)],
        "asn": asn if isinstance(asn, int) and 0 <= asn < 1 << 32 else None,
        "path": clip(path, PATH_BYTES) if path is not None else None,
        "model": clip(model, MODEL_BYTES) if model is not None else None,  # known only when the decision read the body
        "policy": clip(policy, CLIENT_BYTES),
        "client": clip(client, CLIENT_BYTES) if client is not None else None,
    }
    if shadow is not None:
        e["shadow_decision"] = clip(shadow[0], CODE_BYTES)
        e["shadow_rule"] = clip(shadow[1], RULE_BYTES)
    if caller is not None:
        e["caller"] = clip(caller, CALLER_BYTES)
    if usage is not None:
        e["usage"] = usage_fields(usage)
    return e


# --- reading: regiongate audit tail / export ---------------------------------------------


def decode(fields: dict[bytes, bytes]) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads(fields[b"e"])
    return value


def as_csv(rows: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(FIELDS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r | {"subdivisions": " ".join(r.get("subdivisions") or [])})
    return out.getvalue()


def since_id(seconds: float, now: float | None = None) -> str:
    """The stream id of entries written ``seconds`` ago (ids start with milliseconds)."""
    now = time.time() if now is None else now
    return f"{int((now - seconds) * 1000)}-0"


async def read(
    url: str,
    prefix: str,
    env: dict[str, str],
    *,
    count: int | None = None,
    since: float | None = None,
    follow: bool = False,
    out: Any = None,
    all_kinds: bool = False,
) -> int:
    """Print request entries as JSON lines (or collect them in ``out``); how many. Raises ``RedisUnavailable``.

    The chain's other entries (start, policy, GeoIP, override, gap, counts, stop) only with ``all_kinds``.
    """
    from .redisconn import PASSWORD_ENV, RedisUnavailable, connect, describe_error, parse_url

    target = parse_url(url)
    client = connect(target, env.get(PASSWORD_ENV) or None, 5.0)
    key = f"{prefix}audit"
    shown = 0

    def wanted(fields: dict[bytes, bytes]) -> dict[str, Any] | None:
        try:
            row = decode(fields)
        except (KeyError, orjson.JSONDecodeError):
            return None
        if not all_kinds and row.get("kind", REQUEST) != REQUEST:
            return None
        return row

    def emit(row: dict[str, Any]) -> None:
        nonlocal shown
        shown += 1
        if isinstance(out, list):
            out.append(row)
        else:
            print(orjson.dumps(row).decode(), flush=True)

    try:
        if since is not None:
            start = since_id(since)
            while True:  # in pages, so a large export does not load the whole stream at once
                page = await client.xrange(key, min=start, count=1000)
                for entry_id, fields in page:
                    if (row := wanted(fields)) is not None:
                        emit(row)
                    start = "(" + entry_id.decode()  # exclusive: after the last one read
                if len(page) < 1000:
                    break
        elif count:
            recent: list[dict[str, Any]] = []
            end = "+"
            while len(recent) < count:  # backwards in pages until enough of the wanted kinds
                page = await client.xrevrange(key, max=end, count=max(count, 100))
                for entry_id, fields in page:
                    if (row := wanted(fields)) is not None and len(recent) < count:
                        recent.append(row)
                    end = "(" + entry_id.decode()
                if len(page) < max(count, 100):
                    break
            for row in reversed(recent):
                emit(row)
        if follow:
            last = "$"
            while True:
                got = await client.xread({key: last}, block=5000, count=100)
                for _, entries in got:
                    for entry_id, fields in entries:
                        if (row := wanted(fields)) is not None:
                            emit(row)
                        last = entry_id.decode()
        return shown
    except Exception as e:
        if isinstance(e, asyncio.CancelledError):
            raise
        raise RedisUnavailable(f"Redis {target.url}: {describe_error(e)}") from None
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
