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
import errno
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from .runtime import ConfigError, Runtime, Settings, load_runtime

log = logging.getLogger("regiongate")


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to us: two share one process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


_BIND_ADVICE = {
    errno.EADDRINUSE: "address already in use: another process listens there (an earlier regiongate?); "
    "stop it or choose another port",
    errno.EACCES: "permission denied: ports below 1024 need privileges; choose a port from 1024 up",
    errno.EADDRNOTAVAIL: "no such address on this machine: use 127.0.0.1, 0.0.0.0, or one of its own addresses",
}


def bind(host: str, port: int, what: str = "proxy (--host/--port)") -> socket.socket:
    """A listening socket, or :class:`ConfigError` naming the address, the port and what it is for."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if isinstance(e, socket.gaierror):
            problem = f"cannot resolve the host name: {e.strerror}"
        else:
            problem = _BIND_ADVICE.get(e.errno or 0, e.strerror or str(e))
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ConfigError(f"cannot listen on {where} for the {what}: {problem}") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app: Any, settings: Settings, lifespan: str, http: Any = "httptools") -> uvicorn.Config:
    return uvicorn.Config(
        app,
        loop="none",
        http=http,
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
    from .admin import ADMIN_TOKEN_ENV, create_admin_app
    from .httpprotocol import ProxyHttpProtocol
    from .metrics import Metrics
    from .proxy import Gateway

    metrics = Metrics()
    metrics.describe_sources(runtime.geo.sources, runtime.policy.source, runtime.policy.sha256)
    gateway = Gateway(runtime, metrics)
    admin = create_admin_app(runtime, metrics, admin_token=os.environ.get(ADMIN_TOKEN_ENV))
    servers = [
        _Server(_uvicorn_config(gateway, runtime.settings, "on", ProxyHttpProtocol)),
        _Server(_uvicorn_config(admin, runtime.settings, "off")),
    ]

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def stop() -> None:
            for s in servers:
                s.should_exit = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        await asyncio.gather(servers[0].serve([proxy_sock]), servers[1].serve([admin_sock]))

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        asyncio.run(main())


def _port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def serve(settings: Settings) -> int:
    """Run the gateway until SIGTERM/SIGINT. Raises ``ConfigError`` before listening on bad config."""
    logging.basicConfig(level=settings.log_level.upper(), format="regiongate: %(message)s", stream=sys.stderr)
    metrics_dir = None
    given_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given_dir:
        _clean_metrics_dir(given_dir)
    elif settings.workers > 1:
        metrics_dir = tempfile.mkdtemp(prefix="regiongate-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        runtime = load_runtime(settings)
        if (settings.host, settings.port) == (settings.admin_host, settings.admin_port) and settings.port:
            raise ConfigError(
                f"the proxy and the control plane cannot share {settings.host}:{settings.port}: "
                "give --port and --admin-port different values"
            )
        proxy_sock = bind(settings.host, settings.port, "proxy (--host/--port)")
        admin_sock = bind(settings.admin_host, settings.admin_port, "control plane (--admin-host/--admin-port)")
        _announce(runtime, proxy_sock, admin_sock)
        if settings.workers == 1:
            run_worker(runtime, proxy_sock, admin_sock)
            return 0
        return _supervise(runtime, proxy_sock, admin_sock)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _clean_metrics_dir(path: str) -> None:
    """A given directory (a container's tmpfs or emptyDir) outlives a restart: drop the last run's series."""
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(
            f"PROMETHEUS_MULTIPROC_DIR {path!r} is not a writable directory (mount a tmpfs or emptyDir there)"
        )
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))


def _announce(runtime: Runtime, proxy_sock: socket.socket, admin_sock: socket.socket) -> None:
    s = runtime.settings
    p = runtime.policy
    geo = ", ".join(
        f"{src.type} ({src.path or 'embedded'}, built {src.build_date or 'unknown'})" for src in runtime.geo.sources
    )
    lines = [
        f"proxy on http://{s.host}:{_port(proxy_sock)} -> "
        + ", ".join(f"{n}={u.base}" for n, u in runtime.upstreams.items()),
        f"control plane on http://{s.admin_host}:{_port(admin_sock)} (/healthz /readyz /metrics)",
        f"policy {p.source} sha256:{p.sha256[:12]} ({len(p.rules)} rules, mode {p.spec.mode})",
        f"geo: {geo}",
        f"workers: {s.workers}",
    ]
    if os.environ.get("REGIONGATE_ADMIN_TOKEN"):
        lines.append(f"admin API on http://{s.admin_host}:{_port(admin_sock)}/admin/ (bearer token required)")
    else:
        lines.append("admin API disabled: REGIONGATE_ADMIN_TOKEN is not set (every /admin/* route answers 404)")
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
