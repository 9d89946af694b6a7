"""The benchmark's processes: finding the tools, pinning CPUs, starting and stopping servers,
waiting until they answer, and plain HTTP calls to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import streams as stream_bench
from .common import PROBE_BODY, REPO_DIR, BenchError, log

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

# Never route the benchmark's own HTTP calls through an http_proxy from the environment:
# every request must go to 127.0.0.1 and nowhere else.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Tools:
    nginx: str
    wrk: str
    taskset: str | None
    geoip2_module: Path | None


def find_tools(need_geoip2: bool) -> Tools:
    """Find nginx, wrk (required), taskset and the geoip2 module (optional or required)."""
    nginx, wrk = shutil.which("nginx"), shutil.which("wrk")
    missing = [name for name, path in (("nginx", nginx), ("wrk", wrk)) if path is None]
    if missing or nginx is None or wrk is None:
        raise BenchError(f"not found on PATH: {', '.join(missing)} (Debian: apt-get install nginx wrk)")
    module = find_geoip2_module(nginx)
    if need_geoip2 and module is None:
        raise BenchError(
            "ngx_http_geoip2_module.so not found in nginx's modules path "
            "(Debian: apt-get install libnginx-mod-http-geoip2), or pass --skip-nginx-geoip2"
        )
    return Tools(nginx=nginx, wrk=wrk, taskset=shutil.which("taskset"), geoip2_module=module)


def find_geoip2_module(nginx: str) -> Path | None:
    """Look where this nginx was built to load modules from, then in Debian's usual place."""
    out = subprocess.run([nginx, "-V"], capture_output=True, text=True, check=False).stderr
    match = re.search(r"--modules-path=(\S+)", out)
    dirs = [Path(match.group(1))] if match else []
    dirs.append(Path("/usr/lib/nginx/modules"))
    for directory in dirs:
        candidate = directory / "ngx_http_geoip2_module.so"
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class Pinning:
    """Which CPU the servers get and which one wrk gets; None means unpinned."""

    taskset: str | None
    server_cpu: int | None
    client_cpu: int | None
    note: str

    def server(self, cmd: Sequence[str]) -> list[str]:
        return self._wrap(cmd, self.server_cpu)

    def client(self, cmd: Sequence[str]) -> list[str]:
        return self._wrap(cmd, self.client_cpu)

    def _wrap(self, cmd: Sequence[str], cpu: int | None) -> list[str]:
        if self.taskset is None or cpu is None:
            return list(cmd)
        return [self.taskset, "-c", str(cpu), *cmd]


def plan_pinning(taskset: str | None) -> Pinning:
    """Servers on the first CPU we may use, wrk on the second; unpinned if we cannot.

    The CPUs come from our own affinity mask rather than being 0 and 1 outright, so that
    a container limited to, say, CPUs 2-3 still pins correctly.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpus:
        cpus = list(range(os.cpu_count() or 1))
    if taskset is None:
        return Pinning(None, None, None, "UNPINNED: taskset not found; servers and wrk share CPUs")
    if len(cpus) < 2:
        return Pinning(None, None, None, "UNPINNED: only one CPU; servers and wrk share it")
    server, client = cpus[0], cpus[1]
    return Pinning(taskset, server, client, f"servers pinned to CPU {server}, wrk to CPU {client}")


# --- processes -------------------------------------------------------------------------


def free_port() -> int:
    """Ask the OS for a free loopback port (closed again at once; a small race we accept)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    """The environment minus REGIONGATE_* settings, which would silently change the run."""
    return {k: v for k, v in os.environ.items() if not k.startswith("REGIONGATE_")}


def raise_child_nofile() -> None:
    """Run in a child before exec: thousands of held streams need twice as many descriptors."""
    stream_bench.raise_nofile()


def spawn(cmd: Sequence[str], log_path: Path, many_files: bool = False) -> subprocess.Popen[bytes]:
    """Start a server in its own session, output to a log file.

    Its own session keeps Ctrl-C from reaching it directly, so shutdown happens in one
    place (stop()) in a known order, and lets stop() kill the whole group if need be.
    """
    with log_path.open("wb") as out:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_DIR,
            env=child_env(),
            start_new_session=True,
            preexec_fn=raise_child_nofile if many_files else None,
        )


def stop(proc: subprocess.Popen[bytes], name: str) -> None:
    """SIGTERM (both nginx and the gateway shut down on it), then SIGKILL the group."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {proc.pid}) ignored SIGTERM; killing its process group")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tails(paths: Sequence[Path], lines: int = 30) -> str:
    """The last lines of each log, for error messages."""
    out = []
    for path in paths:
        try:
            text = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            text = "(none)"
        out.append(f"--- {path.name} ---\n{text}")
    return "\n".join(out)


def wait_ready(proc: subprocess.Popen[bytes], name: str, logs: Sequence[Path], ready: Callable[[], bool]) -> None:
    """Poll ready() until it holds; fail with the server's logs if it exits or times out."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise BenchError(f"{name} exited with status {code} at startup:\n{tails(logs)}")
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.05)
    raise BenchError(f"{name} not ready after {STARTUP_TIMEOUT_S:.0f}s:\n{tails(logs)}")


def http(url: str, *, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request without proxies; HTTP error statuses are returned, not raised."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post_chat(url: str, client_ip: str) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", "X-Forwarded-For": client_ip}
    return http(url, body=PROBE_BODY, headers=headers)


def ask_nginx_contract(url: str, client_ip: str) -> tuple[int, bytes]:
    """``/authz/nginx`` asked as nginx's auth_request asks it: the status, and a refusal's body
    (the ``x-regiongate-body`` header, which nginx's ``error_page`` location sends the client)."""
    headers = {"X-Original-Method": "POST", "X-Original-URI": "/v1/chat/completions", "X-Forwarded-For": client_ip}
    request = urllib.request.Request(url, headers=headers)
    try:
        with _OPENER.open(request, timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return e.code, (e.headers.get("x-regiongate-body") or "").encode()


def connects(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
