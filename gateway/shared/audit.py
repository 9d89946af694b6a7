"""The audit stream: refusals (or every decision) appended to a Redis stream, off the request path.

The request path only puts a small dict on a bounded in-process queue;
when the queue is full the entry is dropped and counted, never waited for.
A background task writes the queue to ``<prefix>audit`` in batches
(one pipeline of ``XADD ... MAXLEN ~ N``), so the stream stays capped at
about N entries, and, with every entry cut to a bounded size and refusals
sampled per client network (:mod:`.auditbound`), at about
:func:`.auditbound.stream_budget` bytes. Client addresses are written as the
access log writes them (``--log-address full|truncated|hashed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import itertools
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from .auditbound import (
    CLIENT_BYTES,
    CODE_BYTES,
    MAX_ENTRY_BYTES,
    MAX_SUBDIVISIONS,
    MODEL_BYTES,
    PATH_BYTES,
    RULE_BYTES,
    Source,
    SourceBuckets,
    clip,
)

AuditMode = Literal["off", "refusals", "all"]
QUEUE_SIZE = 10_000
_REFUSALS = frozenset({"deny", "rate_limited"})
BATCH = 200
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


class Audit:
    """Queue and writer for one worker. ``wants`` and ``put`` are what the request path calls."""

    def __init__(self, mode: AuditMode, maxlen: int) -> None:
        self.mode = mode
        self.maxlen = maxlen
        self.enabled = mode != "off"
        self.queue: asyncio.Queue[dict[str, Any]] | None = None
        self.dropped = 0
        self.written = 0
        self._task: asyncio.Task[None] | None = None
        self._store: Any = None
        self._sources = SourceBuckets()

    def wants(self, verdict: str) -> bool:
        return self.enabled and (self.mode == "all" or verdict in _REFUSALS)

    def put(self, entry: dict[str, Any], source: Source = None) -> None:
        """Queue ``entry``; a refusal only while its source (:func:`.auditbound.source_of`) has budget."""
        if self.queue is None:
            return
        if entry["decision"] in _REFUSALS and not self._sources.take(source, time.monotonic()):
            self._drop(1, "sampled")
            return
        try:
            self.queue.put_nowait(entry)
        except asyncio.QueueFull:
            self._drop(1, "queue_full")

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        with contextlib.suppress(Exception):
            self._store.observer.audit_dropped(reason, n)

    def start(self, store: Any) -> None:
        if not self.enabled:
            return
        self._store = store
        self.queue = asyncio.Queue(QUEUE_SIZE)
        self._task = asyncio.get_running_loop().create_task(self._write_loop())

    async def close(self) -> None:
        if self._task is None:
            return
        assert self.queue is not None
        with contextlib.suppress(TimeoutError):  # a last flush, bounded
            async with asyncio.timeout(1):
                while not self.queue.empty():
                    await asyncio.sleep(0.01)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._task, 1)

    async def _write_loop(self) -> None:
        from .redisconn import RedisUnavailable

        assert self.queue is not None
        store = self._store
        while True:
            batch = [await self.queue.get()]
            while len(batch) < BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())

            encoded = self._encode(batch)
            if not encoded:
                continue

            async def write(entries: list[bytes] = encoded) -> None:
                pipe = store.client.pipeline(transaction=False)
                for e in entries:
                    pipe.xadd(store.k_audit, {"e": e}, maxlen=self.maxlen, approximate=True)
                await pipe.execute()

            try:
                await store.breaker.call("audit", write, timeout=max(store.timeout, 0.5))
                self.written += len(encoded)
            except RedisUnavailable:
                self._drop(len(batch), "redis")
            except Exception:  # never let the writer die
                self._drop(len(batch), "error")

    def _encode(self, batch: list[dict[str, Any]]) -> list[bytes]:
        """The entries as JSON; one past :data:`.auditbound.MAX_ENTRY_BYTES` is dropped, not written."""
        out = []
        for e in batch:
            try:
                data = orjson.dumps(e)
            except orjson.JSONEncodeError:
                self._drop(1, "error")
                continue
            if len(data) > MAX_ENTRY_BYTES:  # cannot happen with entry()'s bounds: the budget holds regardless
                self._drop(1, "oversize")
                continue
            out.append(data)
        return out


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
) -> dict[str, Any]:
    """One entry, every string cut to its bound (:mod:`.auditbound`): the client chose the path and the model."""
    return {
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
) -> int:
    """Print entries as JSON lines (or collect them in ``out``); how many. Raises ``RedisUnavailable``."""
    from .redisconn import PASSWORD_ENV, RedisUnavailable, connect, describe_error, parse_url

    target = parse_url(url)
    client = connect(target, env.get(PASSWORD_ENV) or None, 5.0)
    key = f"{prefix}audit"
    shown = 0

    def emit(fields: dict[bytes, bytes]) -> None:
        nonlocal shown
        try:
            row = decode(fields)
        except (KeyError, orjson.JSONDecodeError):
            return
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
                    emit(fields)
                    start = "(" + entry_id.decode()  # exclusive: after the last one read
                if len(page) < 1000:
                    break
        elif count:
            recent = await client.xrevrange(key, count=count)
            for _, fields in reversed(recent):
                emit(fields)
        if follow:
            last = "$"
            while True:
                got = await client.xread({key: last}, block=5000, count=100)
                for _, entries in got:
                    for entry_id, fields in entries:
                        emit(fields)
                        last = entry_id.decode()
        return shown
    except Exception as e:
        if isinstance(e, asyncio.CancelledError):
            raise
        raise RedisUnavailable(f"Redis {target.url}: {describe_error(e)}") from None
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
