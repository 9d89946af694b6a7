"""The native data plane on the wire: framing, limits, slow peers, the upstream pool, shutdown.

Raw sockets where the bytes matter; a small scripted upstream (a real TCP
server in a thread) where a test must see exactly what reached the upstream
or make it misbehave in a precise way; the bundled stub everywhere else.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from support.processes import CITY, GatewayFactory, Stub, free_port, run_stub, stop, unanswered_port, wait_http, write
from support.raw_http import (
    CN,
    GB,
    OK,
    TRUST,
    XFF,
    exchange,
    metric,
    parse_responses,
    read_request,
    read_until_closed,
    rss_kib,
    scripted,
    start,
)

# --- framing: smuggling, 100-continue, HTTP/1.0, pipelining ---------------------------------

SMUGGLING = {
    "content-length and transfer-encoding": b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n" + XFF + b"\r\n0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "conflicting content-length": b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n"
    + XFF
    + b"\r\nabcd",
    "content-length list": b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 4\r\n" + XFF + b"\r\nabcd",
    "bad chunk size": b"POST /echo/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    + XFF
    + b"\r\nzz\r\nabc\r\n0\r\n\r\n",
    "transfer-encoding not chunked last": b"POST /echo/a HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked, identity\r\n" + XFF + b"\r\n3\r\nabc\r\n0\r\n\r\n",
    "obsolete line folding": b"GET /echo/a HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n" + XFF + b"\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_ambiguous_framing_is_400_closed_and_never_forwarded(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, name: str
) -> None:
    gw = start(gateway, tmp_path, stub.url)
    responses, closed = exchange(gw.port, SMUGGLING[name])
    assert [r.status for r in responses] == [400], name
    assert responses[0].json()["error"]["type"] == "invalid_request_error"
    assert responses[0].header("content-type") == "application/json"
    assert closed
    assert stub.stats()["requests"] == 0
    assert metric(gw, 'regiongate_bad_requests_total{reason="malformed"}') == 1.0


def test_bad_chunk_after_the_request_went_upstream_aborts_it(gateway: GatewayFactory, tmp_path: Path) -> None:
    got: list[bytes] = []
    ended = threading.Event()

    def serve(conn: socket.socket, _: int) -> None:
        conn.settimeout(10)
        try:
            while chunk := conn.recv(65536):
                got.append(chunk)
        finally:
            ended.set()

    with scripted(serve) as up:
        gw = start(gateway, tmp_path, up.url)
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            s.sendall(b"POST /echo/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + XFF + b"\r\n3\r\nabc\r\n")
            deadline = time.monotonic() + 10
            while b"abc" not in b"".join(got) and time.monotonic() < deadline:
                time.sleep(0.05)
            s.sendall(b"zz\r\n")
            raw, closed = read_until_closed(s)
        assert closed and parse_responses(raw)[0].status == 400
        assert ended.wait(10), "the upstream request was not aborted"
    upstream_saw = b"".join(got)
    assert b"abc" in upstream_saw and not upstream_saw.endswith(b"0\r\n\r\n")


def test_expect_100_continue_is_answered_by_the_gateway_and_not_forwarded(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path
) -> None:
    gw = start(gateway, tmp_path, stub.url)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"POST /echo/c HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n" + XFF + b"\r\n")
        interim = s.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"hello")
        s.sendall(b"GET /echo/after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + XFF + b"\r\n")
        raw, _ = read_until_closed(s)
    first, second = parse_responses(interim[len(b"HTTP/1.1 100 Continue\r\n\r\n") :] + raw)
    echo = first.json()
    assert first.status == 200 and echo["body"] == "hello"
    assert "expect" not in {k.lower() for k, _ in echo["headers"]}
    assert second.status == 200 and second.json()["path"] == "/echo/after"


def test_expect_100_continue_refused_gets_no_interim_and_no_body_is_awaited(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path
) -> None:
    gw = start(gateway, tmp_path, stub.url)
    head = (
        "POST /echo/c HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
        f"X-Forwarded-For: {CN}\r\n\r\n"
    )
    responses, closed = exchange(gw.port, head.encode())
    assert [r.status for r in responses] == [403] and closed
    assert stub.stats()["requests"] == 0


def test_http10_client_gets_no_chunked_encoding(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = start(gateway, tmp_path, stub.url)
    body = b'{"stream": true}'
    request = (
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        + XFF
        + b"\r\n"
        + body
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(request)
        raw, closed = read_until_closed(s)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and closed
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert payload.startswith(b"data: {") and payload.endswith(b"data: [DONE]\n\n")  # close-delimited, unframed
    # a known length stays a known length
    responses, closed = exchange(gw.port, b"GET /v1/models HTTP/1.0\r\n" + XFF + b"\r\n")
    assert responses[0].status == 200 and responses[0].header("content-length") and closed


def test_pipelined_requests_are_answered_in_order(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = start(gateway, tmp_path, stub.url)
    cn = f"X-Forwarded-For: {CN}\r\n".encode()
    data = (
        b"GET /echo/1 HTTP/1.1\r\nHost: x\r\nx-stub-delay: 0.3\r\n" + XFF + b"\r\n"
        b"POST /echo/2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n" + XFF + b"\r\nabc"
        b"GET /echo/3 HTTP/1.1\r\nHost: x\r\n" + cn + b"\r\n"
        b"POST /echo/4 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + XFF + b"\r\n2\r\nhi\r\n0\r\n\r\n"
        b"GET /echo/5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + XFF + b"\r\n"
    )
    responses, closed = exchange(gw.port, data)
    assert [r.status for r in responses] == [200, 200, 403, 200, 200] and closed
    paths = [r.json().get("path") for r in responses if r.status == 200]
    assert paths == ["/echo/1", "/echo/2", "/echo/4", "/echo/5"]
    assert responses[1].json()["body"] == "abc" and responses[3].json()["body"] == "hi"


def test_chunked_upload_cut_off_by_the_client_is_aborted_upstream(gateway: GatewayFactory, tmp_path: Path) -> None:
    got: list[bytes] = []
    ended = threading.Event()

    def serve(conn: socket.socket, _: int) -> None:
        conn.settimeout(10)
        try:
            while chunk := conn.recv(65536):
                got.append(chunk)
        finally:
            ended.set()

    with scripted(serve) as up:
        gw = start(gateway, tmp_path, up.url)
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            s.sendall(
                b"POST /echo/u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + XFF + b"\r\n5\r\nhello\r\n"
            )
            deadline = time.monotonic() + 10
            while b"hello" not in b"".join(got) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert ended.wait(10), "the upstream connection was not closed"
    upstream_saw = b"".join(got)
    assert b"hello" in upstream_saw
    assert not upstream_saw.endswith(b"0\r\n\r\n")  # never completed with a terminator
    log = gw.wait_log(1)[0]
    assert log["status"] == 499 and log["error"] == "client_disconnected"


def test_header_bytes_pass_through_byte_exact(gateway: GatewayFactory, tmp_path: Path) -> None:
    got: list[bytes] = []

    def serve(conn: socket.socket, _: int) -> None:
        request = read_request(conn)
        if request:
            got.append(request)
            conn.sendall(OK)

    with scripted(serve) as up:
        gw = start(gateway, tmp_path, up.url)
        value = "café ☕".encode() + b"\xff\x80"
        responses, _ = exchange(
            gw.port,
            b"GET /echo/h HTTP/1.1\r\nHost: x\r\nX-Name: " + value + b"\r\nConnection: close\r\n" + XFF + b"\r\n",
        )
    assert responses[0].status == 200
    assert b"\r\nx-name: " + value + b"\r\n" in got[0]


# --- methods and malformed requests --------------------------------------------------------


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "PROPFIND", "PURGE"])
def test_methods_outside_the_allow_list_get_405(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, method: str
) -> None:
    gw = start(gateway, tmp_path, stub.url)
    target = b"127.0.0.1:443" if method == "CONNECT" else b"/echo/m"
    responses, _ = exchange(
        gw.port,
        method.encode()
        + b" "
        + target
        + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\n"
        + XFF
        + b"\r\n",
    )
    assert responses and responses[0].status == 405, method
    assert responses[0].json()["error"]["code"] == "method_not_allowed"
    assert stub.stats()["requests"] == 0


def test_parser_errors_are_json_counted_and_their_log_is_rate_limited(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path
) -> None:
    gw = start(gateway, tmp_path, stub.url)
    for _ in range(30):
        responses, closed = exchange(gw.port, b"GARBAGE\r\n\r\n")
        assert responses[0].status == 400 and closed
        assert responses[0].json()["error"]["type"] == "invalid_request_error"
    assert metric(gw, 'regiongate_bad_requests_total{reason="malformed"}') == 30.0
    lines = [line for line in gw.stderr().splitlines() if "bad request" in line]
    assert 1 <= len(lines) < 30
    assert "Traceback" not in gw.stderr()


# --- limits and slow peers -----------------------------------------------------------------


def test_request_line_too_long_is_414(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = start(gateway, tmp_path, stub.url)
    responses, closed = exchange(gw.port, b"GET /echo/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n" + XFF + b"\r\n")
    assert [r.status for r in responses] == [414] and closed
    assert metric(gw, 'regiongate_bad_requests_total{reason="uri_too_long"}') == 1.0


def test_too_many_headers_is_431(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = start(gateway, tmp_path, stub.url)
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(500))
    responses, closed = exchange(gw.port, b"GET /echo/h HTTP/1.1\r\nHost: x\r\n" + headers + XFF + b"\r\n")
    assert [r.status for r in responses] == [431] and closed
    assert stub.stats()["requests"] == 0


def test_endless_header_is_431_before_memory_grows(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = start(gateway, tmp_path, stub.url)
    before = rss_kib(gw.proc.pid)
    sent = 0
    piece = b"a" * 65536
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"GET /echo/h HTTP/1.1\r\nHost: x\r\nX-Big: ")
        with contextlib.suppress(OSError):
            while sent < 48 * 1024 * 1024:
                s.sendall(piece)
                sent += len(piece)
        raw, _ = read_until_closed(s)
    assert parse_responses(raw)[0].status == 431
    assert sent < 8 * 1024 * 1024  # refused long before the 48 MiB were sent
    assert rss_kib(gw.proc.pid) - before < 16 * 1024
    assert httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": GB}).status_code == 200


def test_slow_headers_and_silent_connections_are_closed(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = start(gateway, tmp_path, stub.url, "--header-timeout", "1", "--idle-timeout", "1")
    with (
        socket.create_connection(("127.0.0.1", gw.port)) as slow,
        socket.create_connection(("127.0.0.1", gw.port)) as silent,
    ):
        slow.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        raw, closed = read_until_closed(slow, timeout=15)
        assert closed and parse_responses(raw)[0].status == 408
        raw, closed = read_until_closed(silent, timeout=15)
        assert closed and raw == b""


def test_500_slow_connections_do_not_stop_a_normal_request(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = start(gateway, tmp_path, stub.url, "--header-timeout", "2")
    slow = []
    try:
        for _ in range(500):
            s = socket.create_connection(("127.0.0.1", gw.port))
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(s)
        r = httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": GB}, timeout=10)
        assert r.status_code == 200
        # and then they are closed, each answered 408
        raw, closed = read_until_closed(slow[0], timeout=15)
        assert closed and parse_responses(raw)[0].status == 408
    finally:
        for s in slow:
            s.close()


def _spawn_with_nofile(
    tmp_path: Path, soft: int, hard: int, *args: str
) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    port, admin = free_port(), free_port()
    err = tmp_path / "gw.err"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    env = {k: v for k, v in os.environ.items() if not k.startswith("REGIONGATE_")}
    with open(err, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--admin-port", str(admin),
             "--access-log", "off", *args],
            stdout=subprocess.DEVNULL, stderr=f, preexec_fn=limit, env=env,
        )  # fmt: skip
    wait_http(f"http://127.0.0.1:{admin}/readyz", proc=proc)
    return proc, port, admin, err


def test_connection_cap_keeps_the_control_plane_up(stub: Stub, tmp_path: Path) -> None:
    proc, port, admin, err = _spawn_with_nofile(tmp_path, 256, 256, "--upstream", stub.url)
    sockets = []
    try:
        for _ in range(300):
            sockets.append(socket.create_connection(("127.0.0.1", port)))
        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=5) as r:
                assert r.status == 200, path
        # connections over the cap get a clear 503 and are closed
        raw, closed = read_until_closed(sockets[-1], timeout=5)
        assert closed and parse_responses(raw)[0].status == 503
        assert "open-file limit is 256" in err.read_text()
    finally:
        for s in sockets:
            s.close()
        stop(proc)


def test_open_file_limit_is_raised_to_the_hard_limit(stub: Stub, tmp_path: Path) -> None:
    proc, _, _, err = _spawn_with_nofile(tmp_path, 300, 2048, "--upstream", stub.url)
    try:
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        soft, hard = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits).groups()  # type: ignore[union-attr]
        assert (soft, hard) == ("2048", "2048")
        assert "open-file limit is 2048" in err.read_text()
    finally:
        stop(proc)


# --- backpressure ----------------------------------------------------------------------------


def test_slow_reader_of_a_large_response_keeps_memory_bounded(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path
) -> None:
    gw = start(gateway, tmp_path, stub.url)
    size = 512 * 1024 * 1024
    before = rss_kib(gw.proc.pid)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.connect(("127.0.0.1", gw.port))
        s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\n" % size + XFF + b"\r\n")
        received = 0
        peak = 0
        s.settimeout(10)
        while received < 16 * 1024 * 1024:
            received += len(s.recv(65536))
            time.sleep(0.002)
            if received % (1024 * 1024) < 65536:
                peak = max(peak, rss_kib(gw.proc.pid) - before)
    assert peak < 32 * 1024, f"gateway grew by {peak} KiB while a client read 16 MiB of a 512 MiB response"


def test_slow_upstream_reader_pauses_the_client_upload(gateway: GatewayFactory, tmp_path: Path) -> None:
    release = threading.Event()

    def serve(conn: socket.socket, _: int) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        release.wait(30)  # reads nothing until told

    with scripted(serve) as up:
        gw = start(gateway, tmp_path, up.url)
        before = rss_kib(gw.proc.pid)
        sent = 0
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            s.connect(("127.0.0.1", gw.port))
            s.sendall(b"POST /echo/up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % (1 << 30) + XFF + b"\r\n")
            s.settimeout(3)
            with contextlib.suppress(TimeoutError):
                while sent < 256 * 1024 * 1024:
                    s.sendall(b"u" * 65536)
                    sent += 65536
            grown = rss_kib(gw.proc.pid) - before
            release.set()
    assert sent < 64 * 1024 * 1024, f"the client could push {sent} bytes into a gateway whose upstream reads nothing"
    assert grown < 32 * 1024


# --- the upstream pool ------------------------------------------------------------------------


def test_upstream_connections_are_kept_alive(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = start(gateway, tmp_path, stub.url)
    ports = set()
    for _ in range(5):
        r = httpx.get(gw.url + "/echo/k", headers={"X-Forwarded-For": GB, "Connection": "close"})
        ports.add(r.json()["client_port"])
    assert len(ports) == 1


def test_connections_per_upstream_are_bounded(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = start(gateway, tmp_path, stub.url, "--upstream-connections", "2")
    results: list[httpx.Response] = []

    def call() -> None:
        results.append(
            httpx.get(gw.url + "/echo/b", headers={"X-Forwarded-For": GB, "x-stub-delay": "0.3"}, timeout=20)
        )

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 6
    assert len({r.json()["client_port"] for r in results}) <= 2


def test_idle_upstream_connections_expire(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = start(gateway, tmp_path, stub.url, "--upstream-keepalive", "0.5")
    first = httpx.get(gw.url + "/echo/i", headers={"X-Forwarded-For": GB}).json()["client_port"]
    second = httpx.get(gw.url + "/echo/i", headers={"X-Forwarded-For": GB}).json()["client_port"]
    time.sleep(1.5)
    third = httpx.get(gw.url + "/echo/i", headers={"X-Forwarded-For": GB}).json()["client_port"]
    assert first == second != third


def _closes_under_the_second_request(conn: socket.socket, index: int) -> None:
    """Connection 0 answers once, then takes the next request and closes without a byte."""
    while request := read_request(conn):
        if index == 0 and b"/second" in request:
            return
        conn.sendall(OK)


@pytest.mark.parametrize(
    ("method", "headers"),
    [("DELETE", {}), ("PUT", {}), ("GET", {}), ("POST", {"Idempotency-Key": "k-1"})],
)
def test_request_on_a_stale_pooled_connection_is_retried_once(
    gateway: GatewayFactory, tmp_path: Path, method: str, headers: dict[str, str]
) -> None:
    """A request that may be sent twice (idempotent, or with an Idempotency-Key) is; the log counts both sends."""
    with scripted(_closes_under_the_second_request) as up:
        gw = start(gateway, tmp_path, up.url, "--allow-method", "GET", "--allow-method", method)
        assert httpx.get(gw.url + "/first", headers={"X-Forwarded-For": GB}).status_code == 200
        r = httpx.request(method, gw.url + "/second", content=b"whole body", headers={"X-Forwarded-For": GB, **headers})
        assert r.status_code == 200
        assert up.connections == 2
        assert [line.get("attempts") for line in gw.wait_log(2)] == [1, 2]


def test_a_post_is_never_sent_twice_on_a_stale_connection(gateway: GatewayFactory, tmp_path: Path) -> None:
    """The upstream may have read (and acted on) a POST before it closed: a 502, and one send in the log."""
    with scripted(_closes_under_the_second_request) as up:
        gw = start(gateway, tmp_path, up.url)
        assert httpx.get(gw.url + "/first", headers={"X-Forwarded-For": GB}).status_code == 200
        r = httpx.post(gw.url + "/second", content=b"whole body", headers={"X-Forwarded-For": GB})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_bad_response"
        assert up.connections == 1
        assert [line.get("attempts") for line in gw.wait_log(2)] == [1, 1]


def test_body_too_large_to_hold_is_not_retried_on_a_stale_connection(gateway: GatewayFactory, tmp_path: Path) -> None:
    with scripted(_closes_under_the_second_request) as up:
        gw = start(gateway, tmp_path, up.url)
        assert httpx.get(gw.url + "/first", headers={"X-Forwarded-For": GB}).status_code == 200
        r = httpx.post(gw.url + "/second", content=b"b" * 300_000, headers={"X-Forwarded-For": GB}, timeout=10)
        assert r.status_code == 502  # streamed through and not kept: it cannot be sent again
        assert up.connections == 1


def _make_ca(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA of its own and a certificate for 127.0.0.1 signed by it (openssl, at test time)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=Regiongate test CA")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=127.0.0.1")
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "leaf.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return tmp_path / "ca.pem", tmp_path / "leaf.pem", tmp_path / "leaf.key"


@pytest.mark.skipif(not Path("/usr/bin/openssl").exists(), reason="openssl comes from scripts/test")
def test_tls_upstream_is_verified_and_pooled(gateway: GatewayFactory, tmp_path: Path) -> None:
    ca, cert, key = _make_ca(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "stub", "--port", str(port), "--certfile", str(cert), "--keyfile", str(key)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        url = f"https://127.0.0.1:{port}"
        trusted = start(gateway, tmp_path, url, env={"SSL_CERT_FILE": str(ca)})
        ports = {
            httpx.get(trusted.url + "/echo/tls", headers={"X-Forwarded-For": GB}).json()["client_port"]
            for _ in range(3)
        }
        assert len(ports) == 1  # one TLS connection, kept alive
        untrusted = start(gateway, tmp_path, url)  # the system store does not know this CA
        r = httpx.get(untrusted.url + "/echo/tls", headers={"X-Forwarded-For": GB})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
    finally:
        stop(proc)


# --- shutdown ------------------------------------------------------------------------------------


def test_sigterm_lets_streams_finish_and_stops_accepting(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = start(gateway, tmp_path, stub.url)
    events = []
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        json={"stream": True},
        headers={"X-Forwarded-For": GB, "x-stub-chunk-delay": "0.3", "x-stub-chunks": "6"},
        timeout=15,
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line)
                if len(events) == 1:
                    gw.proc.send_signal(signal.SIGTERM)
                    time.sleep(0.3)
                    with pytest.raises(httpx.ConnectError):
                        httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": GB}, timeout=2)
    assert events[-1] == "data: [DONE]" and len(events) == 8
    assert gw.proc.wait(timeout=15) == 0


# --- differential: the same requests straight to the stub and through the gateway ----------------

VARIED = [
    ("GET", "/echo/plain", {}, None),
    ("POST", "/echo/json?x=1&y=%2F", {"Content-Type": "application/json"}, b'{"a": 1}'),
    ("PUT", "/echo/put", {"X-Dup": "1"}, b"p" * 70000),
    ("PATCH", "/echo/p%20q", {"X-Weird": "  spaced  value", "X-Empty": ""}, b"x"),
    ("DELETE", "/echo/del", {"Accept-Encoding": "gzip", "X-Utf8": "naïve ☃"}, None),
    ("OPTIONS", "/echo/opt", {"Cookie": "a=b; c=d", "X-Case": "MiXeD"}, None),
    ("POST", "/echo/chunked", {}, [b"first,", b"second,", b"third"]),
    ("POST", "/echo/empty", {"Content-Length": "0"}, b""),
]

# What the gateway changes on purpose (docs/reference/errors.md, "Forwarded requests"): hop-by-hop headers go,
# Host is the upstream's, the peer is appended to X-Forwarded-For, the decided address is
# added as X-Regiongate-Client-IP; a chunked body is sent on chunked (llhttp reframes it,
# so chunk boundaries may differ, which the stub cannot see).
REWRITTEN = {"host", "x-forwarded-for", "x-regiongate-client-ip", "connection", "keep-alive", "transfer-encoding"}


def _raw_request(method: str, path: str, headers: dict[str, str], body: object, port: int) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"X-Forwarded-For: {GB}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if isinstance(body, list):
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in body) + b"0\r\n\r\n"
    elif body is not None:
        if "Content-Length" not in headers:
            lines.append(f"Content-Length: {len(body)}")  # type: ignore[arg-type]
        payload = body  # type: ignore[assignment]
    else:
        payload = b""
    lines.append("Connection: close")
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + payload


def test_differential_gateway_versus_straight_to_the_stub(gateway: GatewayFactory, tmp_path: Path) -> None:
    with run_stub() as stub:
        # Every method the varied requests use is allowed here (PUT and PATCH are not by default).
        every = ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE")
        methods = [a for m in every for a in ("--allow-method", m)]
        gw = start(gateway, tmp_path, stub.url, *methods)
        for method, path, headers, body in VARIED:
            direct, _ = exchange(stub.port, _raw_request(method, path, headers, body, stub.port))
            proxied, _ = exchange(gw.port, _raw_request(method, path, headers, body, stub.port))
            d, p = direct[0].json(), proxied[0].json()
            assert proxied[0].status == direct[0].status == 200, (method, path)
            for key in ("method", "path", "query", "body", "body_length"):
                assert p[key] == d[key], (method, path, key)

            def kept(echo: dict[str, object]) -> list[tuple[str, str]]:
                return [(k.lower(), v) for k, v in echo["headers"] if k.lower() not in REWRITTEN]  # type: ignore[attr-defined]

            assert kept(p) == kept(d), (method, path)
            xff = dict((k.lower(), v) for k, v in p["headers"])["x-forwarded-for"]
            assert xff == f"{GB}, 127.0.0.1"
            assert dict((k.lower(), v) for k, v in p["headers"])["x-regiongate-client-ip"] == GB
            assert dict((k.lower(), v) for k, v in p["headers"])["host"] == f"127.0.0.1:{stub.port}"


# --- bodiless answers, and the previous data plane still selectable ------------------------------


def test_head_204_and_304_have_no_body_and_keep_the_connection(gateway: GatewayFactory, tmp_path: Path) -> None:
    def serve(conn: socket.socket, _: int) -> None:
        while request := read_request(conn):
            if request.startswith(b"HEAD"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1234\r\n\r\n")
            elif b"/204" in request.split(b"\r\n")[0]:
                conn.sendall(b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n")
            else:
                conn.sendall(b'HTTP/1.1 304 Not Modified\r\netag: "e"\r\n\r\n')

    with scripted(serve) as up:
        gw = start(gateway, tmp_path, up.url)
        data = (
            b"HEAD /h HTTP/1.1\r\nHost: x\r\n" + XFF + b"\r\n"
            b"GET /204 HTTP/1.1\r\nHost: x\r\n" + XFF + b"\r\n"
            b'GET /304 HTTP/1.1\r\nHost: x\r\nIf-None-Match: "e"\r\n' + XFF + b"\r\n"
            b"GET /204 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + XFF + b"\r\n"
        )
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(data)
            raw, closed = read_until_closed(s)
    assert closed
    # A HEAD answer keeps its announced length; the parser is told the request was HEAD.
    head, rest = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: 1234" in head
    statuses = [r.status for r in parse_responses(rest)]
    assert statuses == [204, 304, 204]
    assert all(r.body == b"" for r in parse_responses(rest))
    assert b"transfer-encoding" not in raw.lower()


def test_connect_timeout_is_504(gateway: GatewayFactory, tmp_path: Path) -> None:
    """An upstream whose accept queue is full drops SYNs: the connect deadline answers, not the first-byte one."""
    with unanswered_port() as port:
        policy = write(
            tmp_path,
            "t.yaml",
            f"version: 1\nupstreams:\n  default: {{url: 'http://127.0.0.1:{port}', timeouts: {{connect: 0.5}}}}\n"
            "rules:\n  - {name: gb, countries: [GB], action: allow}\n",
        )
        gw = gateway("--policy", policy, "--geoip", CITY, *TRUST)
        r = httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": GB}, timeout=20)
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_connect_timeout"


def test_close_delimited_and_truncated_upstream_responses(gateway: GatewayFactory, tmp_path: Path) -> None:
    def serve(conn: socket.socket, _: int) -> None:
        request = read_request(conn)
        if request and b"/whole" in request:
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nhello, until close")
        elif request:
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\nonly this")

    with scripted(serve) as up:
        gw = start(gateway, tmp_path, up.url)
        responses, _ = exchange(gw.port, b"GET /whole HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + XFF + b"\r\n")
        assert responses[0].complete and responses[0].body == b"hello, until close"
        assert responses[0].header("transfer-encoding") == "chunked"  # re-framed for an HTTP/1.1 client
        responses, closed = exchange(gw.port, b"GET /cut HTTP/1.1\r\nHost: x\r\n" + XFF + b"\r\n")
        assert closed and not responses[0].complete  # cut short, and it cannot pass for a whole body
        assert gw.wait_log(2)[-1]["error"] == "upstream_stream_interrupted"


def test_good_request_before_garbage_is_answered_first(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = start(gateway, tmp_path, stub.url)
    responses, closed = exchange(gw.port, b"GET /echo/ok HTTP/1.1\r\nHost: x\r\n" + XFF + b"\r\nGARBAGE\r\n\r\n")
    assert [r.status for r in responses] == [200, 400] and closed
    assert responses[0].json()["path"] == "/echo/ok"
