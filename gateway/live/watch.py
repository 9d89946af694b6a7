"""Noticing that a watched file changed, however it was changed.

Files are replaced in three ways in practice, and each shows up in the
*directory*, not on the file: written in place (a modify event on the
name), written beside and renamed over (editors, ``sed -i``, Ansible,
``geoipupdate``: a move onto the name), and Kubernetes' ConfigMap volume
(the name is a symlink through ``..data``, itself a symlink swapped
atomically to a new timestamped directory: events on ``..data``). So the
watcher watches, non-recursively, the directory of each configured path and
the directory its real path is in, lets through events on those names and
on ``..``-names, and on any of them asks :class:`~gateway.live.reload.Live`
to compare content (hash for policies, inode for databases). When a symlink
now points into another directory, the watch is rebuilt. ``watchfiles``
debounces a burst of events into one batch.

The watcher is supervised (:func:`supervise`): whatever kills it (a bug, a
``MemoryError``) is logged with its traceback, counted in
``regiongate_file_watcher_restarts_total``, shown in ``/readyz`` while it is
down, and the watcher is started again after a backoff; its first check then
catches up with what changed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from watchfiles import Change, awatch

from .reload import Live

log = logging.getLogger("regiongate")

# watchfiles yields once no event came for STEP ms, and at the latest
# DEBOUNCE ms into a continuous burst.
STEP_MS = 50
DEBOUNCE_MS = 400
# How soon after a (re)start the first full check runs: changes made while
# no watch was in place (worker startup, a rebuilt watch) are caught there.
FIRST_CHECK_MS = 200
# A watcher that dies is started again after 0.5 s, then 1, 2, ... up to 30 s
# while it keeps dying; one that ran for a minute starts again at 0.5 s.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
HEALTHY_AFTER = 60.0


def watch_set(paths: list[str]) -> tuple[frozenset[str], frozenset[str]]:
    """The directories to watch and the names in them that matter."""
    dirs: set[str] = set()
    names: set[str] = set()
    for p in paths:
        for q in (os.path.abspath(p), os.path.realpath(p)):
            d = os.path.dirname(q)
            if os.path.isdir(d):
                dirs.add(d)
            names.add(os.path.basename(q))
    return frozenset(dirs), frozenset(names)


async def run(live: Live, stop: asyncio.Event) -> None:
    """Watch until ``stop`` is set; every relevant batch of events becomes one ``live.reload``."""
    polling = False  # inotify can run out (instances, watches); then watchfiles polls instead
    while not stop.is_set():
        dirs, names = watch_set(live.watched_paths())
        if not dirs:
            await _sleep_unless(stop, 1.0)
            continue

        def relevant(_change: Change, path: str, names: frozenset[str] = names) -> bool:
            name = os.path.basename(path)
            return name in names or name.startswith("..")

        first = True
        reloading = False  # an error raised by the reload is the supervisor's, not a sign inotify failed
        changes = awatch(
            *sorted(dirs),
            watch_filter=relevant,
            debounce=DEBOUNCE_MS,
            step=STEP_MS,
            stop_event=stop,
            rust_timeout=FIRST_CHECK_MS,
            yield_on_timeout=True,
            recursive=False,
            force_polling=polling,
        )
        try:
            async with contextlib.aclosing(changes):
                async for batch in changes:
                    if batch or first:
                        first = False
                        reloading = True
                        await live.reload(explicit=False)
                        reloading = False
                    if watch_set(live.watched_paths()) != (dirs, names):
                        break  # a symlink now leads elsewhere (ConfigMap swap): watch the new place
        except FileNotFoundError as e:  # a watched directory vanished under the watcher
            if reloading:
                raise
            log.debug("file watch restarting: %s", e)
            await _sleep_unless(stop, 0.2)
        except (OSError, RuntimeError) as e:
            if reloading:
                raise
            if not polling:
                log.warning("cannot watch files with inotify (%s); polling them instead", e)
            polling = True
            await _sleep_unless(stop, 0.2)


async def supervise(live: Live, stop: asyncio.Event, first_delay: float = RESTART_FIRST) -> None:
    """Run the watcher until ``stop`` is set, starting it again (with backoff) whenever it dies."""
    status = live.runtime.watcher
    loop = asyncio.get_running_loop()
    delay = first_delay
    while not stop.is_set():
        status.running, status.restart_at = True, None
        began = loop.time()
        try:
            await run(live, stop)
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # MemoryError and RecursionError too: whatever it was, watch again
            if loop.time() - began > HEALTHY_AFTER:
                delay = first_delay
            status.running = False
            status.restarts += 1
            status.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            status.failed_at = time.time()
            status.restart_at = status.failed_at + delay
            live.metrics.watcher_restart()
            log.error("the file watcher failed; restarting it in %g s", delay, exc_info=e)
        await _sleep_unless(stop, delay)
        delay = min(delay * 2, RESTART_MAX)
    status.running = False


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
