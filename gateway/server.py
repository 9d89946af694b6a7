"""Process model: bind, load, fork workers, serve two ports in each.

The parent binds both listening sockets and loads everything (so a bad
policy or database stops the process before anything listens), then runs
the servers itself (``--workers 1``) or forks workers that inherit the
sockets and the loaded, checked state. Every worker serves both the proxy
and the control-plane port (the control plane on a thread and event loop of
its own, :mod:`gateway.control`), so any worker can answer ``/readyz``; with more
than one worker, counters go to prometheus-client's multiprocess files and
``/metrics`` adds them up.

A worker that dies is replaced; SIGTERM or SIGINT stops them all gracefully.
Each worker watches the policy and GeoIP files itself (:mod:`gateway.live`);
SIGHUP to the parent is passed on to every worker, each of which reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
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
from typing import TYPE_CHECKING, Any

from .accesslog import redact_logs
from .authz import envoy_serve
from .dataplane.limits import Limits, connection_cap, raise_nofile
from .runtime import ConfigError, Runtime, Settings, load_runtime, policy_warnings
from .shared.clientkeys import ClientKeys
from .shared.store import OverrideStore, probe

if TYPE_CHECKING:  # imported when the worker starts: PROMETHEUS_MULTIPROC_DIR must be set first
    from .metrics import Metrics

log = logging.getLogger("regiongate")

# Below this many open files, a busy replica runs out of descriptors before CPU.
LOW_NOFILE = 4096


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


def run_worker(
    runtime: Runtime,
    proxy_sock: socket.socket | None,
    admin_sock: socket.socket,
    slot: int = 0,
    supervisor: int | None = None,
    authz_sock: socket.socket | None = None,
) -> None:
    from .metrics import Metrics

    metrics = Metrics()
    metrics.describe_sources(runtime.geo.sources, runtime.active.current, runtime.active.shadow_version)
    main = _native_main(runtime, metrics, proxy_sock, admin_sock, slot, supervisor, authz_sock)
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
    runtime: Runtime,
    metrics: Metrics,
    proxy_sock: socket.socket | None,
    admin_sock: socket.socket,
    slot: int,
    supervisor: int | None,
    authz_sock: socket.socket | None = None,
) -> None:
    """The native data plane on the proxy port and the decision service's, with the control plane beside them."""
    from .control.plane import control_plane
    from .dataplane.server import Listener
    from .proxy import Gateway

    limits = limits_for(runtime.settings)
    cap = connection_cap(limits, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    gateway = Gateway(runtime, metrics, limits)
    gateway.open(min(limits.upstream_connections or cap, cap))
    runtime.access_log.on_drop = metrics.access_log_dropped.inc
    listeners = []
    if proxy_sock is not None:
        listener = Listener(gateway.handle, limits, cap, metrics.bad_request)
        if runtime.edge is not None and runtime.edge.tls is not None:
            runtime.edge.tls.on_reload = metrics.tls_reload
        await listener.start(proxy_sock, runtime.edge)
        listeners.append(listener)
    if authz_sock is not None and runtime.authz is not None:
        from .authz.contracts import Contracts

        contracts = Contracts(runtime, metrics, limits, runtime.authz)
        authz = Listener(contracts.handle, limits, cap, metrics.bad_request)
        await authz.start(authz_sock)
        listeners.append(authz)
    grpc_service = await envoy_serve.start(runtime, metrics, limits)  # --authz-grpc-port; None when off
    async with control_plane(runtime, metrics, gateway, admin_sock, slot, supervisor) as stopping:
        runtime.ready = True
        await stopping.wait()
        runtime.ready = False
        await envoy_serve.stop(grpc_service, runtime.settings.redis_timeout)
        for each in listeners:
            await each.shutdown()
        gateway.close()
    runtime.access_log.close()


def _port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def serve(settings: Settings) -> int:
    """Run the gateway until SIGTERM/SIGINT. Raises ``ConfigError`` before listening on bad config."""
    logging.basicConfig(level=settings.log_level.upper(), format="regiongate: %(message)s", stream=sys.stderr)
    # Held back until the process that will reload has its handler; workers inherit the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    metrics_dir = None
    given_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given_dir:
        _clean_metrics_dir(given_dir)
    elif settings.workers > 1:
        metrics_dir = tempfile.mkdtemp(prefix="regiongate-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    soft, hard = raise_nofile()
    try:
        runtime = load_runtime(settings)
        redact_logs(runtime.access_log.redact)  # --log-address covers stderr too
        if (settings.host, settings.port) == (settings.admin_host, settings.admin_port) and settings.port:
            raise ConfigError(
                f"the proxy and the control plane cannot share {settings.host}:{settings.port}: "
                "give --port and --admin-port different values"
            )
        _note_file_limit(runtime, soft, hard)
        grpc_problem = envoy_serve.check(settings)
        if grpc_problem is not None:
            raise ConfigError(grpc_problem)
        proxy_sock = bind(settings.host, settings.port, "proxy (--host/--port)") if settings.port else None
        admin_sock = bind(settings.admin_host, settings.admin_port, "control plane (--admin-host/--admin-port)")
        authz_sock = None
        if settings.authz_port is not None:
            authz_sock = bind(settings.authz_host, settings.authz_port, "decision service (--authz-host/--authz-port)")
        if settings.authz_grpc_port:  # tried now, so a port in use is said before anything serves
            bind(settings.authz_grpc_host, settings.authz_grpc_port, envoy_serve.WHAT).close()
        redis_problem = asyncio.run(probe(runtime.overrides))
        with _pid_file(settings.pid_file):
            _announce(runtime, proxy_sock, admin_sock, redis_problem, authz_sock)
            if settings.workers == 1:
                run_worker(runtime, proxy_sock, admin_sock, authz_sock=authz_sock)
                return 0
            return _supervise(runtime, proxy_sock, admin_sock, authz_sock)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@contextlib.contextmanager
def _pid_file(path: str | None) -> Iterator[None]:
    """``--pid-file``: this (the supervising) process's pid while it serves, so that
    ``kill -HUP "$(cat FILE)"`` reaches this gateway and no other one on the host."""
    if path is None:
        yield
        return
    pid = os.getpid()
    try:
        tmp = f"{path}.{pid}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{pid}\n")
        os.replace(tmp, path)  # never a half-written file for a reader
    except OSError as e:
        raise ConfigError(f"--pid-file {path}: {e.strerror or e}") from None
    try:
        yield
    finally:
        if os.getpid() == pid:  # a forked worker leaving by an exception never removes its parent's file
            with contextlib.suppress(OSError), open(path) as f:
                if f.read().strip() == str(pid):
                    os.unlink(path)


def _clean_metrics_dir(path: str) -> None:
    """A given directory (a container's tmpfs or emptyDir) outlives a restart: drop the last run's series."""
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(
            f"PROMETHEUS_MULTIPROC_DIR {path!r} is not a writable directory (mount a tmpfs or emptyDir there)"
        )
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))


