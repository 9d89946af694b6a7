"""Shared fixtures: real processes on free loopback ports, real databases.

Servers run as subprocesses (``python -m gateway serve`` / ``stub``) so the
tests exercise the same code path, process model and sockets as production,
and every server is stopped when its test ends.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
GEOIP = ROOT / "tests" / "fixtures" / "geoip"
CITY = str(GEOIP / "GeoIP2-City-Test.mmdb")
COUNTRY = str(GEOIP / "GeoIP2-Country-Test.mmdb")
ASN = str(GEOIP / "GeoLite2-ASN-Test.mmdb")
ANON = str(GEOIP / "GeoIP2-Anonymous-IP-Test.mmdb")
ENTERPRISE = str(GEOIP / "GeoIP2-Enterprise-Test.mmdb")
ISP = str(GEOIP / "GeoIP2-ISP-Test.mmdb")
BAD_DATA = GEOIP / "bad-data"
POLICIES = ROOT / "policies"


def _port_block() -> range:
    """This test process's own block of loopback ports, below the kernel's ephemeral range.

    Below it, no outgoing connection's local port can take a port between ``free_port`` and the
    server's bind; one block per xdist worker (10000-32767 split in ``PYTEST_XDIST_WORKER_COUNT``
    blocks), so two workers never hand out the same port.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) if worker.isdigit() else 0
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), index + 1)
    low, high = 10000, 32768  # net.ipv4.ip_local_port_range starts at 32768 by default
    size = (high - low) // count
    return range(low + index * size, low + (index + 1) * size)


_PORTS = _port_block()
# A random start, so suites run side by side by other checkouts on this machine rarely meet.
_next_port = itertools.count(random.randrange(len(_PORTS)))


def free_port() -> int:
    """A loopback port nobody listens on, never handed out twice by this process in a row of ~11000."""
    for _ in range(len(_PORTS)):
        port = _PORTS[next(_next_port) % len(_PORTS)]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken (or in TIME_WAIT): the next one
            return port
    raise RuntimeError(f"no free loopback port in {_PORTS}")


def wait_http(url: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Stub:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url + "/_stub/stats", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]


@contextlib.contextmanager
def run_stub(*args: str) -> Iterator[Stub]:
    """``args``: more ``stub`` options (``--status 503``, ``--refuse-region``)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "stub", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/_stub/stats", proc=proc)
        yield Stub(port, proc)
    finally:
        stop(proc)


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: later SYNs go unanswered, so a connect times out."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        for _ in range(4):  # never accepted: the queue overflows
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.3)
        try:
            yield port
        finally:
            for s in fillers:
                s.close()


@pytest.fixture
def stub() -> Iterator[Stub]:
    with run_stub() as s:
        yield s


@dataclass
class Gateway:
    port: int
    admin_port: int
    proc: subprocess.Popen[bytes]
    access_log: Path
    stderr_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log_lines(self) -> list[dict[str, Any]]:
        """Access-log records so far (the log is flushed once per loop turn)."""
        deadline = time.monotonic() + 2
        while True:
            text = self.access_log.read_text() if self.access_log.exists() else ""
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            if lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

    def wait_log(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines()
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

    def wait_redis(self, attempts: int = 400) -> None:
        """Until ``/readyz`` says Redis answers: before that, a rate limit decides by ``redis.on_error``.

        A gateway is ready before its first Redis round trip; a test that counts a rate limit
        from its first request must wait for this (a busy machine let the first requests through
        uncounted, and the limit was reached one request late).
        """
        for _ in range(attempts):
            with urllib.request.urlopen(self.admin + "/readyz", timeout=5) as r:
                if json.loads(r.read())["overrides"].get("up") is True:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"the gateway never reached Redis:\n{self.stderr()}")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.admin + "/metrics", timeout=5) as r:
            body: bytes = r.read()
        return body.decode()

    def stderr(self) -> str:
        return self.stderr_path.read_text()


class GatewayFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list[Gateway] = []

    def __call__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        preexec_fn: Callable[[], None] | None = None,
    ) -> Gateway:
        port, admin_port = free_port(), free_port()
        n = len(self.running)
        access_log = self.tmp_path / f"access-{n}.log"
        stderr_path = self.tmp_path / f"gateway-{n}.err"
        argv = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
            "--access-log",
            str(access_log),
            *args,
        ]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("REGIONGATE_")}
        full_env.update(env or {})
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=full_env, preexec_fn=preexec_fn)
        gw = Gateway(port, admin_port, proc, access_log, stderr_path, argv)
        self.running.append(gw)
        if wait:
            try:
                wait_http(gw.admin + "/readyz", proc=proc)
            except (RuntimeError, TimeoutError) as e:
                raise RuntimeError(f"{e}\n--- gateway stderr ---\n{gw.stderr()}") from None
        return gw

    def close(self) -> None:
        for gw in self.running:
            stop(gw.proc)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    factory = GatewayFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


UA_CITY_ADDRESSES = {
    "UA-43": "198.51.100.43",  # Crimea
    "UA-40": "198.51.100.40",  # Sevastopol
    "UA-14": "198.51.100.14",  # Donetsk
    "UA-09": "198.51.100.9",  # Luhansk
    "UA-30": "198.51.100.30",  # Kyiv city: supported
}


@pytest.fixture(scope="session")
def ua_city_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real City-type .mmdb, written with mmdb-writer, with Ukrainian subdivisions.

    MaxMind's test databases have no Ukrainian subdivisions, and the shipped
    policy's exception for occupied regions must be tested on the real file
    format, so this writes one in the same record layout as GeoIP2-City.
    """
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(
        ip_version=6,
        database_type="GeoIP2-City",
        languages=["en"],
        description={"en": "Regiongate test: Ukrainian subdivisions"},
        ipv4_compatible=True,
    )
    for code, ip in UA_CITY_ADDRESSES.items():
        sub = code.split("-")[1]
        writer.insert_network(
            IPSet([f"{ip}/32"]),
            {
                "country": {"iso_code": "UA", "names": {"en": "Ukraine"}},
                "registered_country": {"iso_code": "UA", "names": {"en": "Ukraine"}},
                "subdivisions": [{"iso_code": sub, "names": {"en": code}}],
            },
        )
    writer.insert_network(
        IPSet(["192.0.2.0/24"]),
        {
            "country": {"iso_code": "GB"},
            "registered_country": {"iso_code": "GB"},
            "subdivisions": [{"iso_code": "ENG"}],
        },
    )
    path = tmp_path_factory.mktemp("geoip") / "ua-city.mmdb"
    writer.to_db_file(str(path))
    return str(path)


