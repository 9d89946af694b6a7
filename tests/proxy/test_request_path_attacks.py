"""The request path attacked from the wire: paths, methods, headers, bodies, ids, logs.

Each test is written against what an attacker or a broken environment does
(raw sockets, a normalising nginx relay behind the gateway, a log pipe
nobody reads), not against the code's own idea of the request.
"""

from __future__ import annotations

import itertools
import json
import os
import posixpath
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.requestid import RequestIds
from gateway.requestpath import BadPath, canonical
from support.processes import CITY, GatewayFactory, RawUpstream, Stub, free_port, run_nginx, stop, wait_http, write

GB, CN = "2.125.160.216", "175.16.199.1"
TRUST = ["--trusted-proxy", "127.0.0.1/32"]
POLICY = """\
version: 1
defaults: {action: deny, unknown: deny, private: deny, invalid: deny}
rules:
  - {name: no-admin, paths: ["/echo/admin*"], action: deny}
  - {name: gb-embeddings, countries: [GB], paths: ["/v1/embeddings", "/echo/*"], action: allow}
"""


@pytest.fixture
def policy(tmp_path: Path) -> str:
    return write(tmp_path, "policy.yaml", POLICY)


def start(gateway: GatewayFactory, upstream: str, policy: str, *extra: str):  # type: ignore[no-untyped-def]
    return gateway("--policy", policy, "--geoip", CITY, "--upstream", upstream, *TRUST, *extra)


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes, read until the server closes or goes quiet after a full response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return _read_response(s)


def _read_response(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        out += chunk
        head, sep, body = out.partition(b"\r\n\r\n")
        m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        if sep and m and len(body) >= int(m.group(1)):
            break
    return out


def _json_body(response: bytes) -> dict[str, Any]:
    return json.loads(response.partition(b"\r\n\r\n")[2])  # type: ignore[no-any-return]


# --- one canonical path, judged and forwarded -------------------------------------------

REFUSED_PATHS = [
    b"/v1/embeddings%2F..%2Fchat%2Fcompletions",
    b"/v1/embeddings%2f..%2fchat%2fcompletions",
    b"/v1/embeddings/%2e%2e/chat/completions",
    b"/v1/embeddings/%2E%2e/chat/completions",
    b"/v1/embeddings/.%2e/chat/completions",
    b"/v1/embeddings/%2e./chat/completions",
    b"/v1/embeddings/../chat/completions",
    b"/v1/./embeddings",
    b"/v1/embeddings/..",
    b"/v1/embeddings%5C..%5Cchat",
    b"/v1/embeddings%5c..%5cchat",
    b"/v1/embeddings\\..\\chat",
    b"/v1/embeddings%252F..%252Fchat",  # double encoded
    b"/v1/embeddings/%252e%252e/chat",
    b"/v1/embeddings%25252F..",  # triple
    b"/v1/embeddings/..;/chat/completions",  # Tomcat-style path parameter
    b"/v1/embeddings/..;x=1/chat",
    b"/v1/%00/embeddings",
    b"/v1/%0d%0a/embeddings",
    b"/v1/embeddings%",
    b"/v1/embeddings%2",
    b"/v1/embeddings%zz",
    b"v1/embeddings",
    b"/v1/caf\xc3\xa9",
]


@pytest.mark.parametrize("raw", REFUSED_PATHS, ids=lambda r: r.decode("latin-1"))
def test_dangerous_spellings_are_refused(raw: bytes) -> None:
    with pytest.raises(BadPath):
        canonical(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/v1/chat/completions", "/v1/chat/completions"),
        (b"//v1//chat///completions", "/v1/chat/completions"),
        (b"/v1/models/", "/v1/models/"),
        (b"/v1/%63hat/completions", "/v1/chat/completions"),  # unreserved escapes decoded
        (b"/v1/files/a%20b", "/v1/files/a%20B"[:-1] + "b"),  # others kept
        (b"/v1/files/%c3%a9", "/v1/files/%C3%A9"),  # hex upper-cased
        (b"/v1/models/gpt-4.1", "/v1/models/gpt-4.1"),  # dots inside a segment are fine
        (b"/v1/models/...", "/v1/models/..."),
        (b"/v1/a;b", "/v1/a;b"),
    ],
)
def test_canonical_forms(raw: bytes, expected: str) -> None:
    assert canonical(raw) == expected