def _note_file_limit(runtime: Runtime, soft: int, hard: int) -> None:
    """Say so when the open-file limit, not the machine, bounds the proxy's connections."""
    if hard < LOW_NOFILE:
        cap = connection_cap(limits_for(runtime.settings), soft)
        runtime.warnings.append(
            f"the open-file limit is {hard} (hard): at most {cap} concurrent proxy connections per worker; "
            "raise it (ulimit -n, LimitNOFILE=) for more"
        )


def _announce(
    runtime: Runtime,
    proxy_sock: socket.socket | None,
    admin_sock: socket.socket,
    redis_problem: str | None = None,
    authz_sock: socket.socket | None = None,
) -> None:
    s = runtime.settings
    p = runtime.policy
    geo = ", ".join(
        f"{src.type} ({src.path or 'embedded'}, built {src.build_date or 'unknown'})" for src in runtime.geo.sources
    )
    from .control.app import admin_token

    admin = (
        f"admin API on http://{s.admin_host}:{_port(admin_sock)}/admin/ (bearer token from REGIONGATE_ADMIN_TOKEN)"
        if admin_token()
        else "admin API disabled: REGIONGATE_ADMIN_TOKEN is not set (every /admin/* route answers 404)"
    )
    shadow = runtime.active.shadow_version
    edge = runtime.edge
    scheme = "https" if edge is not None and edge.tls is not None else "http"
    upstreams = ", ".join(
        f"{n}={' '.join(u) if isinstance(u, list) else u}" for n, u in runtime.upstream_urls().items()
    )
    proxy = f"proxy on {scheme}://{s.host}:{_port(proxy_sock)} -> {upstreams}" if proxy_sock else "proxy port: off"
    authz = "/authz/forward /authz/nginx /authz/envoy"
    lines = [
        proxy,
        *([f"decision service on http://{s.authz_host}:{_port(authz_sock)} ({authz})"] if authz_sock else []),
        f"control plane on http://{s.admin_host}:{_port(admin_sock)} (/healthz /readyz /metrics)",
        admin,
        f"policy {p.source} sha256:{p.sha256[:12]} version {runtime.active.current.version} "
        f"({len(p.rules)} rules, mode {p.spec.mode}); "
        + ("reloads on change, SIGHUP, POST /admin/reload" if s.watch else "reloads on SIGHUP, POST /admin/reload")
        + (f" (pid {os.getpid()} in {s.pid_file})" if s.pid_file else ""),
        *([f"shadow policy {shadow.policy.source} sha256:{shadow.tag} (evaluated, never enforced)"] if shadow else []),
        f"geo: {geo}",
        f"workers: {s.workers}",
        *envoy_serve.describe(s),
    ]
    if edge is not None and edge.tls is not None:
        lines.append(f"TLS: {s.tls_cert} (reloaded when the files change), TLS 1.2+, ALPN http/1.1")
    if edge is not None and edge.proxy_from is not None:
        lines.append(
            "PROXY protocol v1/v2 required from "
            + ", ".join(str(n) for n in edge.proxy_from.networks)
            + " (and refused from everyone else)"
        )
    lines.append(_describe_overrides(runtime.overrides))
    lines.append(_describe_keys(runtime.client_keys))
    lines += [f"warning: {w}" for w in runtime.warnings]
    lines += [f"warning: {w}" for w in policy_warnings(runtime.policy, runtime.client_keys.backend)]
    if redis_problem is not None:
        lines.append(
            f"warning: Redis {runtime.overrides.describe()['url']} did not answer at startup ({redis_problem}): "
            "serving anyway; requests are decided by the policy alone until Redis answers, then its overrides apply "
            "(a circuit breaker retries it in the background; see /readyz)"
        )
    for line in lines:
        print(f"regiongate: {line}", file=sys.stderr, flush=True)


