"""A real ``redis-server`` on a free loopback port, in a temporary directory, stopped at the end.

Started with no persistence (``--save '' --appendonly no``); a test that
restarts one asks for a ``SAVE`` first, so that what it held comes back.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.processes import free_port


def require_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail("redis-server is not installed: scripts/test installs it (Debian package redis-server)")
    return path


def _cluster_safe_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a port, and free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisServer:
    def __init__(self, directory: Path, *extra: str) -> None:
        self.binary = require_redis_server()
        self.directory = directory
        self.port = _cluster_safe_port() if "--cluster-enabled" in extra else free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            *self.extra,
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("redis-server did not listen") from None
                time.sleep(0.05)

    def command(self, *args: str, password: str | None = None) -> str:
        argv = ["redis-cli", "-p", str(self.port), "--no-auth-warning"]
        if password:
            argv += ["-a", password]
        out = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def running(directory: Path) -> Iterator[RedisServer]:
    """A redis-server for the length of a ``with`` (a fixture's life)."""
    server = RedisServer(directory).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def running_cluster(directory: Path, nodes: int = 3) -> Iterator[list[RedisServer]]:
    """A Redis Cluster of ``nodes`` masters (no replicas), its slots assigned and its state ok, for a ``with``."""
    servers = [
        RedisServer(
            directory / f"node{i}",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        )
        for i in range(nodes)
    ]
    try:
        for n in servers:
            n.start()
        out = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in servers),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        deadline = time.monotonic() + 30
        while not all("cluster_state:ok" in n.command("CLUSTER", "INFO") for n in servers):
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        yield servers
    finally:
        for n in servers:
            n.stop()
