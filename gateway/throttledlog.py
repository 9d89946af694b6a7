"""Log lines that anyone on the internet can trigger, at most once a minute each.

A malformed request costs an attacker nothing and a warning line per request
would flood the log (and the disk behind it). Each kind of event is logged
the first time, then at most once per interval with how many were suppressed.
"""

from __future__ import annotations

import logging
import time


class ThrottledLog:
    def __init__(self, logger: logging.Logger, interval: float = 60.0, max_keys: int = 1024) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> bool:
        """Log ``message`` unless ``key`` was logged within the interval; say whether it was logged."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if last is None and len(self._last) >= self.max_keys:
            self._last.clear()  # bounded: forget old keys rather than grow
            self._suppressed.clear()
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            self.logger.warning(message + " (%d more like it in the last %ds)", *args, suppressed, int(self.interval))
        else:
            self.logger.warning(message, *args)
        return True