def _describe_overrides(store: OverrideStore) -> str:
    d = store.describe()
    if d["backend"] == "memory":
        return "overrides: in this process's memory (no --redis): POST /admin/overrides reaches this process only"
    return f"overrides: Redis {d['url']} ({d['mode']}), key prefix {d['prefix']!r}"


def _describe_keys(keys: ClientKeys) -> str:
    d = keys.describe()
    if d["backend"] == "off":
        return "client keys: none (no --redis, no --keys-file): `regiongate keys add` needs one of them"
    if d["backend"] == "file":  # read already; Redis is read once each worker has started
        return f"client keys: {d['keys']['active']} active, in file {d['path']} (read again when it changes)"
    return "client keys: in Redis, shared by every replica (a revoke applies everywhere within a second)"


def _supervise(
    runtime: Runtime, proxy_sock: socket.socket | None, admin_sock: socket.socket, authz_sock: socket.socket | None
) -> int:
    from .metrics import mark_process_dead

    children: dict[int, int] = {}
    stopping = False

    def spawn(slot: int) -> None:
        # A worker starts with SIGHUP blocked and unblocks it once its loop handles it,
        # so a reload asked for while it starts is delivered late rather than lost.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        pid = os.fork()
        if pid == 0:  # worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 0
            try:
                run_worker(runtime, proxy_sock, admin_sock, slot, parent, authz_sock)
            except BaseException:
                log.exception("worker %d failed", os.getpid())
                code = 1
            finally:
                os._exit(code)
        children[pid] = slot
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def reload(signum: int, _frame: Any) -> None:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    parent = os.getpid()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
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
