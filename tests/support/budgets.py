"""A store observer that records the token-budget events (fallbacks and refusals) it is told."""

from __future__ import annotations

from gateway.shared.redisconn import NullObserver


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.round_trips = 0  # calls the breaker let through and Redis answered

    def latency(self, seconds: float) -> None:
        self.round_trips += 1

    def budget_fallback(self, rule: str, what: str) -> None:
        self.events.append(("fallback", rule, what))

    def budget_refused(self, rule: str, kind: str) -> None:
        self.events.append(("refused", rule, kind))