_PATH_BYTES = st.lists(
    st.sampled_from(
        [b"/", b"//", b".", b"..", b"%2e", b"%2E", b"%2f", b"%2F", b"%5c", b"%25", b"%41", b"%20", b";", b"\\"]
        * 2  # separators and escapes twice as likely as the plain parts below
        + [b"v1", b"chat", b"a", b"-", b"~", b"%zz", b"%"]
    ),
    max_size=12,
).map(lambda parts: b"/" + b"".join(parts))


@settings(max_examples=1500, deadline=None)
@given(_PATH_BYTES)
def test_a_normalising_relay_sees_the_judged_path(raw: bytes) -> None:
    """Whatever is accepted means the same to a relay that decodes and resolves dots (nginx does)."""
    try:
        path = canonical(raw)
    except BadPath:
        return
    assert canonical(path.encode()) == path  # idempotent: judging twice changes nothing
    decoded = urllib.parse.unquote(path)
    resolved = posixpath.normpath(decoded) + ("/" if decoded.endswith("/") and decoded != "/" else "")
    assert resolved == decoded, f"{raw!r} -> {path!r} means {resolved!r} to a normalising relay"
    assert "\\" not in decoded


def normalising_relay(stub_port: int) -> str:
    # proxy_pass with a URI: nginx decodes the path, merges slashes, resolves dot
    # segments and forwards the result, as many real relays do.
    return f"""
    server {{
        listen 127.0.0.1:@PORT@;
        merge_slashes on;
        location / {{ proxy_pass http://127.0.0.1:{stub_port}/; }}
    }}"""


def test_encoded_traversal_cannot_change_the_call_behind_a_normalising_relay(
    gateway: GatewayFactory, stub: Stub, policy: str, tmp_path: Path
) -> None:
    with run_nginx(tmp_path, normalising_relay(stub.port)) as relay:
        gw = start(gateway, f"http://127.0.0.1:{relay}", policy)
        # The relay itself works: an allowed call goes through it.
        ok = httpx.post(gw.url + "/v1/embeddings", json={"input": "a"}, headers={"X-Forwarded-For": GB})
        assert ok.status_code == 200 and ok.json()["object"] == "list"
        before = stub.stats()["requests"]
        for raw in (
            "/v1/embeddings%2F..%2Fchat%2Fcompletions",
            "/v1/embeddings/%2e%2e/chat/completions",
            "/v1/embeddings%252F..%252Fchat%252Fcompletions",
            "/echo/x/%2e%2e/admin",
            "/echo/x%2F..%2Fadmin",
            "/echo/x/..;/admin",
        ):
            r = httpx.post(gw.url + raw, json={"model": "m"}, headers={"X-Forwarded-For": GB})
            assert r.status_code == 400, raw
            assert r.json()["error"]["code"] == "invalid_path"
            assert r.headers["content-type"] == "application/json"
        assert stub.stats()["requests"] == before, "a refused path reached the upstream"
        # A paths deny rule sees the decoded spelling, as the relay will.
        r = httpx.get(gw.url + "/echo/%61dmin", headers={"X-Forwarded-For": GB})
        assert r.status_code == 403
        lines = gw.wait_log(9)
        assert lines[-1]["rule"] == "no-admin" and lines[-1]["path"] == "/echo/admin"
        # An allowed echo arrives at the stub exactly as judged and logged.
        r = httpx.get(gw.url + "//echo//%61bc", headers={"X-Forwarded-For": GB})
        assert r.status_code == 200 and r.json()["path"] == "/echo/abc"
        assert gw.wait_log(10)[-1]["path"] == "/echo/abc"
        bad = [line for line in gw.log_lines() if line["status"] == 400]
        assert len(bad) == 6 and all(line["decision"] == "rejected" for line in bad)
    assert 'regiongate_bad_requests_total{reason="invalid_path"} 6.0' in gw.metrics()


# --- methods ----------------------------------------------------------------------------


