"""The timer wheel and the relay's timeouts on it, on looptime's fake clock: no socket, no sleep.

Each timeout of an upstream request (first byte, idle between reads, total, a stalled
upload) still fires with its documented answer, never before its deadline and at most one
tick (``TICK``, 50 ms) after it; a request that finishes leaves nothing on the wheel, and
however many requests are under way, the loop holds one timer for all of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.dataplane.health import Health
from gateway.dataplane.limits import HealthSettings, Limits, UpstreamTimeouts
from gateway.dataplane.relay import DONE, Relay
from gateway.dataplane.timers import TICK, Wheel

pytestmark = pytest.mark.looptime

TIMEOUTS = UpstreamTimeouts(connect=1.0, first_byte=3.0, idle=2.0, total=7.0)


class _Told:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.at: list[float] = []

    def expired(self) -> None:
        self.at.append(self.loop.time())


async def test_the_wheel_is_never_early_and_at_most_one_tick_late() -> None:
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop)
    start = loop.time()
    told = [_Told(loop) for _ in range(4)]
    deadlines = [start + 0.01, start + 1.0, start + 1.049, start + 2.5]
    for timed, at in zip(told, deadlines, strict=True):
        wheel.add(at, timed)
    gone = _Told(loop)
    wheel.add(start + 0.5, gone).discard(gone)  # disarmed: never told
    await asyncio.sleep(3)
    for timed, at in zip(told, deadlines, strict=True):
        assert len(timed.at) == 1
        assert at <= timed.at[0] <= at + TICK + 1e-6
    assert gone.at == []
    assert len(wheel) == 0


async def test_an_earlier_deadline_moves_the_one_loop_timer() -> None:
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop)
    late, early = _Told(loop), _Told(loop)
    wheel.add(loop.time() + 10, late)
    wheel.add(loop.time() + 1, early)
    await asyncio.sleep(2)
    assert len(early.at) == 1 and late.at == []
    await asyncio.sleep(9)
    assert len(late.at) == 1


class _Conn:
    """An upstream connection that records what the relay wrote and whether it was let go."""

    def __init__(self) -> None:
        self.written = b""
        self.aborted = False
        self.reused = False
        self.got_bytes = False
        self.receiver: Any = None

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Pool:
    """A pool whose connections are handed over at once, or never (``connect=False``)."""

    def __init__(self, wheel: Wheel, connect: bool = True) -> None:
        self.loop = wheel.loop
        self.wheel = wheel
        self.limits = Limits(body_read_timeout=1.5)  # before the first byte's 3 s
        self.upstream = SimpleNamespace(label="openai/0", timeouts=TIMEOUTS)
        self.health = Health(HealthSettings())
        self.host_header = b"upstream"
        self.connect = connect
        self.conns: list[_Conn] = []
        self.released: list[_Conn] = []

    def acquire(self, ready: Callable[[Any, Exception | None], None], *, fresh: bool = False) -> Callable[[], None]:
        if self.connect:
            conn = _Conn()
            self.conns.append(conn)
            ready(conn, None)
        return lambda: None

    def release(self, conn: _Conn, *, unused: bool = False) -> None:
        self.released.append(conn)


class _Request:
    """What the relay asks of a client's request; the answer is kept whole in ``out``."""

    def __init__(self, *, body: bool = False) -> None:
        self.method = "POST"
        self.chunked = body
        self.has_body = body
        self.length: int | None = None
        self.body_done = not body
        self.idempotent = False
        self.keep_alive = True
        self.started = False
        self.finished = False
        self.aborted = False
        self.status = 0
        self.out = b""
        self.on_gone: Any = None
        self.on_pause: Any = None
        self.on_resume: Any = None

    def forget_headers(self) -> None:
        pass

    def read_body(self, on_chunk: Any, on_end: Any) -> list[bytes]:
        return [b"part"]  # and then nothing more: a stalled upload

    def pause_body(self) -> None:
        pass

    def resume_body(self) -> None:
        pass

    def head(
        self, status: int, headers: list[tuple[bytes, bytes]], *, length: int | None, no_body: bool = False
    ) -> bytes:
        self.started, self.status = True, status
        return b"HEAD %d\n" % status

    def frame(self, data: bytes) -> bytes:
        return data

    def tail(self) -> bytes:
        return b"<end>"

    def send(self, data: bytes) -> None:
        self.out += data

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.send(self.head(status, headers, length=len(body)) + body)
        self.finish()

    def finish(self) -> None:
        self.finished = True

    def abort(self) -> None:
        self.finished = self.aborted = True


