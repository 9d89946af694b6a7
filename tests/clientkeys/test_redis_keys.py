"""Client keys in a real Redis: two replicas' stores on one Redis, a revoke on one applied by the other within a
second (by the announcement, and by the poll when the announcement is lost), the layout, the shared secret."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.errors import ErrorReply
from gateway.policy.clientkeys import ClientKey, KeyTable
from gateway.shared.clientkeys import (
    KEYS_UNAVAILABLE,
    ClientKeys,
    KeyConflict,
    KeysUnavailable,
    RedisKeys,
    authenticate,
    open_keys,
)
from gateway.shared.store import OVERRIDE_KEY_ENV, open_store
from support.processes import free_port
from support.redis_server import RedisServer, cluster, running

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)
SAFETY = 10.0  # bounds a broken store only: every wait below ends on the event itself


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running(tmp_path_factory.mktemp("redis")) as server:
        yield server


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


async def replica(
    url: str, prefix: str, env: dict[str, str] | None = None
) -> tuple[RedisKeys, Callable[[], Awaitable[None]]]:
    """One gateway's stores (the overrides hold the secret), started; and what closes them."""
    overrides = open_store(url, prefix, 1.0, env or {})
    keys = open_keys(None, overrides)
    assert isinstance(keys, RedisKeys)
    await overrides.start()
    await keys.start()

    async def close() -> None:
        await keys.close()
        await overrides.close()

    return keys, close


@pytest.fixture
async def two(redis_server: RedisServer, request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisKeys, RedisKeys]]:
    prefix = f"ck{request.node.name[-20:]}-{time.monotonic_ns()}:"
    a, close_a = await replica(redis_server.url, prefix)
    b, close_b = await replica(redis_server.url, prefix)
    yield a, b
    await close_a()
    await close_b()


class Applied:
    """Set before the change is made: waits for ``store`` to swap in a table for which ``until`` holds."""

    def __init__(self, store: ClientKeys, until: Callable[[KeyTable], bool]) -> None:
        self.start = time.monotonic()
        self.seen = asyncio.Event()
        self.until = until
        store.on_swap = self.on_swap
        if until(store.table):
            self.seen.set()

    def on_swap(self, table: KeyTable) -> None:
        if self.until(table):
            self.seen.set()

    async def wait(self) -> float:
        """The seconds from when this was set up until the table held."""
        async with asyncio.timeout(SAFETY):
            await self.seen.wait()
        return time.monotonic() - self.start


def valid(key: ClientKey) -> Callable[[KeyTable], bool]:
    return lambda table: table.find(key.hash, time.time()) is not None


async def test_a_revoke_on_one_replica_is_applied_by_the_other(two: tuple[RedisKeys, RedisKeys]) -> None:
    a, b = two
    key, token = await a.add("team-a", None, {"owner": "alice"})
    took = await Applied(b, valid(key)).wait()
    log.warning("client keys: an issue on one replica applied by the other after %.0f ms", took * 1000)
    found = authenticate(bearer(token), b)  # the same secret on both: the token checks on the other replica
    assert isinstance(found, ClientKey) and found.name == "team-a" and dict(found.meta) == {"owner": "alice"}

    gone = Applied(b, lambda t: not valid(key)(t))
    revoked = await a.revoke("team-a")
    assert revoked is not None and revoked.id == key.id and revoked.revoked is not None
    assert not isinstance(authenticate(bearer(token), a), ClientKey)  # at once where it was revoked
    took = await gone.wait()
    log.warning("client keys: a revoke on one replica applied by the other after %.0f ms (announced)", took * 1000)
    refused = authenticate(bearer(token), b)
    assert isinstance(refused, ErrorReply) and (refused.status, refused.code) == (401, "invalid_api_key")
    listed = await b.list()
    assert [(k.id, k.state(time.time())) for k in listed] == [(key.id, "revoked")]
    assert await b.revoke(key.id) is not None  # again: the first time stays
    assert (await b.list())[0].revoked == revoked.revoked


async def test_a_lost_announcement_is_healed_by_the_poll(
    redis_server: RedisServer, two: tuple[RedisKeys, RedisKeys]
) -> None:
    """A revoke written without its message (a reconnect, or a Redis Cluster, where only the poll runs)."""
    a, b = two
    key, token = await a.add("team-a")
    await Applied(b, valid(key)).wait()
    gone = Applied(b, lambda t: not valid(key)(t))
    raw: Any = aioredis.from_url(redis_server.url)
    try:
        await raw.hset(a.k_revoked, key.id, repr(time.time()))
        await raw.incr(a.k_version)  # no PUBLISH
    finally:
        await raw.aclose()
    took = await gone.wait()
    log.warning("client keys: an unannounced revoke applied after %.0f ms (the poll)", took * 1000)
    assert not isinstance(authenticate(bearer(token), b), ClientKey)


