"""Keeping a replica's copy of something in Redis fresh: a pub/sub wake-up, and a poll that heals a missed one.

A writer changes the data, bumps a version counter and publishes on a
channel. :class:`Follower` runs two tasks for a reader: one listens on the
channel and wakes the other, which calls ``sync`` when woken and in any
case every ``interval`` seconds (``sync`` reads the version and fetches the
data only when it moved). So a change reaches every replica at once when
the message arrives, and within ``interval`` when it is lost (a reconnect,
a Redis Cluster, where only the poll runs). The client keys
(:mod:`.clientkeys`) follow their hash this way, as the overrides
(:mod:`.store`) follow theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .redisconn import Breaker, describe_error

log = logging.getLogger("regiongate")


class Follower:
    """The sync and listen tasks of one reader; :meth:`close` ends both within about ``interval``."""

    def __init__(
        self,
        what: str,
        client: Any,
        breaker: Breaker,
        channel: str,
        sync: Callable[[], Awaitable[object]],
        interval: float,
        *,
        listen: bool = True,
    ) -> None:
        self.what = what  # how the log names it: "client keys"
        self.client = client
        self.breaker = breaker
        self.channel = channel
        self.sync = sync
        self.interval = interval
        self.listen = listen
        self.closing = False
        self.wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._sync_loop()))
        if self.listen:
            self._tasks.append(loop.create_task(self._listen()))

    async def close(self) -> None:
        self.closing = True
        for t in self._tasks:
            t.cancel()
        if self._tasks:  # bounded: a half-open connection must not hold up shutdown
            await asyncio.wait(self._tasks, timeout=2)
        self._tasks.clear()

    async def _sync_loop(self) -> None:
        while not self.closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self.wake.wait()
            self.wake.clear()
            try:
                await self.sync()
            except Exception:  # a bug here must not end syncing
                log.exception("%s sync failed", self.what)

    async def _listen(self) -> None:
        """Wake the sync loop when another replica announces a change."""
        # Polled with a timeout rather than ``listen()``: a cancel that lands inside redis-py's
        # read can be lost, and then the task would never end; the flag ends it within a poll.
        while not self.closing:
            pubsub = None
            try:
                if self.breaker.open:
                    await asyncio.sleep(self.interval)
                    continue
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                async with asyncio.timeout(self.breaker.timeout * 4):
                    await pubsub.subscribe(self.channel)
                while not self.closing:
                    message = await pubsub.get_message(timeout=self.interval)
                    if message is not None and message.get("type") == "message":
                        self.wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("%s channel: %s", self.what, describe_error(e))
                await asyncio.sleep(self.interval)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(pubsub.aclose(), 1)
