"""Token budgets and concurrency slots in this process's memory: the Redis store's semantics, for one process.

Each request is judged whole (every entry and the slot, all written or none)
in one synchronous step, which the event loop makes atomic, with the pure
arithmetic of :mod:`gateway.policy.tokenlimit`. A rate's TAT is on the
monotonic clock; a quota's window on the wall clock (UTC-aligned, as in
Redis). Subjects that have their whole budget again are forgotten by
:meth:`MemoryBudgets.sweep`, which the store's expiry loop calls, so memory
follows the subjects active in the last period, not every subject ever seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ..policy.tokenlimit import TokenCheck, gcra_cost, gcra_settle, quota_check, quota_settle, quota_window
from .budgetlua import Ask, Outcome, Reserved, SlotAsk, capacity


class MemoryBudgets:
    backend = "memory"
    prefix = ""

    def __init__(self) -> None:
        self._tats: dict[str, float] = {}  # rate: subject key -> TAT (monotonic seconds)
        self._used: dict[str, tuple[int, int, float]] = {}  # quota: key -> (window, tokens used, window's end)
        self._slots: dict[str, dict[str, float]] = {}  # concurrency: subject key -> member -> lease end
        self.monotonic, self.wall = time.monotonic, time.time  # the clocks (a test moves them by hand)

    def reserve(self, asks: Sequence[Ask], slot: SlotAsk | None, then: Callable[[Outcome | None], None]) -> None:
        mono, wall = self.monotonic(), self.wall()
        checks: list[TokenCheck] = []
        windows: list[int] = []
        tats: dict[str, float] = {}
        used: dict[str, tuple[int, int, float]] = {}
        for a in asks:
            limit = a.limit
            if limit.kind == "quota":
                window, reset = quota_window(wall, limit.per)
                before = self._used_in(used.get(a.key) or self._used.get(a.key), window)
                check, after = quota_check(before, limit.tokens, a.cost, reset)
                used[a.key] = (window, after, wall + reset)
                windows.append(window)
            else:
                interval = limit.per / limit.tokens
                tat = tats.get(a.key, self._tats.get(a.key))
                check, tats[a.key] = gcra_cost(tat, mono, interval, capacity(limit) * interval, a.cost)
                windows.append(0)
            checks.append(check)
        outcome = Outcome(tuple(checks), tuple(windows))
        if slot is not None:
            members = self._live(slot.key, mono)
            if len(members) >= slot.streams:
                wait = min(members.values()) - mono if members else 0.0
                outcome = Outcome(outcome.checks, outcome.windows, False, len(members), wait)
            else:
                outcome = Outcome(outcome.checks, outcome.windows, True, len(members) + 1)
        if outcome.allowed:  # all or none, as the Lua step
            self._tats.update(tats)
            self._used.update(used)
            if slot is not None:
                self._slots.setdefault(slot.key, {})[slot.member] = mono + slot.lease
        then(outcome)

    @staticmethod
    def _used_in(held: tuple[int, int, float] | None, window: int) -> int:
        return held[1] if held is not None and held[0] == window else 0

    def _live(self, key: str, now: float) -> dict[str, float]:
        members = self._slots.get(key, {})
        for m in [m for m, end in members.items() if end <= now]:
            del members[m]
        return members

    def adjust(self, rule: str, changes: Sequence[tuple[Reserved, int]]) -> None:
        """Each reservation replaced by what it really cost (0: a refund)."""
        mono, wall = self.monotonic(), self.wall()
        for r, actual in changes:
            delta = actual - r.cost
            if r.limit.kind == "quota":
                window, reset = quota_window(wall, r.limit.per)
                if window == r.window:  # else the reservation ended with its window
                    used = quota_settle(self._used_in(self._used.get(r.key), window), delta)
                    self._used[r.key] = (window, used, wall + reset)
            else:
                tat = gcra_settle(self._tats.get(r.key), mono, r.limit.per / r.limit.tokens, delta)
                if tat is not None:
                    self._tats[r.key] = tat

    def release(self, rule: str, key: str, member: str) -> None:
        members = self._slots.get(key)
        if members is not None:
            members.pop(member, None)
            if not members:
                del self._slots[key]

    def sweep(self) -> None:
        """Forget subjects at their whole budget: a TAT passed, a window ended, no slot held."""
        mono, wall = self.monotonic(), self.wall()
        self._tats = {k: v for k, v in self._tats.items() if v > mono}
        self._used = {k: v for k, v in self._used.items() if v[2] > wall}
        self._slots = {k: m for k, m in self._slots.items() if self._live(k, mono)}
