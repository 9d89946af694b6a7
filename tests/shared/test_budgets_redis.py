"""Token budgets and concurrency slots against a real redis-server (single, killed, paused, restarted) and a
real Redis Cluster: the Lua held to the pure reference, races held to the bound, on_error followed."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import ErrorReply
from gateway.policy.ratelimit import OnError
from gateway.policy.tokenlimit import (
    Budget,
    Concurrency,
    TokenLimit,
    gcra_cost,
    gcra_settle,
    quota_check,
    quota_settle,
    quota_window,
    token_key,
)
from gateway.shared.budgetlua import (
    ADMIT_LUA,
    SETTLE_LUA,
    Ask,
    Reserved,
    SlotAsk,
    admit_args,
    outcome_of,
    settle_args,
)
from gateway.shared.budgetredis import RedisBudgets
from gateway.shared.budgets import Held, admit, refund, release, settle
from gateway.shared.ratelimit import UNAVAILABLE
from gateway.shared.store import RedisStore, open_store
from support.budgets import Recorder
from support.redis_server import RedisServer, cluster, running, sentinel_failover

pytestmark = pytest.mark.e2e

RATE = TokenLimit("r", 0, 1000, 30 * 86400.0, ("api_key",))  # 1000 tokens in 30 days: no refill during a test
QUOTA = TokenLimit("r", 1, 1000, 30 * 86400.0, ("country", "model"), kind="quota")
ids = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running(tmp_path_factory.mktemp("redis")) as s:
        yield s


async def started(url: str, timeout: float = 1.0) -> RedisStore:
    store = open_store(url, f"t{next(ids)}:", timeout, {})
    assert isinstance(store, RedisStore)
    await store.start(Recorder())
    return store


@pytest.fixture
async def store(server: RedisServer) -> AsyncIterator[RedisStore]:
    s = await started(server.url)
    try:
        yield s
    finally:
        await s.close()


async def ask(
    store: RedisStore,
    budget: Budget,
    costs: list[int],
    slot: tuple[str, str] | None = None,
    lease: float = 60.0,
    subjects: list[str] | None = None,
    on_error: OnError = "closed",
) -> Held | ErrorReply:
    done: asyncio.Future[Held | ErrorReply] = asyncio.get_running_loop().create_future()
    admit(store, budget, subjects or ["k1"] * len(costs), costs, slot, lease, on_error, done.set_result)
    return await asyncio.wait_for(done, 10)  # a guard against a hang, not a timing requirement


async def drained(store: RedisStore) -> None:
    """Every fire-and-forget settle and release sent before now has been applied."""
    assert isinstance(store.budgets, RedisBudgets)
    await store.budgets.idle()


def recorder(store: RedisStore) -> Recorder:
    assert isinstance(store.observer, Recorder)
    return store.observer


def events(store: RedisStore) -> list[tuple[str, str, str]]:
    return recorder(store).events


def evalsha_calls(server: RedisServer) -> int:
    stats = server.command("INFO", "commandstats")
    line = next((ln for ln in stats.splitlines() if ln.startswith("cmdstat_evalsha:")), "calls=0,")
    return int(line.split("calls=", 1)[1].split(",", 1)[0])


# --- the Lua against the pure reference ---------------------------------------------------------------

# (tokens, per, burst): per in µs a whole multiple of tokens, so the reference's floats are exact.
SHAPES = [(1000, 60.0, None), (250, 1.0, 100), (10, 0.001, None), (8, 0.0004, 3)]


@pytest.fixture(scope="module")
def sync_client(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=server.port)
    yield client
    client.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.sampled_from(SHAPES),
    kind=st.sampled_from(["rate", "quota"]),
    ops=st.lists(st.tuples(st.booleans(), st.integers(1, 1100), st.integers(-600, 600)), min_size=1, max_size=25),
)
def test_the_lua_agrees_with_the_pure_reference(
    sync_client: redis.Redis, shape: tuple[int, float, int | None], kind: str, ops: list[tuple[bool, int, int]]
) -> None:
    tokens, per, burst = shape
    limit = TokenLimit("lua", 0, tokens, per, ("ip",), kind="quota" if kind == "quota" else "rate", burst=burst)
    whole = tokens if kind == "quota" else (burst or tokens)
    key = token_key(f"ref{next(ids)}:", limit, "s")
    admit_script, settle_script = sync_client.register_script(ADMIT_LUA), sync_client.register_script(SETTLE_LUA)
    per_us = round(per * 1e6)
    interval = per_us // tokens
    window = 0
    for is_admit, cost, delta in ops:
        if kind == "rate":
            raw = sync_client.get(key)
            before: int | None = None if raw is None else int(raw)
        else:
            w, u = sync_client.hmget(key, "w", "used")
            stored = (int(w), int(u)) if w is not None and u is not None else None
        if is_admit:
            cost = min(cost, whole)  # more never reaches the store (budgets.never_fits)
            asks = [Ask(limit, key, cost)]
            keys, args = admit_args(asks, None)
            reply = admit_script(keys=keys, args=args)
            now = reply[0]
            got = outcome_of(reply, asks, None).checks[0]
            if kind == "rate":
                want, tat = gcra_cost(before, now, interval, whole * interval, cost)
                expect_tat: float | None = tat if want.allowed else before
            else:
                window, reset = quota_window(now, per_us)
                used = stored[1] if stored is not None and stored[0] == window else 0
                want, after = quota_check(used, tokens, cost, reset)
                expect_used = (window, after) if want.allowed else stored
            assert (got.allowed, got.remaining) == (want.allowed, want.remaining)
            assert got.retry_after * 1e6 == pytest.approx(want.retry_after, abs=1e-3)
            assert got.reset * 1e6 == pytest.approx(want.reset, abs=1e-3)
        else:
            reserved = max(0, -delta)
            keys, args = settle_args([(Reserved(limit, key, reserved, window), reserved + delta)])
            now = settle_script(keys=keys, args=args)
            if kind == "rate":
                expect_tat = gcra_settle(before, now, interval, delta)
            else:
                current = quota_window(now, per_us)[0]
                used = stored[1] if stored is not None and stored[0] == window else 0
                expect_used = (window, quota_settle(used, delta)) if current == window else stored
        if kind == "rate":
            raw = sync_client.get(key)
            seconds, micros = sync_client.time()
            if raw is None:  # never written, deleted (a TAT in the past is a full burst) or expired since
                assert expect_tat is None or expect_tat <= seconds * 1_000_000 + micros + 1000  # PX: whole ms
            else:
                assert int(raw) == expect_tat
        else:
            w, u = sync_client.hmget(key, "w", "used")
            if expect_used is not None and w is not None:
                assert (int(w), int(u or 0)) == expect_used


def test_keys_expire_when_their_budget_is_whole_again(sync_client: redis.Redis, server: RedisServer) -> None:
    rate = TokenLimit("ttl", 0, 1000, 60.0, ("ip",))
    quota = TokenLimit("ttl", 1, 1000, 86400.0, ("ip",), kind="quota")
    asks = [Ask(rate, "ttl:{a}", 500), Ask(quota, "ttl:{b}", 500)]
    script = sync_client.register_script(ADMIT_LUA)
    keys, args = admit_args(asks, SlotAsk("ttl:{c}", "m1", 2, 2.5))
    now = script(keys=keys, args=args)[0]
    assert 29_000 < int(server.command("PTTL", "ttl:{a}")) <= 30_000  # 500 tokens refill in 30 s
    window_end_ms = (now // 86_400_000_000 + 1) * 86_400_000
    assert int(server.command("PEXPIRETIME", "ttl:{b}")) == window_end_ms  # 00:00 UTC
    assert 2_000 < int(server.command("PTTL", "ttl:{c}")) <= 2_501  # the slots' key: the last lease's end
    # All or none: the quota has 500 left, so a request of 400 + 600 writes neither the rate nor the slot.
    keys, args = admit_args([Ask(rate, "ttl:{d}", 400), Ask(quota, "ttl:{b}", 600)], SlotAsk("ttl:{c}", "m2", 2, 60))
    reply = script(keys=keys, args=args)
    assert reply[1:] == [1, 400 * 60_000, 0, 0, 0, 500, reply[7], reply[8], 1, 2, 0, 0]  # each judged, none written
    assert server.command("EXISTS", "ttl:{d}") == "0" and server.command("ZCARD", "ttl:{c}") == "1"
    assert server.command("HGET", "ttl:{b}", "used") == "500"


# --- races: never more than the bound -------------------------------------------------------------------


async def test_many_admits_racing_for_one_budget_never_get_more_than_it(server: RedisServer) -> None:
    a, b = await started(server.url), await started(server.url)
    b.budgets.prefix = a.budgets.prefix  # two replicas, one budget
    try:
        budget = Budget("r", (RATE, QUOTA))
        for s in (a, b):  # the scripts loaded, the connections made
            await ask(s, Budget("w", (RATE,)), [1])
        trips = [recorder(s).round_trips for s in (a, b)]
        evalshas = evalsha_calls(server)
        got = await asyncio.gather(*(ask(s, budget, [30, 30]) for s in (a, b) * 100))
        # One EVALSHA per request, and the 100 each replica asked for at once went in one round trip.
        assert evalsha_calls(server) - evalshas == 200
        assert [recorder(s).round_trips - t for s, t in zip((a, b), trips, strict=True)] == [1, 1]
        held = [h for h in got if isinstance(h, Held)]
        assert len(held) == 1000 // 30  # 33: one more would go over both
        refusals = {(r.code, r.retry) for r in got if isinstance(r, ErrorReply)}
        assert refusals == {("insufficient_quota", False)}  # both full: the quota is the one told
        # Settling less than reserved makes room again, exactly as much.
        for h in held[:10]:
            settle(a, h, [0, 0])
        await drained(a)
        again = await asyncio.gather(*(ask(s, budget, [30, 30]) for s in (a, b) * 20))
        assert sum(isinstance(h, Held) for h in again) == 10
        assert events(a).count(("refused", "r", "quota")) + events(b).count(("refused", "r", "quota")) == 200 - 33 + 30
        # The scripts flushed (as a restart or a failover leaves them): loaded again, nothing lost.
        server.command("SCRIPT", "FLUSH")
        assert isinstance(await ask(a, Budget("r", (RATE,)), [10], subjects=["fresh"]), Held)
        # A command Redis refuses (here a key of the wrong type) is that request's failure alone: on_error.
        wrong = token_key(a.budgets.prefix, RATE, "wrong")
        server.command("HSET", wrong, "x", "1")
        both = await asyncio.gather(
            ask(a, Budget("r", (RATE,)), [10], subjects=["wrong"], on_error="open"),
            ask(a, Budget("r", (RATE,)), [10], subjects=["right"], on_error="open"),
        )
        assert [isinstance(h, Held) and h.fallback for h in both] == [True, False]
    finally:
        await a.close()
        await b.close()


async def test_concurrency_slots_race_release_and_a_dead_replicas_expire(server: RedisServer) -> None:
    a, b = await started(server.url), await started(server.url)
    b.budgets.prefix = a.budgets.prefix
    try:
        budget = Budget("r", (), Concurrency("r", 5, ("api_key",)))
        got = await asyncio.gather(*(ask(s, budget, [], ("k", f"m{i}"), 60) for i, s in enumerate((a, b) * 25)))
        held = [h for h in got if isinstance(h, Held)]
        assert len(held) == 5 and all(r.type == "requests" for r in got if isinstance(r, ErrorReply))
        for h in held:
            release(a, h)
            release(b, h)  # idempotent: twice, from either replica
        await drained(a)
        await drained(b)
        got = await asyncio.gather(*(ask(s, budget, [], ("k", f"n{i}"), 0.3) for i, s in enumerate((a, b) * 5)))
        assert sum(isinstance(h, Held) for h in got) == 5
        await a.close()  # replica a dies holding its slots (never released); b holds the others
        refused = await ask(b, budget, [], slot=("k", "late"), lease=60)
        assert isinstance(refused, ErrorReply)
        for _ in range(200):  # the leases (0.3 s) end: their slots come back by themselves
            now = await ask(b, budget, [], slot=("k", "late"), lease=60)
            if isinstance(now, Held):
                break
            await asyncio.sleep(0.05)
        assert isinstance(now, Held)
    finally:
        await a.close()
        await b.close()


# --- Redis slow, down, restarted --------------------------------------------------------------------------


async def test_redis_killed_paused_and_restarted_follows_on_error(tmp_path: Path) -> None:
    own = RedisServer(tmp_path / "own").start()
    s = await started(own.url, timeout=0.2)
    budget = Budget("r", (RATE,), Concurrency("r", 5, ("api_key",)))
    try:
        held = await ask(s, budget, [10], slot=("k", "a"))
        assert isinstance(held, Held) and not held.fallback
        own.command("CLIENT", "PAUSE", "1500", "ALL")  # slow: no answer within --redis-timeout
        slow = await ask(s, budget, [10], slot=("k", "b"), on_error="open")
        assert isinstance(slow, Held) and slow.fallback and not slow.tokens and slow.slot is None
        assert events(s) == [("fallback", "r", "tokens"), ("fallback", "r", "concurrency")]
        own.kill()  # down
        closed = await ask(s, budget, [10], slot=("k", "c"), on_error="closed")
        assert closed == UNAVAILABLE
        opened = await ask(s, budget, [10], slot=("k", "d"), on_error="open")
        assert isinstance(opened, Held) and opened.fallback
        settle(s, held, [20])  # fails: counted, never retried
        release(s, held)
        refund(s, opened)  # a fallback reserved nothing: nothing to give back, nothing counted
        await asyncio.sleep(0)
        for _ in range(100):
            if len(events(s)) >= 8:
                break
            await asyncio.sleep(0.01)
        assert events(s)[-2:] == [("fallback", "r", "tokens"), ("fallback", "r", "concurrency")]
        assert len(events(s)) == 8
        own.start()  # restarted, empty: no scripts (NOSCRIPT: loaded again), no budgets
        for _ in range(200):  # the breaker probes again after its back-off
            back = await ask(s, budget, [10], slot=("k", "e"))
            if isinstance(back, Held):
                break
            await asyncio.sleep(0.05)
        assert isinstance(back, Held) and not back.fallback and back.costs == (10,)
    finally:
        await s.close()
        own.stop()


async def test_a_sentinel_failover_follows_on_error_then_the_new_master(tmp_path: Path) -> None:
    with sentinel_failover(tmp_path) as (master, replica, sentinel):
        s = await started(f"redis+sentinel://127.0.0.1:{sentinel.port}/svc", timeout=0.3)
        try:
            budget = Budget("r", (QUOTA,), Concurrency("r", 5, ("api_key",)))
            held = await ask(s, budget, [600], ("k", "a"), subjects=["GB"])
            assert isinstance(held, Held) and not held.fallback
            key = token_key(s.budgets.prefix, QUOTA, "GB")
            for _ in range(300):  # replication is asynchronous: wait for the replica's copy
                if replica.command("EXISTS", key) == "1":
                    break
                await asyncio.sleep(0.05)
            master.kill()
            answers: list[Held | ErrorReply] = []
            for _ in range(600):  # Sentinel promotes the replica after a second; meanwhile on_error: closed
                answers.append(await ask(s, budget, [600], ("k", "b"), subjects=["GB"]))
                if answers[-1] != UNAVAILABLE:
                    break
                await asyncio.sleep(0.05)
            assert answers[0] == UNAVAILABLE and ("fallback", "r", "tokens") in events(s)
            # The new master has the reservation the old one made: 600 + 600 does not fit in 1000.
            refused = answers[-1]
            assert isinstance(refused, ErrorReply) and refused.code == "insufficient_quota"
            settle(s, held, [100])
            release(s, held)
            assert isinstance(await ask(s, budget, [600], ("k", "c"), subjects=["GB"]), Held)
        finally:
            await s.close()


# --- Redis Cluster -----------------------------------------------------------------------------------------


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[list[RedisServer]]:
    with cluster(tmp_path) as nodes:
        yield nodes


async def test_a_redis_cluster_reserves_in_turn_and_gives_back_on_refusal(redis_cluster: list[RedisServer]) -> None:
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in redis_cluster)
    a, b = await started(url), await started(url)
    b.budgets.prefix = a.budgets.prefix
    try:
        budget = Budget("r", (RATE, QUOTA), Concurrency("r", 40, ("api_key",)))
        subjects = ["k1", "GB:gpt-4o"]
        got = await asyncio.gather(
            *(ask(s, budget, [30, 30], ("k1", f"m{i}"), subjects=subjects) for i, s in enumerate((a, b) * 30))
        )
        held = [h for h in got if isinstance(h, Held)]
        # Never more than the budget; fewer when a request's reservations, taken in turn, were seen by another
        # before being given back (the documented cost of a Cluster).
        assert 0 < len(held) <= 33 and {h.slot is not None for h in held} == {True}
        for h in held:
            refund(a, h)
            release(b, h)
        await drained(a)
        await drained(b)
        slots = held[0].slot
        assert slots is not None and await a.client.zcard(slots[0]) == 0  # every slot released, on its node
        # The quota is spent by another rule's use of the same subject... here: by one big request.
        big = await ask(a, Budget("r", (QUOTA,)), [1000], subjects=["GB:gpt-4o"])
        assert isinstance(big, Held)
        refused = await ask(a, budget, [900, 10], ("k1", "x"), subjects=subjects)  # rate fits, quota not
        assert isinstance(refused, ErrorReply) and refused.code == "insufficient_quota"
        # The rate's reservation was given back: its whole burst is there.
        whole = await ask(b, Budget("r", (RATE,)), [1000], subjects=["k1"])
        assert isinstance(whole, Held)
    finally:
        await a.close()
        await b.close()