def test_trace_and_unlisted_methods_get_a_405(gateway: GatewayFactory, stub: Stub, policy: str) -> None:
    gw = start(gateway, stub.url, policy)
    for method in ("TRACE", "CONNECT", "PUT", "PATCH", "PROPFIND"):
        target = b"127.0.0.1:443" if method == "CONNECT" else b"/echo/x"
        head = method.encode() + b" " + target + b" HTTP/1.1\r\nHost: x\r\n"
        response = raw_request(gw.port, head + b"X-Forwarded-For: " + GB.encode() + b"\r\n\r\n")
        status = response.split(b" ", 2)[1]
        if method == "CONNECT" and status == b"400":
            continue  # llhttp refuses CONNECT's authority form itself; never forwarded either way
        assert status == b"405", (method, response)
        body = _json_body(response)
        assert body["error"]["code"] == "method_not_allowed"
        assert re.search(rb"(?im)^allow: DELETE, GET, HEAD, OPTIONS, POST\r$", response)
    assert stub.stats()["requests"] == 0
    assert httpx.delete(gw.url + "/echo/x", headers={"X-Forwarded-For": GB}).status_code == 200


def test_the_method_list_is_configurable_but_never_trace(
    gateway: GatewayFactory, stub: Stub, policy: str, tmp_path: Path
) -> None:
    gw = start(gateway, stub.url, policy, "--allow-method", "POST", "--allow-method", "put")
    assert httpx.put(gw.url + "/echo/x", headers={"X-Forwarded-For": GB}).status_code == 200
    assert httpx.get(gw.url + "/echo/x", headers={"X-Forwarded-For": GB}).status_code == 405
    for bad in ("TRACE", "connect"):
        proc = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--policy", policy, "--allow-method", bad, "--port", "0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2
        assert f"--allow-method: {bad.upper()} is never allowed" in proc.stderr
        assert "Traceback" not in proc.stderr


# --- address headers --------------------------------------------------------------------


def test_client_written_address_headers_never_reach_the_upstream(
    gateway: GatewayFactory, stub: Stub, policy: str
) -> None:
    gw = start(gateway, stub.url, policy)
    spoofed = {
        "X-Forwarded-For": f"6.6.6.6, {GB}",
        "X-Real-IP": "6.6.6.6",
        "True-Client-IP": "6.6.6.6",
        "CF-Connecting-IP": "6.6.6.6",
        "Fastly-Client-IP": "6.6.6.6",
        "X-Client-IP": "6.6.6.6",
        "X-Cluster-Client-IP": "6.6.6.6",
        "Forwarded": "for=6.6.6.6",
        "X-Original-Forwarded-For": "6.6.6.6",
        "X-Regiongate-Client-IP": "6.6.6.6",
    }
    r = httpx.get(gw.url + "/echo/x", headers=spoofed)
    assert r.status_code == 200
    got = {k.lower(): v for k, v in r.json()["headers"]}
    assert got["x-regiongate-client-ip"] == GB
    # The chain as sent, plus the peer the gateway saw: the usual X-Forwarded-For contract.
    assert got["x-forwarded-for"] == f"6.6.6.6, {GB}, 127.0.0.1"
    leaked = {k: v for k, v in got.items() if "6.6.6.6" in v and k != "x-forwarded-for"}
    assert leaked == {}


# --- Expect -------------------------------------------------------------------------------


def test_expect_100_continue_is_answered_here_and_not_forwarded(
    gateway: GatewayFactory, raw_upstream: RawUpstream, policy: str
) -> None:
    gw = start(gateway, raw_upstream.url, policy)
    body = b'{"input": "a"}'
    with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as s:
        s.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Forwarded-For: " + GB.encode() + b"\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        interim = s.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        response = _read_response(s)
    assert response.startswith(b"HTTP/1.1 200"), response
    sent = raw_upstream.received[0]
    assert b"expect" not in sent.lower()
    assert sent.endswith(b"\r\n\r\n" + body)


# --- a cut upload is not completed upstream ----------------------------------------------


def test_a_chunked_upload_cut_by_the_client_is_aborted_upstream(
    gateway: GatewayFactory, raw_upstream: RawUpstream, policy: str
) -> None:
    gw = start(gateway, raw_upstream.url, policy)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: " + GB.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"a" * 1024 + b"\r\n"
        )
        deadline = time.monotonic() + 10
        while not raw_upstream.received or b"a" * 1024 not in raw_upstream.received[0]:
            assert time.monotonic() < deadline, "the first chunk never reached the upstream"
            time.sleep(0.02)
        s.sendall(b"400\r\n" + b"b" * 100)  # half a chunk, then the client is gone
    deadline = time.monotonic() + 10
    while not raw_upstream.closed[0]:
        assert time.monotonic() < deadline, "the upstream connection was left open"
        time.sleep(0.02)
    assert raw_upstream.complete[0] == 0, "the upstream received a complete (truncated) request"
    assert not raw_upstream.received[0].endswith(b"0\r\n\r\n")
    line = gw.wait_log(1)[-1]
    assert line["status"] == 499 and line["error"] == "client_disconnected"


