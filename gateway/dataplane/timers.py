"""Many requests' timeouts on one loop timer: a coarse timer wheel, never early, at most one tick late.

A relay's next deadline (connect-to-first-byte, idle between reads, total,
a stalled upload) is put in the slot of the tick that follows it
(:data:`TICK`, 50 ms), and one loop timer (``call_at``) is armed for the
earliest slot that has anyone in it. When it fires, every slot that is due
is emptied and each one in it is told (:meth:`Timed.expired`); the one told
checks its own deadlines against the loop's clock and either acts (a 504,
an idle cut) or goes in a later slot. So a timeout fires no earlier than
documented and at most one tick (plus the loop's own lag) later.

Per request this is a ``set.add`` to arm and a ``set.discard`` to disarm,
where a timer per request cost a ``TimerHandle`` (0.45 KiB held per open
stream), a push on the loop's heap and, for the many requests answered
before their deadline, a cancellation the loop clears out later. A slot left
empty by requests that finished is a set nobody is in, dropped when its tick
comes; the loop timer is moved only when a deadline earlier than every armed
one comes in (rare: deadlines are "now plus a fixed timeout").
"""

from __future__ import annotations

import asyncio
from heapq import heappop, heappush
from typing import Protocol

TICK = 0.05  # seconds: how late, at most, a timeout fires (plus the loop's lag); documented for users


class Timed(Protocol):
    def expired(self) -> None:
        """Its slot's tick came: check the deadlines against the loop's clock, act or arm again."""


Slot = set[Timed]


class Wheel:
    """The slots of one event loop (one per :class:`gateway.dataplane.pool.Pools`, that is per gateway)."""

    __slots__ = ("_armed", "_handle", "_slots", "_ticks", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._slots: dict[int, Slot] = {}
        self._ticks: list[int] = []  # a heap of the ticks that have a slot
        self._handle: asyncio.TimerHandle | None = None
        self._armed = 0  # the tick the loop timer is set for

    def add(self, at: float, timed: Timed) -> Slot:
        """Tell ``timed`` at or after ``at`` (loop time); the slot returned is where to :meth:`Slot.discard` it."""
        tick = int(at / TICK) + 1  # the first tick strictly after the deadline: never early
        try:
            slot = self._slots[tick]
        except KeyError:  # the first deadline in this tick (20 a second at most): a new slot
            slot = self._slots[tick] = set()
            heappush(self._ticks, tick)
            if self._handle is None or tick < self._armed:
                self._arm(tick)
        slot.add(timed)
        return slot

    def __len__(self) -> int:
        """How many are waiting (for tests and the curious: a disarmed one is counted nowhere)."""
        return sum(len(slot) for slot in self._slots.values())

    def _arm(self, tick: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = tick
        self._handle = self.loop.call_at(tick * TICK, self._fire)

    def _fire(self) -> None:
        self._handle = None
        ticks = self._ticks
        now = self.loop.time()
        due = []
        while ticks and ticks[0] * TICK <= now:
            due.append(self._slots.pop(heappop(ticks)))
        # Told after every due slot is out: one that arms again lands in a later slot, fired later.
        for slot in due:
            while slot:
                slot.pop().expired()
        if ticks and self._handle is None:
            self._arm(ticks[0])

    def close(self) -> None:
        """Nobody is told anything any more (the gateway is shutting down)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._slots.clear()
        self._ticks.clear()
