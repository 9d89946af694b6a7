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
from collections.abc import Callable, Iterator
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
def cluster(directory: Path, nodes: int = 3) -> Iterator[list[RedisServer]]:
    """A real Redis Cluster of ``nodes`` masters (no replicas), its slots spread over them, stopped at the end."""
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
        _until(lambda: all("cluster_state:ok" in n.command("CLUSTER", "INFO") for n in servers), 30, "the cluster")
        yield servers
    finally:
        for n in servers:
            n.stop()


@contextlib.contextmanager
def sentinel_failover(directory: Path) -> Iterator[tuple[RedisServer, RedisServer, RedisServer]]:
    """A master, its replica and a Sentinel (service ``svc``) promoting the replica a second after the master dies."""
    master = RedisServer(directory / "master").start()
    replica = RedisServer(directory / "replica").start()
    sentinel_proc = None
    try:
        replica.command("REPLICAOF", "127.0.0.1", str(master.port))
        _until(lambda: "master_link_status:up" in replica.command("INFO", "replication"), 15, "replication")
        conf = directory / "sentinel.conf"
        conf.write_text(
            f"sentinel monitor svc 127.0.0.1 {master.port} 1\n"
            "sentinel down-after-milliseconds svc 1000\nsentinel failover-timeout svc 5000\n"
        )
        sentinel = RedisServer(directory / "sentinel")
        sentinel_proc = subprocess.Popen(
            [sentinel.binary, str(conf), "--sentinel", "--port", str(sentinel.port), "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=directory,
        )
        sentinel.proc = sentinel_proc
        _until(lambda: "svc" in sentinel.command("SENTINEL", "MASTERS"), 15, "the sentinel")
        _until(lambda: sentinel.command("SENTINEL", "REPLICAS", "svc") != "", 15, "the sentinel to see the replica")
        yield master, replica, sentinel
    finally:
        for server in (master, replica):
            server.stop()
        if sentinel_proc is not None:
            sentinel_proc.terminate()
            sentinel_proc.wait(10)


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)
