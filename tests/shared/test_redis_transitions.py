"""Redis going down and coming back is logged once per transition, never once per failed call."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.shared.redisconn import Breaker, RedisUnavailable
from support.overrides import GB, overrides_gateway, status_of, wait_for
from support.processes import GatewayFactory, Stub
from support.redis_server import RedisServer

DOWN = "unavailable after 3 failed calls"
BACK = "answers again after"


async def test_the_breaker_logs_each_transition_once(caplog: pytest.LogCaptureFixture) -> None:
    # No back-off: every call while open is a probe, and fails again while Redis is down.
    b = Breaker(timeout=0.5, threshold=3, backoff=0, max_backoff=0, name="Redis redis://cache:6379/0")
    healthy = True

    async def call() -> str:
        if not healthy:
            raise ConnectionError("Connection refused")
        return "ok"

    async def calls(n: int) -> None:
        for _ in range(n):
            with contextlib.suppress(RedisUnavailable):
                await b.call("sync", call)

    caplog.set_level(logging.INFO, logger="regiongate")
    await calls(5)
    healthy = False
    await calls(2)
    assert not caplog.records  # two failures: not down yet (a blip)
    healthy = True
    await calls(2)
    assert not caplog.records  # and no "back" for a Redis that was never down
    healthy = False
    await calls(30)
    healthy = True
    await calls(10)
    healthy = False
    await calls(30)
    healthy = True
    await calls(1)
    messages = [r.getMessage() for r in caplog.records]
    assert [DOWN in m for m in messages] == [True, False, True, False], messages
    assert [BACK in m for m in messages] == [False, True, False, True], messages
    assert all(m.startswith("Redis redis://cache:6379/0 ") for m in messages)
    assert "Connection refused" in messages[0]


def test_gateway_logs_redis_down_and_back_once_each(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        # Calls may take 2 s: a busy machine's slow answers never open the breaker (an extra line) while Redis is up;
        # a killed Redis refuses connections at once.
        gw = overrides_gateway(
            gateway, stub, "--redis", server.url, "--redis-prefix", f"tr-{time.monotonic_ns()}:", "--redis-timeout", "2"
        )
        wait_for(lambda: _ready(gw)["overrides"]["up"] is True, 10, "Redis up")
        for cycle in (1, 2):
            errors = _errors(gw)
            server.kill()

            # The override sync asks twice a second, and requests keep coming: many failed calls.
            def lines(text: str, cycle: int = cycle) -> Callable[[], bool]:
                return lambda: gw.stderr().count(text) == cycle

            wait_for(lines(DOWN), 20, "the down line")
            for _ in range(10):
                assert status_of(gw, GB) == 200

            # Three failures open the breaker; its probes fail too: more failed calls than lines.
            def probed(errors: float = errors) -> bool:
                return _errors(gw) >= errors + 4

            wait_for(probed, 20, "a failed probe")
            server.start()
            wait_for(lines(BACK), 20, "the back line")
            assert gw.stderr().count(DOWN) == cycle  # once per transition, whatever the number of failures
        err = gw.stderr()
        assert err.count(DOWN) == 2 and err.count(BACK) == 2
        assert f"Redis {server.url} unavailable" in err
    finally:
        server.stop()


def _ready(gw) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return httpx.get(gw.admin + "/readyz", timeout=10).json()  # type: ignore[no-any-return]


def _errors(gw) -> float:  # type: ignore[no-untyped-def]
    return sum(
        float(line.split()[-1])
        for line in gw.metrics().splitlines()
        if line.startswith("regiongate_redis_errors_total{")
    )