def _outcome() -> Any:
    return SimpleNamespace(
        attempted=False, client_gone=False, status=0, sent=0, error=None, ttfb=None, target=None,
        failovers=None, refused=None, attempts=0,
    )  # fmt: skip


def _relay(pool: _Pool, request: _Request, done: Callable[[], None] = lambda: None) -> Relay:
    policy = (b"x-regiongate-policy", b"t")
    return Relay(request, pool, b"/v1/x", [], b"rid", policy, _outcome(), done)  # type: ignore[arg-type]


def _loop_timers(loop: asyncio.AbstractEventLoop) -> int:
    """Timers armed on the loop and not cancelled (asyncio's own loop, which looptime drives)."""
    scheduled: list[asyncio.TimerHandle] = loop._scheduled  # type: ignore[attr-defined]
    return len([handle for handle in scheduled if not handle.cancelled()])


async def _answered_at(request: _Request, relay: Relay) -> float:
    loop = asyncio.get_running_loop()
    while relay.phase is not DONE:
        await asyncio.sleep(TICK / 5)
    assert request.finished
    return loop.time()


@pytest.mark.parametrize("connect", [True, False], ids=["sent", "no connection"])
async def test_no_first_byte_is_a_504_on_time(connect: bool) -> None:
    loop = asyncio.get_running_loop()
    request = _Request()
    relay = _relay(_Pool(Wheel(loop), connect), request)
    start = loop.time()
    relay.start()
    ended = await _answered_at(request, relay)
    assert start + TIMEOUTS.first_byte <= ended <= start + TIMEOUTS.first_byte + TICK + 0.02
    assert request.status == 504 and b"upstream_timeout" in request.out
    assert relay.outcome.error == "upstream_timeout"


async def test_an_idle_stream_is_cut_with_an_error_event_on_time() -> None:
    loop = asyncio.get_running_loop()
    request = _Request()
    pool = _Pool(Wheel(loop))
    relay = _relay(pool, request)
    relay.start()
    await asyncio.sleep(0.5)
    relay.upstream_head(200, [(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")])
    relay.upstream_body(b"data: one\n\n")
    relay.upstream_fed()
    last = loop.time()
    ended = await _answered_at(request, relay)
    assert last + TIMEOUTS.idle <= ended <= last + TIMEOUTS.idle + TICK + 0.02
    assert b"upstream_idle_timeout" in request.out and request.out.endswith(b"<end>")
    assert pool.conns[0].aborted


async def test_a_stream_that_keeps_talking_is_cut_at_the_total_timeout() -> None:
    loop = asyncio.get_running_loop()
    request = _Request()
    pool = _Pool(Wheel(loop))
    relay = _relay(pool, request)
    start = loop.time()
    relay.start()
    relay.upstream_head(200, [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")])
    relay.upstream_fed()
    while relay.phase is not DONE:
        relay.upstream_body(b"x")  # every second: never idle for 2 s
        relay.upstream_fed()
        await asyncio.sleep(1)
    assert start + TIMEOUTS.total <= loop.time() <= start + TIMEOUTS.total + 1
    assert request.aborted and relay.outcome.error == "upstream_total_timeout"


async def test_a_stalled_upload_is_a_408_on_time() -> None:
    loop = asyncio.get_running_loop()
    request = _Request(body=True)
    relay = _relay(_Pool(Wheel(loop)), request)
    start = loop.time()
    relay.start()
    ended = await _answered_at(request, relay)
    assert start + 1.5 <= ended <= start + 1.5 + TICK + 0.02
    assert request.status == 408 and not request.keep_alive


async def test_requests_share_one_loop_timer_and_a_finished_one_leaves_nothing() -> None:
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop)
    pool = _Pool(wheel)
    before = _loop_timers(loop)
    relays = []
    for _ in range(50):
        relay = _relay(pool, _Request())
        relay.start()
        relays.append(relay)
    assert _loop_timers(loop) == before + 1  # the wheel's, for all fifty
    assert len(wheel) == 50
    for relay in relays:
        relay.upstream_head(200, [(b"content-length", b"2")])
        relay.upstream_body(b"ok")
        relay.upstream_complete()
        relay.upstream_fed()
        assert relay.phase is DONE and relay.slot is None
    assert len(wheel) == 0  # finishing was a set.discard each: nothing to cancel on the loop
    assert len(pool.released) == 50
