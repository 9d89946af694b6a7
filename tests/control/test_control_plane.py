"""The control plane cannot stall the proxy: what a peer of the admin port can make the process hold.

Raw sockets against a real gateway: a body without the token is refused on
the request head and never read, idle connections cannot use up the
descriptors the proxy port needs, a head is bounded in bytes and in time, an
idle keep-alive connection is closed; and in process, an admin handler that
blocks its whole thread leaves the proxy's event loop turning.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import select
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from gateway.control.gate import MAX_BODY, Gate
from gateway.control.listener import ControlPlane
from support.overrides import AUTH, CN, GB, TOKEN, overrides_gateway, status_of
from support.processes import Gateway, GatewayFactory, Stub

HUNDRED_MB = 100 * 1024 * 1024
CHUNK = 1 << 20
# The socket timeout only bounds a broken gateway; every wait below is for an event (bytes, EOF).
SAFETY = 30


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=SAFETY)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after its answer ends it too)."""
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            out += chunk
    return out


def head(path: str, *lines: str, method: str = "POST", length: int | None = HUNDRED_MB) -> bytes:
    framing = [f"Content-Length: {length}"] if length is not None else ["Transfer-Encoding: chunked"]
    text = "\r\n".join([f"{method} {path} HTTP/1.1", "Host: x", "Content-Type: application/json", *lines, *framing])
    return (text + "\r\n\r\n").encode()


