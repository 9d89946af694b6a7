"""Redis URLs, redaction and the circuit breaker, without a server."""

from __future__ import annotations

import asyncio

import pytest

from gateway.shared.redisconn import Breaker, RedisConfigError, RedisUnavailable, parse_url, redact


def test_redact_hides_passwords_only() -> None:
    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact("redis://u@h:1/0") == "redis://u@h:1/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"


@pytest.mark.parametrize(
    ("url", "mode", "hosts", "db", "service", "tls"),
    [
        ("redis://127.0.0.1:6380/2", "redis", (("127.0.0.1", 6380),), 2, None, False),
        ("rediss://cache.internal/0", "redis", (("cache.internal", 6379),), 0, None, True),
        ("redis+sentinel://s1:26379,s2:26380/main/1", "sentinel", (("s1", 26379), ("s2", 26380)), 1, "main", False),
        ("redis+sentinel://s1,s2/main", "sentinel", (("s1", 26379), ("s2", 26379)), 0, "main", False),
        ("redis+cluster://n1:7000,n2:7001", "cluster", (("n1", 7000), ("n2", 7001)), 0, None, False),
        ("redis://[::1]:6379/0", "redis", (("::1", 6379),), 0, None, False),
    ],
)
def test_url_forms(
    url: str, mode: str, hosts: tuple[tuple[str, int], ...], db: int, service: str | None, tls: bool
) -> None:
    t = parse_url(url)
    assert (t.mode, t.hosts, t.db, t.service, t.tls) == (mode, hosts, db, service, tls)


def test_unix_socket_url() -> None:
    t = parse_url("unix:///run/redis/redis.sock?db=3")
    assert (t.mode, t.path, t.db) == ("unix", "/run/redis/redis.sock", 3)


@pytest.mark.parametrize(
    "url", ["redis://:secret@h/0", "ftp://h", "redis://h:notaport/0", "redis+cluster://h:7000/3", "unix://"]
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(RedisConfigError) as e:
        parse_url(url)
    assert "secret" not in str(e.value)


async def test_breaker_opens_fails_fast_and_probes_back() -> None:
    calls = 0
    healthy = False

    async def call() -> str:
        nonlocal calls
        calls += 1
        if not healthy:
            raise ConnectionError("refused")
        return "PONG"

    b = Breaker(timeout=0.5, threshold=3, backoff=0.2)
    for _ in range(3):
        with pytest.raises(RedisUnavailable):
            await b.call("ping", call)
    assert b.open and b.up is False and calls == 3
    with pytest.raises(RedisUnavailable, match="next probe"):
        await b.call("ping", call)
    assert calls == 3  # open: the network is not touched
    healthy = True
    while True:
        try:
            assert await b.call("ping", call) == "PONG"
            break
        except RedisUnavailable:
            await asyncio.sleep(0.05)
    assert not b.open and b.up is True and calls == 4  # one probe, and it closed the circuit


async def test_breaker_times_out_a_slow_call() -> None:
    async def slow() -> None:
        await asyncio.sleep(10)

    b = Breaker(timeout=0.05)
    with pytest.raises(RedisUnavailable, match="timed out"):
        await b.call("sync", slow)
