"""Process model: bind, load, fork workers, serve two ports in each.

The parent binds both listening sockets and loads everything (so a bad
policy or database stops the process before anything listens), then runs
the servers itself (``--workers 1``) or forks workers that inherit the
sockets and the loaded, checked state. Every worker serves both the proxy
and the control-plane port, so any worker can answer ``/readyz``; with more
than one worker, counters go to prometheus-client's multiprocess files and
``/metrics`` adds them up.

A worker that dies is replaced; SIGTERM or SIGINT stops them all gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from .dataplane.limits import Limits, connection_cap, raise_nofile
from .runtime import Runtime, Settings, load_runtime

log = logging.getLogger("regiongate")

# Below this many open files, a busy replica runs out of descriptors before CPU.
LOW_NOFILE = 4096


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to us: two share one process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app: Any, settings: Settings, lifespan: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        loop="none",
        http="httptools",
        lifespan=lifespan,  # type: ignore[arg-type]
        access_log=False,
        log_level=settings.log_level,
        # The gateway does its own, stricter reading of forwarding headers.
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=10,
    )


def run_worker(runtime: Runtime, proxy_sock: socket.socket, admin_sock: socket.socket) -> None:
    from .admin import create_admin_app
    from .metrics import Metrics

    metrics = Metrics()
    metrics.describe_sources(runtime.geo.sources, runtime.policy.source, runtime.policy.sha256)
    admin = create_admin_app(runtime, metrics)
    if runtime.settings.data_plane == "asgi":
        main = _asgi_main(runtime, metrics, admin, proxy_sock, admin_sock)
    else:
        main = _native_main(runtime, metrics, admin, proxy_sock, admin_sock)
    try:
        import uvloop

        uvloop.run(main)
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        asyncio.run(main)


def limits_for(settings: Settings) -> Limits:
    return Limits(
        header_timeout=settings.header_timeout,
        idle_timeout=settings.idle_timeout,
        max_connections=settings.max_connections,
        upstream_connections=settings.upstream_connections,
        upstream_idle=settings.upstream_keepalive,
    )


async def _native_main(
    runtime: Runtime, metrics: Any, admin: Any, proxy_sock: socket.socket, admin_sock: socket.socket
) -> None:
    """The native data plane on the proxy port, uvicorn + FastAPI on the control plane."""
    from .dataplane.server import Listener
    from .proxy import Gateway

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    limits = limits_for(runtime.settings)
    cap = connection_cap(limits, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    gateway = Gateway(runtime, metrics, limits)
    gateway.open(min(limits.upstream_connections or cap, cap))
    listener = Listener(gateway.handle, limits, cap, metrics.bad_request)
    await listener.start(proxy_sock)
    admin_server = _Server(_uvicorn_config(admin, runtime.settings, "off"))
    admin_task = loop.create_task(admin_server.serve([admin_sock]))
    runtime.ready = True
    stop_task = loop.create_task(stopping.wait())
    await asyncio.wait([admin_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
    runtime.ready = False
    await listener.shutdown()
    gateway.close()
    admin_server.should_exit = True
    await admin_task
    stop_task.cancel()
    runtime.access_log.flush()


async def _asgi_main(
    runtime: Runtime, metrics: Any, admin: Any, proxy_sock: socket.socket, admin_sock: socket.socket
) -> None:
    """The previous data plane: uvicorn serving the raw ASGI app, aiohttp upstream."""
    from .asgi_proxy import Gateway

    servers = [
        _Server(_uvicorn_config(Gateway(runtime, metrics), runtime.settings, "on")),
        _Server(_uvicorn_config(admin, runtime.settings, "off")),
    ]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for s in servers:
            s.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    await asyncio.gather(servers[0].serve([proxy_sock]), servers[1].serve([admin_sock]))


def _port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def serve(settings: Settings) -> int:
    """Run the gateway until SIGTERM/SIGINT. Raises ``ConfigError`` before listening on bad config."""
    logging.basicConfig(level=settings.log_level.upper(), format="regiongate: %(message)s", stream=sys.stderr)
    metrics_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="regiongate-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    soft, hard = raise_nofile()
    try:
        runtime = load_runtime(settings)
        _note_file_limit(runtime, soft, hard)
        proxy_sock = bind(settings.host, settings.port)
        admin_sock = bind(settings.admin_host, settings.admin_port)
        _announce(runtime, proxy_sock, admin_sock)
        if settings.workers == 1:
            run_worker(runtime, proxy_sock, admin_sock)
            return 0
        return _supervise(runtime, proxy_sock, admin_sock)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _note_file_limit(runtime: Runtime, soft: int, hard: int) -> None:
    """Say so when the open-file limit, not the machine, bounds the proxy's connections."""
    if hard < LOW_NOFILE:
        cap = connection_cap(limits_for(runtime.settings), soft)
        runtime.warnings.append(
            f"the open-file limit is {hard} (hard): at most {cap} concurrent proxy connections per worker; "
            "raise it (ulimit -n, LimitNOFILE=) for more"
        )


def _announce(runtime: Runtime, proxy_sock: socket.socket, admin_sock: socket.socket) -> None:
    s = runtime.settings
    p = runtime.policy
    geo = ", ".join(f"{src.type} ({src.path or 'embedded'})" for src in runtime.geo.sources)
    lines = [
        f"proxy on http://{s.host}:{_port(proxy_sock)} -> "
        + ", ".join(f"{n}={u.base}" for n, u in runtime.upstreams.items()),
        f"control plane on http://{s.admin_host}:{_port(admin_sock)} (/healthz /readyz /metrics)",
        f"policy {p.source} sha256:{p.sha256[:12]} ({len(p.rules)} rules, mode {p.spec.mode})",
        f"geo: {geo}",
        f"workers: {s.workers}, data plane: {s.data_plane}",
    ]
    lines += [f"warning: {w}" for w in runtime.warnings]
    for line in lines:
        print(f"regiongate: {line}", file=sys.stderr, flush=True)


def _supervise(runtime: Runtime, proxy_sock: socket.socket, admin_sock: socket.socket) -> int:
    from .metrics import mark_process_dead

    children: dict[int, int] = {}
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            code = 0
            try:
                run_worker(runtime, proxy_sock, admin_sock)
            except BaseException:
                log.exception("worker %d failed", os.getpid())
                code = 1
            finally:
                os._exit(code)
        children[pid] = slot

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(runtime.settings.workers):
        spawn(slot)
    last_respawn = 0.0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        mark_process_dead(pid)
        if pid not in children or stopping:
            children.pop(pid, None)
            continue
        slot = children.pop(pid)
        log.warning("worker %d exited (status %d); starting a new one", pid, status)
        if time.monotonic() - last_respawn < 1:
            time.sleep(1)  # do not spin if workers die at startup
        last_respawn = time.monotonic()
        spawn(slot)
    return 0
