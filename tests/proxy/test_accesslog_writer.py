"""The access log's writer thread: how the loop's batches reach it (gateway.accesslog)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from gateway.accesslog import AccessLog, AddressRedactor

GUARD = 30.0  # seconds before a wait that should have ended is an error (a hang guard, not a timing)


def test_a_busy_writer_is_not_woken_again_and_takes_what_waited_in_order(tmp_path: Path) -> None:
    """While the writer thread builds or writes, the loop's batches wait for it instead of waking
    it once per loop iteration; when it is done it takes them all, in the order they came."""
    log = AccessLog(str(tmp_path / "access.log"), AddressRedactor("full"))
    started, release = threading.Event(), threading.Event()

    def line(entry: Any, redact: AddressRedactor) -> bytes:
        if entry == 0:
            started.set()
            assert release.wait(GUARD)
        return f"{entry}\n".encode()

    log.line = line
    log.put(0)  # no running loop: each put is handed over at once, as one loop iteration's batch
    assert started.wait(GUARD)
    for n in range(1, 50):
        log.put(n)
    assert log._queue.empty() and log._backlog == list(range(1, 50))  # one wake-up, not 50
    release.set()
    log.close()
    assert (tmp_path / "access.log").read_bytes() == b"".join(f"{n}\n".encode() for n in range(50))
    assert log._added + log._settled - log._written == 0 and log.dropped == 0
