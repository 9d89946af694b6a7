"""The control plane and the live policy around one worker's data plane.

What a worker runs beside its proxy listener: the admin app
(:mod:`gateway.control.app`) behind its gate, on its own thread and event
loop (:mod:`gateway.control.listener`), the live policy
(:mod:`gateway.live`) with its file watcher and SIGHUP handler, and the
override store and audit stream. :mod:`gateway.server` enters
:func:`control_plane` once, around serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator

from ..live import inforce, watch
from ..live.reload import Live, RetiresUpstreams
from ..metrics import Metrics
from ..runtime import Runtime
from .app import admin_token, create_admin_app
from .gate import Gate
from .listener import ControlPlane
from .proxyloop import ProxyLoop


@contextlib.asynccontextmanager
async def control_plane(
    runtime: Runtime,
    metrics: Metrics,
    gateway: RetiresUpstreams,
    admin_sock: socket.socket,
    slot: int,
    supervisor: int | None,
) -> AsyncIterator[asyncio.Event]:
    """The control plane and the live policy around a data plane; yields the event SIGTERM sets.

    The admin port is uvicorn + FastAPI on a thread and event loop of its own
    (:mod:`gateway.control.listener`): a slow admin call cannot delay a proxied
    request. Policy and GeoIP changes reach this worker through its own
    supervised file watcher, SIGHUP (passed on by the supervisor) or
    ``POST /admin/reload``, and are judged on this (the proxy's) loop, with
    every parse and compile in a worker thread.
    """
    loop = asyncio.get_running_loop()
    live = Live(runtime, metrics, gateway, report=slot == 0, supervisor=supervisor)
    token = admin_token()
    s = runtime.settings
    admin = create_admin_app(runtime, metrics, live, token, ProxyLoop(loop))
    plane = ControlPlane(
        Gate(admin, token, timeout=s.header_timeout),
        admin_sock,
        header_timeout=s.header_timeout,
        idle_timeout=s.idle_timeout,
        log_level=s.log_level,
    )
    stopping = asyncio.Event()

    def stop() -> None:
        stopping.set()
        plane.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, live.on_sighup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # one that came meanwhile arrives now
    watcher = loop.create_task(watch.supervise(live, stopping)) if s.watch else None
    if watcher is None:
        # The state inherited from the parent is as of startup; a worker started
        # later (or replacing one that died) reads the files as they are now.
        live.spawn(live.reload(explicit=False, trigger="start"))
    await runtime.overrides.start(metrics)  # Redis (if any) is synced in the background from here on
    runtime.audit.start(runtime.overrides, worker=slot)  # on only with --redis: this worker's chain begins
    runtime.overrides.audit_hook = runtime.audit.override_event
    await runtime.client_keys.start()  # after the overrides: in Redis it hashes under their key
    live.spawn(inforce.record_start(runtime))

    def ended() -> None:  # on the control plane's thread
        with contextlib.suppress(RuntimeError):  # the proxy's loop already closed
            loop.call_soon_threadsafe(stopping.set)

    plane.start(ended)
    try:
        yield stopping
    finally:
        stop()
        await plane.wait()
        await live.close()
        await runtime.audit.close()
        await runtime.client_keys.close()
        await runtime.overrides.close()
        if watcher is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(watcher, 2)