@contextlib.contextmanager
def run_nginx(tmp_path: Path, server_block: str) -> Iterator[int]:
    """A real nginx (Debian's) on a free loopback port, configured with one ``server`` block.

    ``@PORT@`` in the block is its listening port. Everything nginx writes
    lives under ``tmp_path``, so it runs without /etc or /var and as any user.
    """
    import shutil

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    prefix = tmp_path / f"nginx-{port}"
    prefix.mkdir()
    temp_paths = "\n".join(
        f"    {name}_temp_path {prefix}/{name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = (
        f"worker_processes 1;\ndaemon off;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
        f"events {{ worker_connections 256; }}\nhttp {{\n    access_log off;\n{temp_paths}\n"
        + server_block.replace("@PORT@", str(port))
        + "\n}\n"
    )
    (prefix / "nginx.conf").write_text(conf)
    proc = subprocess.Popen(
        [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(prefix / 'error.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("nginx did not start")
            time.sleep(0.05)
        yield port
    finally:
        stop(proc)


@dataclass
class Sent:
    """One request as it arrived upstream, decoded by llhttp (header names lower-cased)."""

    url: bytes = b""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""


def parse_requests(stream: bytes) -> list[Sent]:
    """Every complete request in the bytes one connection received."""
    import httptools

    done: list[Sent] = []
    current = Sent()

    class Callbacks:
        def on_url(self, url: bytes) -> None:
            current.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            current.headers[name.lower()] = value

        def on_body(self, body: bytes) -> None:
            current.body += body

        def on_message_complete(self) -> None:
            nonlocal current
            done.append(current)
            current = Sent()

    httptools.HttpRequestParser(Callbacks()).feed_data(stream)
    return done


class RawUpstream:
    """A socket upstream that records every byte it receives, per connection.

    It answers each complete request (as llhttp, through ``httptools``, sees
    it) with a small 200, and notes whether a connection ended in the middle
    of a request. For tests where the exact bytes on the wire matter.
    """

    def __init__(self) -> None:
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []  # one entry per connection, appended as bytes arrive
        self.complete: list[int] = []  # complete requests seen, per connection
        self.closed: list[bool] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        import threading

        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        import httptools

        index = len(self.received)
        self.received.append(b"")
        self.complete.append(0)
        self.closed.append(False)
        done: list[bool] = []

        class Callbacks:
            def on_message_complete(self) -> None:
                done.append(True)

        parser = httptools.HttpRequestParser(Callbacks())
        conn.settimeout(30)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                self.received[index] += data
                try:
                    parser.feed_data(data)
                except httptools.HttpParserError:
                    break
                while done:
                    done.pop()
                    self.complete[index] += 1
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        except OSError:
            pass
        finally:
            self.closed[index] = True
            conn.close()

    def requests(self) -> list[Sent]:
        """Every complete request received so far, connection by connection."""
        return [sent for stream in self.received for sent in parse_requests(stream)]

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    up = RawUpstream()
    try:
        yield up
    finally:
        up.close()