def status_line(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


def send_until_refused(sock: socket.socket, total: int, chunk: bytes) -> tuple[int, bytes]:
    """Send up to ``total`` bytes of ``chunk``s; stop when the server answers or resets. Returns (sent, answer)."""
    sent, answer = 0, b""
    try:
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:  # the server has answered (or closed): it will read no more
                answer = read_until_closed(sock)
                break
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        with contextlib.suppress(OSError):
            answer = read_until_closed(sock)
    return sent, answer


@pytest.fixture
def admin_gw(gateway: GatewayFactory, stub: Stub) -> Gateway:
    return overrides_gateway(gateway, stub)


HEAD_REFUSALS = [
    ("/admin/overrides", [], 401),
    ("/admin/overrides", ["Authorization: Bearer wrong"], 401),
    ("/admin/overrides", [f"Authorization: Basic {TOKEN}"], 401),
    ("/admin/overrides", [f"Authorization: Bearer {TOKEN}x"], 401),
    ("/admin/diff", [], 401),
    ("/admin/reload", [], 401),
    ("/%61dmin/overrides", [], 401),  # decoded, it is what the router would route
    ("//admin/overrides", [], 401),
    ("/ADMIN/overrides", [], 401),
    ("/nothing-here", [], 401),
    # With the token, or on an open path, the declared length alone is refused.
    ("/admin/overrides", [f"Authorization: Bearer {TOKEN}"], 413),
    ("/admin/diff", [f"authorization: bearer {TOKEN}"], 413),
    ("/healthz", [], 413),
    ("/metrics", [], 413),
]


def test_a_body_is_refused_on_the_head_alone(admin_gw: Gateway) -> None:
    """No byte of the body is sent: the answer comes on the head, and the connection closes."""
    for path, lines, status in HEAD_REFUSALS:
        for length in (HUNDRED_MB, None):
            if status == 413 and length is None:
                continue  # a chunked body has no declared length: counted as it streams (below)
            with connect(admin_gw.admin_port) as s:
                s.sendall(head(path, *lines, length=length))
                response = read_until_closed(s)
            assert status_line(response).startswith(f"HTTP/1.1 {status}".encode()), (path, lines, response[:200])
            assert b"connection: close" in response.lower(), response[:300]


def test_without_a_token_configured_every_admin_body_is_refused_unread(gateway: GatewayFactory, stub: Stub) -> None:
    gw = gateway("--upstream", stub.url)
    for lines in ([], [f"Authorization: Bearer {TOKEN}"]):
        with connect(gw.admin_port) as s:
            s.sendall(head("/admin/overrides", *lines))
            assert status_line(read_until_closed(s)).startswith(b"HTTP/1.1 404"), lines


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_100_mb_body_without_the_token_is_not_read_and_the_proxy_serves_meanwhile(
    admin_gw: Gateway, framing: str
) -> None:
    with connect(admin_gw.admin_port) as s:
        s.sendall(head("/admin/overrides", length=HUNDRED_MB if framing == "content-length" else None))
        body = b"x" * CHUNK
        chunk = body if framing == "content-length" else f"{CHUNK:x}\r\n".encode() + body + b"\r\n"
        # The first megabytes are on their way (or already refused): the proxy and the probes answer.
        sent, answer = send_until_refused(s, 8 * CHUNK, chunk)
        assert status_of(admin_gw, GB) == 200
        assert status_of(admin_gw, CN) == 403
        assert httpx.get(admin_gw.admin + "/healthz", timeout=SAFETY).status_code == 200
        if sent >= 8 * CHUNK and not answer:
            more, answer = send_until_refused(s, HUNDRED_MB - sent, chunk)
            sent += more
    assert sent < HUNDRED_MB // 2, "the control plane read the body of a request it refuses"
    assert answer == b"" or status_line(answer).startswith(b"HTTP/1.1 401"), answer[:200]
    assert status_of(admin_gw, GB) == 200


def test_an_authorized_body_is_bounded_as_it_streams(admin_gw: Gateway) -> None:
    """Chunked, with the token: counted as it comes, refused past the bound, and read no further."""
    with connect(admin_gw.admin_port) as s:
        s.sendall(head("/admin/diff", f"Authorization: Bearer {TOKEN}", length=None))
        body = b"#" * (64 * 1024)
        sent, answer = send_until_refused(s, HUNDRED_MB, f"{len(body):x}\r\n".encode() + body + b"\r\n")
    assert sent < HUNDRED_MB // 2
    assert answer == b"" or status_line(answer).startswith(b"HTTP/1.1 413"), answer[:200]
    # At the bound itself the body is accepted (and judged as a policy).
    r = httpx.post(admin_gw.admin + "/admin/diff", content=b"#" * MAX_BODY, headers=AUTH, timeout=SAFETY)
    assert r.status_code == 400, r.text[:200]


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


@pytest.mark.parametrize("opening", [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"], ids=["silent", "half-a-head"])
def test_300_idle_admin_connections_under_256_descriptors_leave_the_proxy_and_healthz_up(
    gateway: GatewayFactory, stub: Stub, opening: bytes
) -> None:
    gw = overrides_gateway(gateway, stub, preexec_fn=_low_nofile)
    idle: list[socket.socket] = []
    try:
        for _ in range(300):
            s = connect(gw.admin_port)
            if opening:
                with contextlib.suppress(OSError):  # evicted already: what matters is what answers next
                    s.sendall(opening)
            idle.append(s)
        assert httpx.get(gw.admin + "/healthz", timeout=SAFETY).status_code == 200
        assert httpx.get(gw.admin + "/readyz", timeout=SAFETY).status_code == 200
        with httpx.Client(timeout=SAFETY) as client:  # the proxy port takes connections and serves them
            for _ in range(20):
                assert client.get(gw.url + "/v1/models", headers={"X-Forwarded-For": GB}).status_code == 200
        assert [status_of(gw, GB) for _ in range(20)] == [200] * 20
        assert gw.proc.poll() is None
    finally:
        for s in idle:
            s.close()


def test_the_control_plane_closes_a_silent_a_slow_and_an_idle_connection(gateway: GatewayFactory, stub: Stub) -> None:
    gw = overrides_gateway(gateway, stub, "--header-timeout", "1", "--idle-timeout", "1")
    with connect(gw.admin_port) as silent, connect(gw.admin_port) as slow, connect(gw.admin_port) as idle:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_until_closed(silent) == b""
        assert read_until_closed(slow) == b""
        answered = read_until_closed(idle)  # the answer, then nothing until the idle timeout closes it
        assert answered.startswith(b"HTTP/1.1 200"), answered
        assert answered.endswith(b'{"status":"ok"}'), answered


@pytest.mark.parametrize(
    "opening, filler",
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ", b"a" * 65536),  # one header that never ends
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-Many: " + b"b" * 1000 + b"\r\n"),  # header after header
        (b"GET /", b"c" * 65536),  # a request line that never ends
    ],
    ids=["long-header", "many-headers", "long-request-line"],
)
def test_a_huge_head_is_refused_before_it_is_all_sent(admin_gw: Gateway, opening: bytes, filler: bytes) -> None:
    with connect(admin_gw.admin_port) as s:
        s.sendall(opening)
        sent, answer = send_until_refused(s, 32 * 1024 * 1024, filler)
    assert sent < 4 * 1024 * 1024, "the control plane held a head of megabytes"
    assert answer == b"" or status_line(answer).startswith(b"HTTP/1.1 400"), answer[:200]
    assert httpx.get(admin_gw.admin + "/healthz", timeout=SAFETY).status_code == 200


def test_a_422_echoes_no_submitted_value(admin_gw: Gateway) -> None:
    """FastAPI's default 422 repeats every input, an API key with it; this one repeats none."""
    secret = "sk-live-0123456789abcdef-secret"
    bodies = [
        {"action": "deny", "api_key": secret, "country": "CN", "reason": "two subjects"},
        {"action": "maybe", "api_key": secret, "reason": "bad action"},
        {"action": "deny", "api_key": secret + "x" * 5000, "reason": "too long"},
        {"action": "deny", "api_key": [secret], "reason": "not a string"},
        {"action": "deny", "api_key": secret, "reason": "extra", "note": secret},
        {"action": "deny", "api_key": secret, "reason": "bad\x1b[31mreason"},
        {"action": "deny", "api_key": secret},
    ]
    for body in bodies:
        r = httpx.post(admin_gw.admin + "/admin/overrides", json=body, headers=AUTH, timeout=SAFETY)
        assert r.status_code == 422, (body, r.text)
        assert secret not in r.text, r.text
        assert "0123456789abcdef" not in r.text
        problems = r.json()["detail"]
        assert problems and all(set(p) == {"type", "loc", "msg"} for p in problems), problems
    raw = httpx.post(
        admin_gw.admin + "/admin/overrides",
        content=b'{"action": "deny", "api_key": "' + secret.encode() + b'", ',
        headers={**AUTH, "content-type": "application/json"},
        timeout=SAFETY,
    )
    assert raw.status_code == 422 and secret not in raw.text, raw.text


# --- in process: a blocked admin thread leaves the proxy's loop turning -------------------


@contextlib.contextmanager
def _serving(app: object) -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    plane = ControlPlane(Gate(app, TOKEN), sock, header_timeout=10, idle_timeout=10, log_level="warning")  # type: ignore[arg-type]
    ended = threading.Event()
    plane.start(ended.set)
    try:
        yield sock.getsockname()[1]
    finally:
        plane.stop()
        ended.wait(SAFETY)


def test_an_admin_handler_that_blocks_its_thread_leaves_the_proxy_loop_serving() -> None:
    """The worst admin call there is (a synchronous wait on the control plane's own loop) delays nothing here."""
    entered, release = threading.Event(), threading.Event()

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        entered.set()
        release.wait(SAFETY)  # blocks the control plane's whole event loop, as a CPU-bound parse would
        headers = [(b"content-length", b"4"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"done"})  # type: ignore[operator]

    async def proxy_side(port: int) -> list[bytes]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        echo_port = server.sockets[0].getsockname()[1]
        admin_call = asyncio.get_running_loop().run_in_executor(None, _slow_admin_call, port)
        await asyncio.to_thread(entered.wait, SAFETY)
        answers = []
        for i in range(50):  # served while the admin call holds its thread
            reader, writer = await asyncio.open_connection("127.0.0.1", echo_port)
            writer.write(f"ping {i}\n".encode())
            answers.append(await reader.readline())
            writer.close()
        release.set()
        answers.append(await admin_call)
        server.close()
        return answers

    with _serving(app) as port:
        answers = asyncio.run(proxy_side(port))
    assert answers[:50] == [f"ping {i}\n".encode() for i in range(50)]
    assert answers[50].endswith(b"done"), answers[50]


def _slow_admin_call(port: int) -> bytes:
    with connect(port) as s:
        s.sendall(f"GET /admin/slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        return read_until_closed(s)


@pytest.mark.parametrize(
    "candidate",
    [
        b"version: 1\nmetadata: " + b"[" * 20000 + b"]" * 20000 + b"\n",  # RecursionError in the parser
        b"version: 1\nmetadata: " + b"{a: " * 20000 + b"1" + b"}" * 20000 + b"\n",
    ],
    ids=["nested-lists", "nested-maps"],
)
def test_a_candidate_the_parser_cannot_hold_is_a_400_and_the_proxy_serves(admin_gw: Gateway, candidate: bytes) -> None:
    r = httpx.post(admin_gw.admin + "/admin/diff", content=candidate, headers=AUTH, timeout=SAFETY)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"] == "candidate policy is invalid"
    assert all(p.startswith("candidate.yaml") for p in r.json()["problems"]), r.json()
    assert status_of(admin_gw, GB) == 200
    assert httpx.get(admin_gw.admin + "/healthz", timeout=SAFETY).status_code == 200
    assert "Traceback" not in admin_gw.stderr()


def test_at_the_cap_the_longest_idle_connection_makes_room_and_with_none_idle_the_newcomer_gets_a_503() -> None:
    from gateway.control.listener import MAX_CONNECTIONS

    release = threading.Event()
    busy = threading.Semaphore(0)

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["path"] == "/admin/busy":
            busy.release()
            await asyncio.to_thread(release.wait, SAFETY)  # in flight, without blocking the loop
        headers = [(b"content-length", b"2"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    request = f"GET /admin/busy HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    with _serving(app) as port:
        idle = [connect(port) for _ in range(MAX_CONNECTIONS)]
        # One more, and the first (idle longest) is closed to make room, then the second, ...
        busy_ones = []
        for i in range(MAX_CONNECTIONS):
            s = connect(port)
            s.sendall(request)
            busy.acquire(timeout=SAFETY)  # its request is in flight
            assert read_until_closed(idle[i]) == b"", i
            busy_ones.append(s)
        # Every connection has a request in flight: a newcomer is refused, and none of them is cut.
        with connect(port) as late:
            assert status_line(read_until_closed(late)) == b"HTTP/1.1 503 Service Unavailable"
        release.set()
        for s in busy_ones:
            assert read_until_closed(s).endswith(b"ok")
            s.close()
        for s in idle:
            s.close()