async def test_the_layout_holds_no_token_and_one_hash_tag(
    redis_server: RedisServer, two: tuple[RedisKeys, RedisKeys]
) -> None:
    a, _ = two
    issued = [await a.add(f"team-{i}") for i in range(3)]
    await a.revoke("team-0")
    raw: Any = aioredis.from_url(redis_server.url)
    try:
        names = sorted(k.decode() for k in await raw.keys(f"{a.prefix}*"))
        everything = b""
        for name in names:
            if await raw.type(name) == b"hash":
                everything += b"".join(k + v for k, v in (await raw.hgetall(name)).items())
            else:
                everything += bytes(await raw.get(name) or b"")
    finally:
        await raw.aclose()
    p = a.prefix
    assert names == [
        f"{p}{{clientkeys}}:data",
        f"{p}{{clientkeys}}:keycheck",
        f"{p}{{clientkeys}}:revoked",
        f"{p}{{clientkeys}}:version",
        f"{p}{{overrides}}:key",  # the secret the overrides and the client keys share
    ]
    for key, token in issued:
        assert token.encode() not in everything and token[3:].encode() not in everything
        assert key.hash.encode() in everything
    assert a.describe()["keys"] == {"active": 2, "expired": 0, "revoked": 1}
    assert not any(k.hash in str(a.describe()) or k.name in str(a.describe()) for k, _ in issued)


async def test_a_name_is_unique_among_live_keys_across_replicas(two: tuple[RedisKeys, RedisKeys]) -> None:
    a, b = two
    results = await asyncio.gather(a.add("team-a"), b.add("team-a"), return_exceptions=True)
    issued = [r for r in results if isinstance(r, tuple)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(issued) == 1 and len(refused) == 1 and "already named 'team-a'" in str(refused[0])
    await b.revoke("team-a")
    key, _ = await a.add("team-a")  # a revoked key's name may be issued again
    assert (await b.list())[-1].id == key.id


async def test_a_replica_with_another_secret_refuses_to_issue_and_warns(redis_server: RedisServer) -> None:
    prefix = f"ckx-{time.monotonic_ns()}:"
    a, close_a = await replica(redis_server.url, prefix)
    other, close_other = await replica(redis_server.url, prefix, {OVERRIDE_KEY_ENV: "a different secret"})
    try:
        await a.add("team-a")
        with pytest.raises(KeysUnavailable, match="different hash secret"):
            await other.add("team-b")
        await other.sync(force=True)
        assert any("REGIONGATE_OVERRIDE_KEY" in w for w in other.warnings())
        assert a.warnings() == []
    finally:
        await close_a()
        await close_other()


async def test_a_gateway_that_never_reached_redis_answers_503_not_401(tmp_path: Path) -> None:
    keys, close = await replica(f"redis://127.0.0.1:{free_port()}/0", "down:")
    try:
        assert keys.loaded is False
        assert authenticate(bearer("rg-anything-at-all-here"), keys) is KEYS_UNAVAILABLE
        with pytest.raises(KeysUnavailable):
            await keys.add("team-a")
    finally:
        await close()


async def test_two_replicas_through_a_redis_cluster(tmp_path: Path) -> None:
    """Every key in one slot (the scripts touch several); no pub/sub in a Cluster: the poll carries a revoke."""
    with cluster(tmp_path) as nodes:
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes[:2])
        a, close_a = await replica(url, "kcl:")
        b, close_b = await replica(url, "kcl:")
        try:
            key, token = await a.add("team-a")
            await Applied(b, valid(key)).wait()
            assert isinstance(authenticate(bearer(token), b), ClientKey)
            gone = Applied(b, lambda t: not valid(key)(t))
            await a.revoke("team-a")
            took = await gone.wait()
            log.warning(
                "client keys: a revoke applied by the other replica through a Cluster after %.0f ms", took * 1000
            )
            assert not isinstance(authenticate(bearer(token), b), ClientKey)
            await b.add("team-b")
            with pytest.raises(KeyConflict):  # the name check runs in the slot, whichever replica asks
                await a.add("team-b")
        finally:
            await close_a()
            await close_b()