# --- header bytes -----------------------------------------------------------------------


def test_header_bytes_pass_through_unchanged(gateway: GatewayFactory, raw_upstream: RawUpstream, policy: str) -> None:
    gw = start(gateway, raw_upstream.url, policy)
    utf8 = "Zürich - 東京 ✓".encode()
    response = raw_request(
        gw.port,
        b"GET /echo/x HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: " + GB.encode() + b"\r\nX-Note: " + utf8 + b"\r\n\r\n",
    )
    assert response.startswith(b"HTTP/1.1 200")
    # Names are case-insensitive (and lower-cased on the way); values must be the same bytes.
    assert re.search(rb"\r\n(?i:x-note): " + re.escape(utf8) + rb"\r\n", raw_upstream.received[0])
    # A value that is not UTF-8 (obs-text, latin-1 here) is forwarded byte for byte too.
    response = raw_request(
        gw.port,
        b"GET /echo/y HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: " + GB.encode() + b"\r\nX-Note: caf\xe9\r\n\r\n",
    )
    assert response.startswith(b"HTTP/1.1 200")
    assert re.search(rb"\r\n(?i:x-note): caf\xe9\r\n", raw_upstream.received[-1])


# --- parser-level 400s ------------------------------------------------------------------

MALFORMED = [
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n",
    b"\x00\x01\x02\x03 garbage\r\n\r\n",
    b"GET /\x7f HTTP/1.1\r\n\r\n",
]


def test_malformed_requests_get_openai_shaped_400s_counted_and_logged_sparingly(
    gateway: GatewayFactory, stub: Stub, policy: str
) -> None:
    gw = start(gateway, stub.url, policy)
    for _ in range(20):
        for data in MALFORMED:
            response = raw_request(gw.port, data)
            assert response.startswith(b"HTTP/1.1 400"), (data, response)
            assert re.search(rb"(?im)^content-type: application/json\r$", response)
            error = _json_body(response)["error"]
            assert error["type"] == "invalid_request_error"
    assert stub.stats()["requests"] == 0
    total = sum(
        float(v)
        for v in re.findall(r'^regiongate_bad_requests_total\{reason="[a-z_]+"\} ([0-9.]+)$', gw.metrics(), re.M)
    )
    assert total == 20 * len(MALFORMED)
    stderr = gw.stderr()
    assert "Invalid HTTP request received" not in stderr
    assert len(re.findall("bad request on the proxy port", stderr)) <= 3  # one per reason per minute


def test_an_upgrade_request_is_served_as_plain_http_without_advice(
    gateway: GatewayFactory, stub: Stub, policy: str
) -> None:
    gw = start(gateway, stub.url, policy)
    for _ in range(5):
        response = raw_request(
            gw.port,
            b"GET /echo/x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"X-Forwarded-For: " + GB.encode() + b"\r\n\r\n",
        )
        assert response.startswith(b"HTTP/1.1 200"), response
        headers = {k.lower(): v for k, v in _json_body(response)["headers"]}
        assert "upgrade" not in headers
    assert "pip install" not in gw.stderr() and "WebSocket" not in gw.stderr()


# --- request ids ------------------------------------------------------------------------


