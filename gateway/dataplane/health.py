"""Passive health of one upstream URL: learnt from the requests it serves, nothing sent to probe it.

A URL that fails ``failures`` times in a row (connect error or timeout, 502,
503, 504) is ejected: requests that have another URL to try skip it for
``backoff``, which doubles at each ejection that follows without a success in
between, up to ``max_backoff``. It comes back by itself when the time is up;
the next failure then ejects it again at once (one request finds out whether
it recovered), and one success resets it all. Each worker process learns on
its own, from its own requests.
"""

from __future__ import annotations

import time

from .limits import HealthSettings


class Health:
    __slots__ = ("backoff", "failures", "first", "limit", "max_backoff", "until")

    def __init__(self, settings: HealthSettings) -> None:
        self.limit = settings.failures
        self.first = settings.backoff
        self.max_backoff = settings.max_backoff
        self.failures = 0  # in a row
        self.backoff = 0.0  # the last ejection's length; 0 after a success
        self.until = 0.0  # time.monotonic() when the current ejection ends

    def ejected(self, now: float | None = None) -> bool:
        return self.until > (time.monotonic() if now is None else now)

    def ok(self) -> None:
        self.failures = 0
        self.backoff = 0.0
        self.until = 0.0

    def failed(self, now: float | None = None) -> None:
        self.failures += 1
        now = time.monotonic() if now is None else now
        # Requests already under way when it was ejected do not stretch the ejection.
        if self.failures >= self.limit and now >= self.until:
            self.backoff = min(self.backoff * 2, self.max_backoff) if self.backoff else self.first
            self.until = now + self.backoff
