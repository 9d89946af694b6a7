"""Rate-limit checks batched into one EVALSHA, against a real redis-server (no gateway around them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.policy.ratelimit import RateCheck, RateLimit
from gateway.shared.ratebatch import MAX_KEYS, Batcher, pack_command, pack_evalsha
from gateway.shared.ratelimit import GCRA_LUA, script_args
from gateway.shared.redisconn import Breaker, connect, parse_url
from support.redis_server import RedisServer, running

LIMIT = RateLimit("r", "ip", 300, 3600.0, 300)  # a burst of 300, then one each 12 s


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running(tmp_path_factory.mktemp("redis")) as s:
        yield s


@pytest.fixture
async def batcher(server: RedisServer) -> AsyncIterator[Batcher]:
    client = connect(parse_url(server.url), None, 1.0)
    b = Batcher(client, Breaker(1.0), GCRA_LUA, client.register_script(GCRA_LUA).sha)
    try:
        yield b
    finally:
        await b.close()
        await client.aclose()


async def answers(got: list[RateCheck | None], n: int) -> list[RateCheck | None]:
    """Wait for ``n`` answers (a guard against a hang, not a timing requirement)."""
    for _ in range(3000):
        if len(got) >= n:
            return got
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(got)} of {n} checks answered")


def evalsha_calls(server: RedisServer) -> int:
    stats = server.command("INFO", "commandstats")
    line = next((ln for ln in stats.splitlines() if ln.startswith("cmdstat_evalsha:")), "calls=0,")
    return int(line.split("calls=", 1)[1].split(",", 1)[0])


@pytest.mark.e2e
async def test_checks_asked_together_are_one_round_trip_judged_in_turn(batcher: Batcher, server: RedisServer) -> None:
    got: list[RateCheck | None] = []
    batcher.submit("t1:rl:{r:ip:warm}", *script_args(LIMIT), got.append)  # the script loaded, the connection made
    await answers(got, 1)
    server.command("CONFIG", "RESETSTAT")
    got.clear()
    n = 450  # more than MAX_KEYS: one write of several EVALSHAs
    for _ in range(n):
        batcher.submit("t1:rl:{r:ip:one}", *script_args(LIMIT), got.append)
    await answers(got, n)
    assert [o is not None and o.allowed for o in got] == [True] * 300 + [False] * 150
    first, last, over = got[0], got[299], got[300]
    assert first is not None and first.remaining == 299 and last is not None and last.remaining == 0
    assert over is not None and over.retry_after > 0 and over.reset > 0
    assert evalsha_calls(server) == -(-n // MAX_KEYS)
    # Another subject in the same batch as this one has its own budget.
    got.clear()
    batcher.submit("t1:rl:{r:ip:one}", *script_args(LIMIT), got.append)
    batcher.submit("t1:rl:{r:ip:two}", *script_args(LIMIT), got.append)
    await answers(got, 2)
    assert [o is not None and o.allowed for o in got] == [False, True]


@pytest.mark.e2e
async def test_a_flushed_script_is_loaded_again(batcher: Batcher, server: RedisServer) -> None:
    server.command("SCRIPT", "FLUSH")
    got: list[RateCheck | None] = []
    batcher.submit("t2:rl:{r:ip:one}", *script_args(LIMIT), got.append)
    batcher.submit("t2:rl:{r:ip:one}", *script_args(LIMIT), got.append)
    await answers(got, 2)
    assert [o is not None and o.remaining for o in got] == [299, 298]
    assert batcher.breaker.failures == 0


@pytest.mark.e2e
async def test_a_connection_closed_while_idle_is_made_again(batcher: Batcher, server: RedisServer) -> None:
    got: list[RateCheck | None] = []
    batcher.submit("t5:rl:{r:ip:one}", *script_args(LIMIT), got.append)
    await answers(got, 1)
    server.command("CLIENT", "KILL", "TYPE", "normal")  # as a Redis `timeout` or a proxy would
    await asyncio.sleep(0.05)  # the loop reads the end of the stream (already there) before the next check
    batcher.submit("t5:rl:{r:ip:one}", *script_args(LIMIT), got.append)
    await answers(got, 2)
    assert got[1] is not None and got[1].remaining == 298 and batcher.breaker.failures == 0


@pytest.mark.e2e
async def test_a_batch_redis_does_not_answer_in_time_is_answered_none(server: RedisServer) -> None:
    client = connect(parse_url(server.url), None, 0.05)
    breaker = Breaker(0.05)
    b = Batcher(client, breaker, GCRA_LUA, client.register_script(GCRA_LUA).sha)
    try:
        got: list[RateCheck | None] = []
        b.submit("t3:rl:{r:ip:one}", *script_args(LIMIT), got.append)
        await answers(got, 1)  # connects first, so the pause below holds up only the next batch
        assert got[0] is not None
        server.command("CLIENT", "PAUSE", "1000", "ALL")
        got.clear()
        for _ in range(3):
            b.submit("t3:rl:{r:ip:one}", *script_args(LIMIT), got.append)
        await answers(got, 3)
        assert got == [None, None, None] and breaker.failures == 1  # one batch, one failure
        for _ in range(300):  # the pause ends: the next batch reconnects and is answered
            got.clear()
            b.submit("t3:rl:{r:ip:one}", *script_args(LIMIT), got.append)
            await answers(got, 1)
            if got[0] is not None:
                break
        assert got[0] is not None and got[0].allowed and breaker.failures == 0
    finally:
        await b.close()
        await client.aclose()


@pytest.mark.e2e
async def test_through_a_unix_socket(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The limiter's connection is of the client's own class: here redis-py's unix-socket one."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rg") as short:  # a socket path must stay under ~100 bytes
        sock = f"{short}/redis.sock"
        server = RedisServer(tmp_path_factory.mktemp("unix"), "--unixsocket", sock).start()
        client = connect(parse_url(f"unix://{sock}"), None, 1.0)
        b = Batcher(client, Breaker(1.0), GCRA_LUA, client.register_script(GCRA_LUA).sha)
        try:
            got: list[RateCheck | None] = []
            for _ in range(2):
                b.submit("t6:rl:{r:ip:one}", *script_args(LIMIT), got.append)
            await answers(got, 2)
            assert [o is not None and o.remaining for o in got] == [299, 298]
        finally:
            await b.close()
            await client.aclose()
            server.stop()


@pytest.mark.e2e
async def test_closing_answers_every_waiting_check(batcher: Batcher) -> None:
    got: list[RateCheck | None] = []
    batcher.submit("t4:rl:{r:ip:one}", *script_args(LIMIT), got.append)
    await batcher.close()  # before the batch went out
    assert got == [None]


def test_the_batch_is_packed_as_redis_py_packs_it() -> None:
    from redis.asyncio.connection import Connection

    keys = ["p:rl:{r:ip:2.125.160.216}", "p:rl:{r:country:GB}", "p:rl:{r:api_key:é}"]
    args = [b"12000000", b"3600000000"] * 3
    sha = "e" * 40
    expected = b"".join(Connection().pack_command("EVALSHA", sha, len(keys), *keys, *args))
    assert pack_evalsha(sha, keys, args) == expected
    member = "é-1".encode()
    assert pack_command(b"ZREM", keys[2].encode(), member) == b"".join(
        Connection().pack_command("ZREM", keys[2].encode(), member)
    )
