"""Raw HTTP/1.1 on real sockets, for the data-plane tests: a gateway started on one policy, byte-level
responses read back, and a scripted upstream (a real TCP server in a thread) that records what it got
or misbehaves in a precise way.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httptools

from support.processes import CITY, GatewayFactory, write

GB, CN = "2.125.160.216", "175.16.199.1"
TRUST = ["--trusted-proxy", "127.0.0.1/32"]
POLICY = "version: 1\nrules:\n  - {name: gb, countries: [GB], action: allow}\n"
XFF = f"X-Forwarded-For: {GB}\r\n".encode()


def start(gateway: GatewayFactory, tmp_path: Path, upstream: str, *extra: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    policy = write(tmp_path, "policy.yaml", POLICY)
    return gateway("--policy", policy, "--geoip", CITY, "--upstream", upstream, *TRUST, *extra, env=env)


# --- wire helpers --------------------------------------------------------------------------


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = False

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.encode():
                return v.decode("latin-1")
        return None

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


class _Collector:
    def __init__(self) -> None:
        self.responses: list[Response] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.responses.append(Response())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.responses[-1].headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.responses[-1].status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.responses[-1].body += body

    def on_message_complete(self) -> None:
        self.responses[-1].complete = True


def parse_responses(data: bytes) -> list[Response]:
    """Every response in a byte stream, in order (llhttp, as the gateway itself uses)."""
    c = _Collector()
    with contextlib.suppress(httptools.HttpParserError):
        c.parser.feed_data(data)
    return [r for r in c.responses if r.status >= 200]


def read_until_closed(s: socket.socket, timeout: float = 10.0, answers: int | None = None) -> tuple[bytes, bool]:
    """Everything the server sends; whether it closed the connection (rather than the wait ending).

    With ``answers``, the read also ends (not closed) once that many whole responses are in: a
    keep-alive connection that stays open is then not waited on for ``timeout`` seconds.
    """
    s.settimeout(timeout)
    chunks: list[bytes] = []
    while True:
        if answers is not None and sum(r.complete for r in parse_responses(b"".join(chunks))) >= answers:
            return b"".join(chunks), False
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            return b"".join(chunks), False
        except ConnectionResetError:
            return b"".join(chunks), True
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


def exchange(port: int, data: bytes, timeout: float = 10.0, answers: int | None = None) -> tuple[list[Response], bool]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        raw, closed = read_until_closed(s, timeout, answers)
    return parse_responses(raw), closed


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def metric(gw, text: str) -> float:  # type: ignore[no-untyped-def]
    for line in gw.metrics().splitlines():
        if line.startswith(text + " "):
            return float(line.split()[-1])
    return 0.0


class ScriptedUpstream:
    """A real TCP upstream in a thread; ``serve(conn, index)`` scripts each connection."""

    def __init__(self, serve: Callable[[socket.socket, int], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.serve = serve
        self.connections = 0
        self.received: list[bytes] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            index = self.connections
            self.connections += 1
            threading.Thread(target=self._run, args=(conn, index), daemon=True).start()

    def _run(self, conn: socket.socket, index: int) -> None:
        with conn, contextlib.suppress(OSError):
            self.serve(conn, index)

    def close(self) -> None:
        self.sock.close()


def read_request(conn: socket.socket, timeout: float = 10.0) -> bytes | None:
    """One request head plus a Content-Length body (or None at EOF)."""
    conn.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    need = int(m.group(1)) if m else 0
    while len(rest) < need:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


@contextlib.contextmanager
def scripted(serve: Callable[[socket.socket, int], None]) -> Iterator[ScriptedUpstream]:
    up = ScriptedUpstream(serve)
    try:
        yield up
    finally:
        up.close()
