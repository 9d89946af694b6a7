"""Where overrides are kept: in this process's memory, or in Redis for every replica.

Either way the request path reads :attr:`OverrideStore.compiled`, an
immutable table swapped whole (one attribute assignment, atomic under the
event loop), so it never waits on Redis.

Redis layout, all keys under ``--redis-prefix`` and one hash tag (so a
Redis Cluster keeps them in one slot): ``<prefix>{overrides}:data``, a
hash of id -> JSON; ``<prefix>{overrides}:version``, bumped on every change;
``<prefix>{overrides}:key``, the shared HMAC key for API-key overrides
(unless ``REGIONGATE_OVERRIDE_KEY`` is set); and the pub/sub channel
``<prefix>overrides:changed``. A replica applies a change when the channel
says so, and in any case within ``SYNC_INTERVAL`` (it reads the version
counter and fetches the hash only when it moved), so a missed message heals
(:mod:`.follow`, which the client keys use too).

Expiry is judged by each replica against its own copy, so an override
expires on time even while Redis is down; expired entries are deleted
from Redis by whichever replica sees them first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from ..policy.overrides import EMPTY, Compiled, Override, OverrideError, compile_overrides
from ..policy.ratelimit import RateLimit, gcra, key_start, redis_key
from .budgetmemory import MemoryBudgets
from .budgetredis import RedisBudgets
from .follow import Follower
from .ratebatch import Batcher, Then
from .ratelimit import GCRA_LUA, outcomes_from_script, script_args
from .redisconn import Breaker, NullObserver, Observer, RedisTarget, RedisUnavailable, connect, describe_error

log = logging.getLogger("regiongate")

OVERRIDE_KEY_ENV = "REGIONGATE_OVERRIDE_KEY"
SYNC_INTERVAL = 0.5
EXPIRY_CHECK = 0.25


class StoreObserver(Observer, Protocol):
    def overrides(self, counts: dict[str, int]) -> None: ...

    def rate_limited(self, rule: str, by: str) -> None: ...

    def audit_dropped(self, reason: str, n: int) -> None: ...

    # Token budgets (:mod:`.budgets`): a limit that Redis could not be asked about, and a refusal by kind.
    def budget_fallback(self, rule: str, what: str) -> None: ...

    def budget_refused(self, rule: str, kind: str) -> None: ...


class OverrideStore:
    """The in-memory store (one process); :class:`RedisStore` shares it between replicas."""

    backend = "memory"
    # Rate-limit subjects that are addresses kept as keyed hashes (--log-address hashed or truncated).
    hash_addresses = False

    def __init__(self, env: dict[str, str]) -> None:
        given = env.get(OVERRIDE_KEY_ENV)
        self.key_source = "env" if given else "random per process"
        self.key: bytes | None = given.encode() if given else None
        self.compiled: Compiled = EMPTY
        self.observer: StoreObserver = NullObserver()
        self._items: dict[str, Override] = {}
        self._tats: dict[str, float] = {}  # rate-limit subject -> theoretical arrival time (monotonic)
        self.budgets: MemoryBudgets | RedisBudgets = MemoryBudgets()  # token budgets and slots (.budgets)
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        # The audit chain's record of each override this replica added, removed or saw expire (Audit.override_event).
        self.audit_hook: Callable[[str, Override], None] = lambda action, override: None

    async def start(self, observer: StoreObserver | None = None) -> None:
        if observer is not None:
            self.observer = observer
        if self.key is None:
            self.key = secrets.token_bytes(32)
        self._swap(self._items.values())
        self._tasks.append(asyncio.get_running_loop().create_task(self._expire_loop()))

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        if self._tasks:  # bounded: a half-open connection must not hold up shutdown
            await asyncio.wait(self._tasks, timeout=2)
        self._tasks.clear()

    def _swap(self, items: Any) -> None:
        compiled = compile_overrides(items, time.time())
        self.compiled = compiled
        self.observer.overrides(compiled.counts())

    def _due(self) -> bool:
        nxt = self.compiled.next_expiry
        return nxt is not None and time.time() >= nxt

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK)
            if self._due():
                self._swap(self.compiled.overrides)
            if self._tats:  # a subject whose TAT has passed has its full burst again: forget it
                now = time.monotonic()
                self._tats = {k: v for k, v in self._tats.items() if v > now}
            if isinstance(self.budgets, MemoryBudgets):
                self.budgets.sweep()

    async def add(self, override: Override) -> Override:
        self._items[override.id] = override
        self._swap(self._items.values())
        return override

    async def list(self) -> list[Override]:
        if self._due():
            self._swap(self.compiled.overrides)
        return list(self.compiled.overrides)

    async def remove(self, id: str) -> bool:
        found = self._items.pop(id, None) is not None
        self._swap(self._items.values())
        return found

    def rate(self, limit: RateLimit, who: str, then: Then) -> None:
        """One rate-limit check for ``who``, answered at once; in memory it is exact for this process only."""
        key = f"{limit.rule}\0{limit.by}\0{who}"
        outcome, tat = gcra(self._tats.get(key), time.monotonic(), limit.interval, limit.tolerance)
        self._tats[key] = tat
        then(outcome)

    async def ensure_key(self) -> bytes | None:
        """The HMAC key for API-key overrides (None while Redis, which holds it, cannot be asked)."""
        return self.key

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "overrides": len(self.compiled.overrides), "override_key": self.key_source}


class RedisStore(OverrideStore):
    backend = "redis"

    def __init__(
        self, target: RedisTarget, password: str | None, prefix: str, timeout: float, env: dict[str, str]
    ) -> None:
        super().__init__(env)
        if self.key is None:
            self.key_source = "redis"
        self.target = target
        self._password = password
        self.timeout = timeout
        self.prefix = prefix
        tag = f"{prefix}{{overrides}}"
        self.k_data, self.k_version, self.k_key = f"{tag}:data", f"{tag}:version", f"{tag}:key"
        self.channel = f"{prefix}overrides:changed"
        self.k_audit = f"{prefix}audit"
        self.breaker = Breaker(timeout, name=f"Redis {target.url}")
        self.client: Any = None
        self.version: bytes | None = None
        self.synced_at: float | None = None
        self._follower: Follower | None = None
        self._batcher: Batcher | None = None
        self._limits: dict[RateLimit, tuple[str, bytes, bytes]] = {}  # key prefix and script args, per limit
        self._checks: set[asyncio.Task[None]] = set()  # Cluster: one task per check
        self.budgets = RedisBudgets(self, prefix)

    def __repr__(self) -> str:  # never the password
        return f"RedisStore({self.target.url!r}, prefix={self.prefix!r})"

    async def start(self, observer: StoreObserver | None = None) -> None:
        if observer is not None:
            self.observer = observer
            self.breaker.observer = observer
        self.client = connect(self.target, self._password, self.timeout)
        self._gcra = self.client.register_script(GCRA_LUA)  # EVALSHA; loaded again on NOSCRIPT
        if self.target.mode != "cluster":
            self._batcher = Batcher(self.client, self.breaker, GCRA_LUA, self._gcra.sha)
        assert isinstance(self.budgets, RedisBudgets)
        self.budgets.start(self.client, self.breaker, self.target.mode == "cluster")
        self.observer.overrides(self.compiled.counts())
        await self.sync()
        # Woken by the channel, and in any case every SYNC_INTERVAL; the periodic sync alone serves a Cluster.
        listen = self.target.mode != "cluster"
        self._follower = Follower("override", self.client, self.breaker, self.channel, self.sync, SYNC_INTERVAL,
                                  listen=listen)  # fmt: skip
        self._follower.start()

    async def close(self) -> None:
        if self._follower is not None:
            await self._follower.close()
        await super().close()
        if self._batcher is not None:
            await self._batcher.close()
        if isinstance(self.budgets, RedisBudgets):
            await self.budgets.close()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.aclose(), 2)

    async def _call(self, op: str, fn: Any, *args: Any) -> Any:
        return await self.breaker.call(op, lambda: fn(*args))

    async def _ensure_key(self) -> None:
        if self.key is not None:
            return
        await self.breaker.call("key", lambda: self.client.set(self.k_key, secrets.token_hex(32), nx=True))
        value = await self._call("key", self.client.get, self.k_key)
        if value:
            self.key = bytes(value)

    async def sync(self, force: bool = False) -> bool:
        """Fetch the overrides if they changed; False when Redis could not be asked."""
        try:
            await self._ensure_key()
            version = await self._call("sync", self.client.get, self.k_version)
            if force or version != self.version or self.synced_at is None or self._due():
                raw = await self._call("sync", self.client.hgetall, self.k_data)
                items, expired = self._parse(raw)
                self.version = version
                self._swap(items)
                for field, gone in expired:  # one call each: the replica whose HDEL removed it records it
                    if await self._call("expire", self.client.hdel, self.k_data, field):
                        self.audit_hook("expired", gone)
            self.synced_at = time.time()
            return True
        except RedisUnavailable:
            if self._due():  # expiry holds without Redis
                self._swap(self.compiled.overrides)
            return False

    def _parse(self, raw: dict[bytes, bytes]) -> tuple[list[Override], list[tuple[bytes, Override]]]:
        now = time.time()
        items: list[Override] = []
        expired: list[tuple[bytes, Override]] = []
        for field, value in raw.items():
            try:
                o = Override.from_dict(orjson.loads(value))
            except (OverrideError, KeyError, TypeError, ValueError, orjson.JSONDecodeError) as e:
                log.warning("ignoring unreadable override %r in Redis: %s", field[:64], e)
                continue
            if o.expired(now):
                expired.append((field, o))
            else:
                items.append(o)
        return items, expired

    def rate(self, limit: RateLimit, who: str, then: Then) -> None:
        """One GCRA check in Redis, batched with every other check asked for meanwhile (:mod:`.ratebatch`)."""
        known = self._limits.get(limit)
        if known is None:
            known = self._limits[limit] = (key_start(self.prefix, limit), *script_args(limit))
        start, interval, tolerance = known
        key = redis_key(start, who)
        if self._batcher is not None:
            self._batcher.submit(key, interval, tolerance, then)
            return
        # A Cluster routes by key: one call each, as a Cluster pipeline would split the batch by node anyway.
        task = asyncio.get_running_loop().create_task(self._rate_one(key, interval, tolerance, then))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _rate_one(self, key: str, interval: bytes, tolerance: bytes, then: Then) -> None:
        try:
            reply = await self.breaker.call("ratelimit", lambda: self._gcra(keys=[key], args=[interval, tolerance]))
            outcome = outcomes_from_script(reply)[0]
        except Exception as e:  # RedisUnavailable (counted by the breaker): the caller follows on_error
            if not isinstance(e, RedisUnavailable):
                log.exception("rate-limit check failed")
            then(None)
            return
        then(outcome)

    async def _announce(self) -> None:
        await self._call("write", self.client.incr, self.k_version)
        with contextlib.suppress(RedisUnavailable):
            await self._call("publish", self.client.publish, self.channel, b"1")

    async def add(self, override: Override) -> Override:
        await self._call("write", self.client.hset, self.k_data, override.id, orjson.dumps(override.as_dict()))
        self.audit_hook("added", override)
        await self._announce()
        await self.sync(force=True)
        return override

    async def list(self) -> list[Override]:
        await self.sync()
        return list(self.compiled.overrides)

    async def remove(self, id: str) -> bool:
        known = next((o for o in self.compiled.overrides if o.id == id), None)
        removed = await self._call("write", self.client.hdel, self.k_data, id)
        if removed:
            if known is not None:  # one this replica has not synced yet is gone all the same, unrecorded
                self.audit_hook("removed", known)
            await self._announce()
        await self.sync(force=True)
        return bool(removed)

    async def ensure_key(self) -> bytes | None:
        with contextlib.suppress(RedisUnavailable):
            await self._ensure_key()
        return self.key

    def describe(self) -> dict[str, Any]:
        b = self.breaker
        return {
            "backend": self.backend,
            "url": self.target.url,
            "mode": self.target.mode,
            "prefix": self.prefix,
            "up": b.up,
            "error": b.last_error,
            "circuit": "open" if b.open else "closed",
            "last_sync": self.synced_at,
            "overrides": len(self.compiled.overrides),
            "override_key": self.key_source,
        }


async def probe(store: OverrideStore) -> str | None:
    """A startup check: None when Redis answers (or none is configured), else why not."""
    if not isinstance(store, RedisStore):
        return None
    client = connect(store.target, store._password, max(store.timeout, 1.0))
    try:
        await asyncio.wait_for(client.ping(), max(store.timeout, 1.0) * 2)
        return None
    except Exception as e:
        return describe_error(e)
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


def open_store(
    url: str | None, prefix: str, timeout: float, env: dict[str, str], *, hash_addresses: bool = False
) -> OverrideStore:
    """The store ``--redis`` asks for (memory without it). Raises ``RedisConfigError`` on a bad URL."""
    store: OverrideStore
    if not url:
        store = OverrideStore(env)
    else:
        from .redisconn import PASSWORD_ENV, parse_url

        store = RedisStore(parse_url(url), env.get(PASSWORD_ENV) or None, prefix, timeout, env)
    store.hash_addresses = hash_addresses
    return store