def test_request_ids_are_random_64_bit_values(gateway: GatewayFactory, stub: Stub, policy: str) -> None:
    gw = start(gateway, stub.url, policy)
    ids = [httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": CN}).headers["x-request-id"] for _ in range(64)]
    assert all(re.fullmatch(r"rg-[0-9a-f]{16}", i) for i in ids)
    values = [int(i[3:], 16) for i in ids]
    assert len(set(values)) == len(values)
    # A counter (even behind a random prefix) has neighbours that differ in the low bits only.
    assert all(abs(a - b) >= 1 << 32 for a, b in itertools.pairwise(values))


@pytest.mark.e2e
def test_request_ids_differ_between_forked_workers() -> None:
    ids = RequestIds()
    next(ids)  # the parent has drawn its block
    read, write_ = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_, next(ids).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    assert child != next(ids)


# --- addresses in every log field --------------------------------------------------------

_V4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_V6 = re.compile(r"[0-9a-fA-F]{0,4}:[0-9a-fA-F]{0,4}:[0-9a-fA-F:]*")


@pytest.mark.parametrize("mode", ["hashed", "truncated"])
def test_redacted_logs_carry_no_address_anywhere(gateway: GatewayFactory, stub: Stub, policy: str, mode: str) -> None:
    gw = start(gateway, stub.url, policy, "--log-address", mode)
    bad_hops = [
        f"{GB}, 224.0.0.1",
        f"{GB}, 2.125.160.216x",
        f"{GB}, [2001:db8::1]junk",
        f"{GB}, 2001:db8::dead:beef:1:2:3:4:5",
        f"{GB}, ::ffff:2.125.160.216:80:1",
    ]
    for xff in bad_hops:
        assert httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": xff}).status_code == 403
    lines = gw.access_log.read_text() if gw.wait_log(len(bad_hops)) else ""
    records = [json.loads(line) for line in lines.splitlines()]
    assert len(records) == len(bad_hops) and all("client_problem" in r for r in records)
    for raw_line, record in zip(lines.splitlines(), records, strict=True):
        assert not _V4.search(raw_line.replace(record["client"] or "", "")) or mode == "truncated", raw_line
        problem = record["client_problem"]
        assert "2.125.160.216" not in raw_line and "224.0.0.1" not in raw_line and "2001:db8::1" not in problem
        if mode == "hashed":
            assert not _V4.search(problem) and not _V6.search(problem), problem


# --- a stalled log never stalls the gateway ---------------------------------------------


def test_a_stalled_stdout_drops_log_lines_instead_of_freezing(policy: str, stub: Stub, tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGIONGATE_")}
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "gateway", "serve", "--policy", policy, "--geoip", CITY, "--upstream", stub.url,
            "--port", str(port), "--admin-port", str(admin), "--access-log", "-", "--access-log-buffer", "65536",
            *TRUST,
        ],
        stdout=subprocess.PIPE,  # never read: the pipe fills like a blocked log driver's
        stderr=subprocess.DEVNULL,
        env=env,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{admin}/readyz", proc=proc)
        with httpx.Client(timeout=10) as client:
            for i in range(1500):
                xff = GB if i % 2 else CN
                url = f"http://127.0.0.1:{port}/v1/embeddings"
                r = client.post(url, json={"input": "a"}, headers={"X-Forwarded-For": xff})
                assert r.status_code == (200 if xff == GB else 403)
            assert client.get(f"http://127.0.0.1:{admin}/healthz").status_code == 200
            metrics = client.get(f"http://127.0.0.1:{admin}/metrics").text
        dropped = re.search(r"^regiongate_access_log_dropped_total ([0-9.]+)$", metrics, re.M)
        assert dropped is not None and float(dropped.group(1)) > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0  # SIGTERM is still heard with the pipe full
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
        stop(proc)


def test_the_access_log_writes_whole_lines_in_order(gateway: GatewayFactory, stub: Stub, policy: str) -> None:
    gw = start(gateway, stub.url, policy)
    with httpx.Client() as client:
        for i in range(300):
            client.get(gw.url + f"/v1/models?n={i}", headers={"X-Forwarded-For": CN})
    lines = gw.wait_log(300)
    assert len(lines) == 300  # every line parsed as JSON: none torn, none lost
    assert _metric(gw.metrics(), "regiongate_access_log_dropped_total") == 0.0


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_request_ids_and_paths_appear_in_the_log(gateway: GatewayFactory, stub: Stub, policy: str) -> None:
    gw = start(gateway, stub.url, policy)
    r = httpx.get(gw.url + "/v1/%6dodels", headers={"X-Forwarded-For": CN})
    line = gw.wait_log(1)[-1]
    assert line["request_id"] == r.headers["x-request-id"] and line["path"] == "/v1/models"
    assert _metric(gw.metrics(), "regiongate_access_log_dropped_total") == 0.0
    with urllib.request.urlopen(gw.admin + "/readyz", timeout=5) as ready:
        assert ready.status == 200
