"""The data plane in this process: the real Listener and Gateway on a loopback port, for the fast tier.

The proxy port is the production one (``gateway.dataplane.server.Listener``
serving ``gateway.proxy.Gateway.handle`` on uvloop), built from the same
``Settings`` and ``load_runtime`` as ``regiongate serve``; only the process
is the test's, and the loop runs in a thread so that tests talk to it with
plain blocking sockets. ``Limits`` can be given whole, for bounds the
command line does not set.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
from prometheus_client import CollectorRegistry

from gateway.dataplane.limits import Limits
from gateway.dataplane.server import Listener, Request
from gateway.metrics import Metrics
from gateway.proxy import Gateway
from gateway.runtime import Settings, load_runtime
from gateway.server import bind
from support.processes import CITY

GB = "2.125.160.216"
POLICY = "version: 1\nrules:\n  - {name: gb, countries: [GB], action: allow}\n"
GUARD = 20.0  # seconds before a wait that should have ended is a failure (a hang guard, not a timing claim)


@dataclass
class InProcess:
    port: int
    access_log: Path
    metrics: Metrics  # the proxy's; its tallies are the loop's until the gateway has stopped


@contextlib.contextmanager
def inprocess_gateway(
    tmp_path: Path, upstream: str, limits: Limits | None = None, policy: str = POLICY, **settings: Any
) -> Iterator[InProcess]:
    """A proxy port forwarding to ``upstream``, trusting 127.0.0.1's X-Forwarded-For; stopped on exit
    (``settings``: more serve options, such as ``record_usage``)."""
    policy_path = tmp_path / "wire-policy.yaml"
    policy_path.write_text(policy)
    access_log = tmp_path / "wire-access.log"
    options = Settings(
        policy=str(policy_path),
        geoip=(CITY,),
        upstream=upstream,
        trusted_proxy=("127.0.0.1/32",),
        access_log=str(access_log),
        watch=False,
        **settings,
    )
    runtime = load_runtime(options)
    limits = limits or Limits()
    metrics = Metrics(CollectorRegistry())
    made: list[Gateway] = []

    def opened() -> Callable[[Request], None]:
        made.append(Gateway(runtime, metrics, limits))
        made[0].open(64)
        return made[0].handle

    def closed() -> None:
        made[0].close()
        runtime.access_log.close()

    with serving(opened, limits, 256, metrics, "the in-process data plane", closed) as port:
        yield InProcess(port, access_log, metrics)


@contextlib.contextmanager
def serving(
    opened: Callable[[], Callable[[Request], None]],
    limits: Limits,
    connections: int,
    metrics: Metrics,
    what: str,
    closed: Callable[[], None] = lambda: None,
) -> Iterator[int]:
    """The data plane's Listener on uvloop in a thread, on a free loopback port; that port.

    ``opened`` runs on the loop before it listens and gives the request handler (what the handler
    holds is made inside the running loop, as in the gateway); ``closed`` runs on the loop after the
    listener stopped. A failure in the thread is raised here, not lost.
    """
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    loop = uvloop.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None
    failed: list[BaseException] = []

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        listener = Listener(opened(), limits, connections, metrics.bad_request)
        await listener.start(sock)
        ready.set()
        await stop.wait()
        await listener.shutdown()
        closed()

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as e:  # reported to the test, not lost in the thread
            failed.append(e)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(GUARD) or failed:
        raise RuntimeError(f"{what} did not start: {failed}")
    try:
        yield port
    finally:
        if stop is not None:
            loop.call_soon_threadsafe(stop.set)
        thread.join(GUARD)
        sock.close()
    if failed:
        raise failed[0]
