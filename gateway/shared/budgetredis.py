"""Token budgets and concurrency slots in Redis: one Lua step per request, batched, through the breaker.

Single Redis (also Sentinel, a unix socket): every reserve, settle and
release asked for while a round trip is out goes into the next one, one
write of many commands on one held connection (:class:`.ratebatch.HeldConnection`)
answered by callbacks, so a request costs no task. A request is one
``EVALSHA`` of :data:`.budgetlua.ADMIT_LUA` with all its keys: Redis runs it
whole, so its entries are reserved all together or not at all, whatever
other replicas ask meanwhile. ``NOSCRIPT`` (a restart, a failover) loads the
scripts on the same connection and sends those commands again.

Redis Cluster: the keys of one request have different hash tags, so they
may live on different nodes and no one script can see them all. They are
reserved in turn, one ``EVALSHA`` per key; when a later one refuses, those
already reserved are given back. What that costs: for the moment between the
two, a concurrent request sees the earlier reservations and may be refused
when it would have fitted (an over-count, never an overshoot). In a Cluster
each request is one task, as each rate-limit check already is there.

Every round trip goes through the store's :class:`.redisconn.Breaker`, under
``--redis-timeout``: Redis slow, down or its circuit open answers ``None`` at
once or within the timeout, and the caller follows ``on_error``. A settle, a
refund or a release that fails is counted (``budget_fallback``) and logged
(once per run of failures), never retried: a rate refills by itself and a
quota ends with its window, a slot with its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from typing import Any

from .budgetlua import ADMIT_LUA, SETTLE_LUA, Ask, Outcome, Reserved, SlotAsk, admit_args, outcome_of, settle_args
from .ratebatch import HeldConnection, pack_command, pack_evalsha
from .redisconn import Breaker, RedisUnavailable

log = logging.getLogger("regiongate")

Reply = Callable[[Any], None]  # called with a command's reply, or None when Redis could not answer it
MAX_BATCH = 1000  # commands per write: Redis answers them in turn, serving nothing else meanwhile


class RedisBudgets:
    backend = "redis"

    def __init__(self, owner: Any, prefix: str) -> None:
        self.owner = owner  # the store: its observer, breaker and client (made at its start)
        self.prefix = prefix
        self._cluster = False
        self._admit: Any = None
        self._settle: Any = None
        self._pipe: Pipe | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # Cluster: one per request
        self._failing = False  # a settle failed since the last one that worked: logged once

    def start(self, client: Any, breaker: Breaker, cluster: bool) -> None:
        self.breaker = breaker
        self._cluster = cluster
        self._admit = client.register_script(ADMIT_LUA)
        self._settle = client.register_script(SETTLE_LUA)
        if not cluster:
            self._pipe = Pipe(client, breaker, {self._admit.sha: ADMIT_LUA, self._settle.sha: SETTLE_LUA})

    async def idle(self, timeout: float = 2.0) -> None:
        """Wait (at most ``timeout``) until everything asked so far has been answered or given up."""
        waiting = list(self._tasks)
        if self._pipe is not None and self._pipe.runner is not None:
            waiting.append(self._pipe.runner)
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)

    async def close(self) -> None:
        await self.idle()
        if self._pipe is not None:
            await self._pipe.close()

    # --- reserve -------------------------------------------------------------------------------------

    def reserve(self, asks: Sequence[Ask], slot: SlotAsk | None, then: Callable[[Outcome | None], None]) -> None:
        if self._admit is None:  # not started: as if Redis were down
            then(None)
        elif self._pipe is not None:
            keys, args = admit_args(asks, slot)
            self._pipe.submit(pack_evalsha(self._admit.sha, keys, args), partial(_outcome, asks, slot, then))
        else:
            self._spawn(self._reserve_in_turn(asks, slot, then))

    async def _reserve_in_turn(
        self, asks: Sequence[Ask], slot: SlotAsk | None, then: Callable[[Outcome | None], None]
    ) -> None:
        """Cluster: one key at a time; the first refusal (or failure) gives back what was reserved before it."""
        parts: list[tuple[Sequence[Ask], SlotAsk | None]] = [((a,), None) for a in asks]
        if slot is not None:
            parts.append(((), slot))
        outcomes: list[Outcome] = []
        failed = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.breaker.timeout  # all the keys within --redis-timeout, not each
        for part_asks, part_slot in parts:
            keys, args = admit_args(part_asks, part_slot)
            try:
                left = max(0.001, deadline - loop.time())
                reply = await self.breaker.call("budget", partial(self._admit, keys=keys, args=args), left)
                outcome = outcome_of(reply, part_asks, part_slot)
            except Exception as e:
                if not isinstance(e, RedisUnavailable):
                    log.exception("token budget reserve failed")
                failed = True
                break
            outcomes.append(outcome)
            if not outcome.allowed:
                break
        whole = _joined(outcomes, asks, slot) if not failed else None
        _answer([then], None if whole is None else [whole])  # first: giving back is fire and forget, as a refund
        if whole is None or not whole.allowed:  # the slot is asked last: only token reservations to give back
            given = [
                (Reserved(a.limit, a.key, a.cost, o.windows[0]), 0)
                for a, o in zip(asks, outcomes, strict=False)
                if o.allowed
            ]
            keys, args = settle_args(given)
            for key, four, (r, _) in zip(keys, _fours(args), given, strict=True):
                await self._quietly(r.limit.rule, partial(self._settle, keys=[key], args=four))

    # --- settle, refund, release: fire and forget ------------------------------------------------------

    def adjust(self, rule: str, changes: Sequence[tuple[Reserved, int]]) -> None:
        """Each reservation replaced by what it really cost (0: a refund)."""
        if self._settle is None or not changes:
            return
        if self._pipe is not None:
            keys, args = settle_args(changes)
            self._pipe.submit(pack_evalsha(self._settle.sha, keys, args), partial(self._done, rule, "tokens"))
            return
        keys, args = settle_args(changes)
        for key, four in zip(keys, _fours(args), strict=True):  # Cluster: each key on its own node
            self._spawn(self._quietly(rule, partial(self._settle, keys=[key], args=four)))

    def release(self, rule: str, key: str, member: str) -> None:
        if self._pipe is not None:
            self._pipe.submit(
                pack_command(b"ZREM", key.encode(), member.encode()), partial(self._done, rule, "concurrency")
            )
        elif self._admit is not None:
            self._spawn(self._quietly(rule, partial(self._zrem, key, member), "concurrency"))

    def _zrem(self, key: str, member: str) -> Coroutine[Any, Any, Any]:
        return self.owner.client.zrem(key, member)  # type: ignore[no-any-return]

    async def _quietly(self, rule: str, call: Callable[[], Coroutine[Any, Any, Any]], what: str = "tokens") -> None:
        try:
            reply = await self.breaker.call("budget", call)
        except Exception as e:
            if not isinstance(e, RedisUnavailable):
                log.exception("token budget update failed")
            reply = None
        self._done(rule, what, reply)

    def _done(self, rule: str, what: str, reply: Any) -> None:
        if reply is not None:
            self._failing = False
            return
        self.owner.observer.budget_fallback(rule, what)
        if not self._failing:
            self._failing = True
            log.warning(
                "a token budget %s could not be written to Redis (rule %r): counted in "
                "regiongate_budget_fallbacks_total, not retried; said once until one is written again",
                "settle" if what == "tokens" else "release", rule,
            )  # fmt: skip

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _fours(args: list[bytes]) -> list[list[bytes]]:
    return [args[i : i + 4] for i in range(0, len(args), 4)]


def _joined(outcomes: list[Outcome], asks: Sequence[Ask], slot: SlotAsk | None) -> Outcome:
    """The outcomes of the keys asked in turn as one; the keys not asked (after a refusal) count as let through
    (the refusal already answers)."""
    from ..policy.tokenlimit import TokenCheck

    checks = [o.checks[0] for o in outcomes[: len(asks)]]
    windows = [o.windows[0] for o in outcomes[: len(asks)]]
    checks += [TokenCheck(True, 0, 0.0, 0.0)] * (len(asks) - len(checks))
    windows += [0] * (len(asks) - len(windows))
    if slot is None or len(outcomes) <= len(asks):
        return Outcome(tuple(checks), tuple(windows))
    last = outcomes[-1]
    return Outcome(tuple(checks), tuple(windows), last.slot_allowed, last.in_flight, last.slot_wait)


def _outcome(asks: Sequence[Ask], slot: SlotAsk | None, then: Callable[[Outcome | None], None], reply: Any) -> None:
    outcome = None
    if reply is not None:
        try:
            outcome = outcome_of(reply, asks, slot)
        except Exception:
            log.exception("unreadable token budget reply")
    then(outcome)


class Pipe:
    """Commands sent in batches: every one asked for while a round trip is out goes in the next one."""

    def __init__(self, client: Any, breaker: Breaker, scripts: dict[str, str]) -> None:
        self.breaker = breaker
        self.scripts = scripts  # sha -> text: loaded again on NOSCRIPT
        self._conn = HeldConnection(client)
        self._commands: list[bytes] = []
        self._replies: list[Reply] = []
        self.runner: asyncio.Task[None] | None = None

    def submit(self, command: bytes, then: Reply) -> None:
        if self.runner is None:
            self.runner = asyncio.get_running_loop().create_task(self._run())
        self._commands.append(command)
        self._replies.append(then)

    async def close(self) -> None:
        """Shutting down: every command still waiting is answered None, so nobody waits forever."""
        if self.runner is not None:
            self.runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self.runner, 2)
        replies, self._commands, self._replies = self._replies, [], []
        _answer(replies, None)
        await self._conn.close()

    async def _run(self) -> None:
        replies: list[Reply] = []
        try:
            while self._replies:
                commands, replies = self._commands[:MAX_BATCH], self._replies[:MAX_BATCH]
                del self._commands[:MAX_BATCH], self._replies[:MAX_BATCH]
                got: list[Any] | None = None
                try:
                    got = await self.breaker.call("budget", partial(self._round_trip, commands))
                except RedisUnavailable:
                    pass
                except Exception:
                    log.exception("token budget batch failed")
                _answer(replies, got)
                replies = []
        except asyncio.CancelledError:
            _answer(replies, None)
            raise
        finally:
            self.runner = None

    async def _round_trip(self, commands: list[bytes]) -> list[Any]:
        from redis.exceptions import NoScriptError

        got = await self._conn.send(commands)
        missing = [i for i, r in enumerate(got) if isinstance(r, NoScriptError)]
        if missing:
            for script in self.scripts.values():
                await self._conn.load(script)
            for i, reply in zip(missing, await self._conn.send([commands[i] for i in missing]), strict=True):
                got[i] = reply
        for i, reply in enumerate(got):
            if isinstance(reply, Exception):  # one command's error (a bug, a wrong type) is that command's
                log.error("token budget command failed: %s", reply)
                got[i] = None
        return got


def _answer(replies: list[Reply], got: list[Any] | None) -> None:
    for i, then in enumerate(replies):
        try:
            then(None if got is None else got[i])
        except Exception:  # one caller's bug must not keep the others waiting
            log.exception("token budget callback failed")
