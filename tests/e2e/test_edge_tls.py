"""TLS on the proxy port, against the real gateway process and a local CA made in the test.

The real ``openai`` SDK gets a completion through it; only TLS 1.2+ with
modern suites is offered, ALPN says ``http/1.1``; certificate files swapped
the way the kubelet swaps a Secret reach new connections while an open one
keeps working, and a bad new pair is refused, counted and survived.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import signal
import socket
import ssl
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import httpx
import openai
import pytest

from support.edge import Leaf, LocalCA, SecretDir, client_context, tls_connect
from support.processes import Gateway, GatewayFactory, Stub


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA(tmp_path_factory.mktemp("ca"))


def tls_gateway(gateway: GatewayFactory, stub: Stub, cert: Path, key: Path, *extra: str) -> Gateway:
    return gateway("--upstream", stub.url, "--tls-cert", str(cert), "--tls-key", str(key), *extra)


def https(gw: Gateway) -> str:
    return f"https://127.0.0.1:{gw.port}"


def metric(gw: Gateway, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in gw.metrics().splitlines():
        m = re.match(rf"{name}(?:{{(.*)}})? (\S+)$", line)
        if m and (m.group(1) or "") == want:
            return float(m.group(2))
    return 0.0


def wait_metric(gw: Gateway, name: str, value: float, **labels: str) -> None:
    """The gateway checks its certificate files once a second: wait for it to report the reload."""
    deadline = time.monotonic() + 15
    while metric(gw, name, **labels) < value:
        assert time.monotonic() < deadline, f"{name}{labels} never reached {value}:\n{gw.stderr()}"
        time.sleep(0.1)


def get(conn: http.client.HTTPSConnection, path: str = "/v1/models") -> int:
    conn.request("GET", path)
    r = conn.getresponse()
    r.read()
    return r.status


def legacy_client(ca: LocalCA, version: str) -> ssl.SSLContext:
    ctx = client_context(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


def permissive_server_accepts(leaf: Leaf, client: ssl.SSLContext) -> tuple[str | None, str | None]:
    """The TLS version and suite a server that allows everything agrees on with ``client`` (the control)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.TLSv1
    server.set_ciphers("ALL:@SECLEVEL=0")
    server.load_cert_chain(leaf.cert, leaf.key)
    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]

        def accept() -> None:
            conn, _ = listening.accept()
            with contextlib.suppress(OSError), server.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        with tls_connect(port, client) as s:
            agreed = s.version(), (s.cipher() or ("",))[0]
        thread.join(10)
    return agreed


def test_openai_sdk_completion_over_tls(gateway: GatewayFactory, stub: Stub, ca: LocalCA) -> None:
    leaf = ca.leaf("sdk", 1001)
    gw = tls_gateway(gateway, stub, leaf.cert, leaf.key)
    assert f"proxy on https://127.0.0.1:{gw.port}" in gw.stderr()
    with httpx.Client(verify=client_context(ca)) as http:
        client = openai.OpenAI(base_url=https(gw) + "/v1", api_key="sk-client", http_client=http, max_retries=0)  # type: ignore[arg-type]  # openai 3 types its own httpx fork (httpx2); httpx.Client works
        r = client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
    assert r.model == "gpt-x" and "Regiongate stub" in (r.choices[0].message.content or "")
    log = gw.wait_log(1)[0]
    assert (log["status"], log["client"], log["client_via"]) == (200, "127.0.0.1", "peer")
    # A client that does not trust the CA is refused by its own check: the certificate is the CA's leaf.
    with httpx.Client() as untrusting, pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusting.get(https(gw) + "/v1/models")


def test_modern_tls_only_and_alpn_http11(gateway: GatewayFactory, stub: Stub, ca: LocalCA) -> None:
    leaf = ca.leaf("modern", 1002)
    gw = tls_gateway(gateway, stub, leaf.cert, leaf.key)

    with tls_connect(gw.port, client_context(ca)) as s:
        assert s.version() == "TLSv1.3"
        assert s.selected_alpn_protocol() == "http/1.1"
    tls12 = client_context(ca)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with tls_connect(gw.port, tls12) as s:
        assert s.version() == "TLSv1.2"
        cipher = s.cipher()
        assert cipher is not None
        assert cipher[0].startswith("ECDHE-") and ("GCM" in cipher[0] or "CHACHA20" in cipher[0])
        assert s.compression() is None
    # A client offering h2 and http/1.1 gets http/1.1; one offering only h2 gets no ALPN at all.
    both = client_context(ca)
    both.set_alpn_protocols(["h2", "http/1.1"])
    with tls_connect(gw.port, both) as s:
        assert s.selected_alpn_protocol() == "http/1.1"

    for old in ("TLSv1", "TLSv1_1"):
        legacy = legacy_client(ca, old)
        assert permissive_server_accepts(leaf, legacy)[0] == old.replace("_", ".")  # the client really offers it
        with pytest.raises(ssl.SSLError) as e:
            tls_connect(gw.port, legacy)
        # The gateway refuses its hello: an alert, or the connection closed on it.
        assert e.value.reason in ("TLSV1_ALERT_PROTOCOL_VERSION", "UNEXPECTED_EOF_WHILE_READING"), e.value
    weak = client_context(ca)
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0")  # CBC with SHA-1 MACs: not an AEAD suite
    assert permissive_server_accepts(leaf, weak) == ("TLSv1.2", "ECDHE-ECDSA-AES128-SHA")
    with pytest.raises(ssl.SSLError) as e:
        tls_connect(gw.port, weak)
    assert e.value.reason in ("SSLV3_ALERT_HANDSHAKE_FAILURE", "UNEXPECTED_EOF_WHILE_READING"), e.value
    # Plain HTTP on the TLS port is not served.
    with pytest.raises(httpx.HTTPError):
        httpx.get(gw.url + "/v1/models", timeout=5)
    assert gw.proc.poll() is None


def test_rotation_keeps_open_connections_and_serves_the_new_certificate(
    gateway: GatewayFactory, stub: Stub, ca: LocalCA, tmp_path: Path
) -> None:
    first, second, third = ca.leaf("gen1", 2001), ca.leaf("gen2", 2002), ca.leaf("gen3", 2003)
    secret = SecretDir(tmp_path / "secret")
    secret.publish_leaf(first)
    gw = tls_gateway(gateway, stub, secret.cert, secret.key)
    ctx = client_context(ca)

    kept = http.client.HTTPSConnection("127.0.0.1", gw.port, context=ctx, timeout=10)
    assert get(kept) == 200
    assert kept.sock is not None
    kept_sock = kept.sock
    assert kept_sock.getpeercert(True) == first.der()

    secret.publish_leaf(second)  # the kubelet's ..data swap
    wait_metric(gw, "regiongate_tls_reloads_total", 1, result="ok")
    assert get(kept) == 200 and kept.sock is kept_sock  # the same connection, still on its handshake
    assert kept_sock.getpeercert(True) == first.der()
    with tls_connect(gw.port, ctx) as s:
        assert s.getpeercert(True) == second.der()
    with httpx.Client(verify=client_context(ca)) as client:
        assert client.get(https(gw) + "/v1/models").status_code == 200

    # A key that does not belong to the certificate: refused, counted, and the old pair serves on.
    secret.publish(third.cert.read_bytes(), first.key.read_bytes())
    wait_metric(gw, "regiongate_tls_reloads_total", 1, result="refused")
    with tls_connect(gw.port, ctx) as s:
        assert s.getpeercert(True) == second.der()
    assert "TLS certificate reload refused" in gw.stderr()
    with urllib.request.urlopen(gw.admin + "/readyz", timeout=5) as r:
        assert "the key does not match the certificate" in r.read().decode()
    # Half written: a certificate cut in the middle. Refused as well.
    secret.publish(third.cert.read_bytes()[:200], third.key.read_bytes())
    wait_metric(gw, "regiongate_tls_reloads_total", 2, result="refused")
    # Then the good pair arrives, and new handshakes get it.
    secret.publish_leaf(third)
    wait_metric(gw, "regiongate_tls_reloads_total", 2, result="ok")
    with tls_connect(gw.port, ctx) as s:
        assert s.getpeercert(True) == third.der()
    assert get(kept) == 200 and kept_sock.getpeercert(True) == first.der()
    kept.close()
    with urllib.request.urlopen(gw.admin + "/readyz", timeout=5) as r:
        assert "TLS certificate reload refused" not in r.read().decode()


def test_rotation_by_copying_files_in_place(gateway: GatewayFactory, stub: Stub, ca: LocalCA, tmp_path: Path) -> None:
    """Not every mount is a Secret: files rewritten in place (cp, an editor) are picked up too."""
    first, second = ca.leaf("copy1", 3001), ca.leaf("copy2", 3002)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    gw = tls_gateway(gateway, stub, cert, key, "--workers", "2")
    cert.write_bytes(second.cert.read_bytes())
    key.write_bytes(second.key.read_bytes())
    wait_metric(gw, "regiongate_tls_reloads_total", 2, result="ok")  # each worker loads it
    for _ in range(4):  # whichever worker accepts
        with tls_connect(gw.port, client_context(ca)) as s:
            assert s.getpeercert(True) == second.der()


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("missing cert", "--tls-cert {missing}: cannot read it: No such file or directory"),
        ("missing key", "--tls-key {missing}: cannot read it: No such file or directory"),
        ("mismatch", "the key does not match the certificate"),
        ("not pem", "not a PEM certificate chain and private key"),
        ("empty", "the file is empty"),
        ("cert only", "--tls-cert needs --tls-key too"),
        ("key only", "--tls-key needs --tls-cert too"),
    ],
)
def test_bad_files_stop_the_start_in_one_line(
    gateway: GatewayFactory, stub: Stub, ca: LocalCA, tmp_path: Path, problem: str, message: str
) -> None:
    a, b = ca.leaf("a", 4001), ca.leaf("b", 4002)
    missing = str(tmp_path / "nope.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    args = {
        "missing cert": ["--tls-cert", missing, "--tls-key", str(a.key)],
        "missing key": ["--tls-cert", str(a.cert), "--tls-key", missing],
        "mismatch": ["--tls-cert", str(a.cert), "--tls-key", str(b.key)],
        "not pem": ["--tls-cert", str(junk), "--tls-key", str(a.key)],
        "empty": ["--tls-cert", str(empty), "--tls-key", str(a.key)],
        "cert only": ["--tls-cert", str(a.cert)],
        "key only": ["--tls-key", str(a.key)],
    }[problem]
    gw = gateway("--upstream", stub.url, *args, wait=False)
    assert gw.proc.wait(timeout=30) != 0
    err = gw.stderr().strip().splitlines()
    assert len(err) == 1, err
    assert message.format(missing=missing) in err[0]
    assert "Traceback" not in gw.stderr()


def test_env_variables_configure_tls(gateway: GatewayFactory, stub: Stub, ca: LocalCA) -> None:
    leaf = ca.leaf("env", 5001)
    gw = gateway(
        "--upstream", stub.url, env={"REGIONGATE_TLS_CERT": str(leaf.cert), "REGIONGATE_TLS_KEY": str(leaf.key)}
    )
    with tls_connect(gw.port, client_context(ca)) as s:
        assert s.getpeercert(True) == leaf.der()


def test_shutdown_does_not_wait_for_a_tls_client_that_never_answers_close_notify(
    gateway: GatewayFactory, stub: Stub, ca: LocalCA
) -> None:
    """Closing a TLS connection waits for the client's close_notify a bounded while (5 s), within the drain's grace."""
    leaf = ca.leaf("drain", 6001)
    gw = tls_gateway(gateway, stub, leaf.cert, leaf.key)
    with tls_connect(gw.port, client_context(ca)) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200 ")
        gw.wait_log(1)
        gw.proc.send_signal(signal.SIGTERM)  # the connection is idle: closed at once; the client never reads again
        assert gw.proc.wait(timeout=30) == 0
    assert "still busy" not in gw.stderr()


@pytest.mark.parametrize("proxy_protocol", [False, True], ids=["tls", "tls+proxy-protocol"])
def test_connections_still_in_their_handshake_count_against_the_cap(
    gateway: GatewayFactory, stub: Stub, ca: LocalCA, proxy_protocol: bool
) -> None:
    """A handshake (or a PROXY header) not yet done holds a descriptor: past the cap, a new connection is closed."""
    leaf = ca.leaf("cap", 7001)
    extra = ("--proxy-protocol-from", "127.0.0.1/32") if proxy_protocol else ()
    # The header timeout is far away: a connection closed now is closed by the cap.
    gw = tls_gateway(gateway, stub, leaf.cert, leaf.key, "--max-connections", "2", "--header-timeout", "120", *extra)
    silent = [socket.create_connection(("127.0.0.1", gw.port), timeout=15) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=15) as third:
            try:
                got = third.recv(1)
            except ConnectionResetError:  # closed with a reset: nothing was read from it
                got = b""
            assert got == b""
    finally:
        for s in silent:
            s.close()
    deadline = time.monotonic() + 15  # until the gateway has seen the two silent ones go
    while True:
        try:
            with socket.create_connection(("127.0.0.1", gw.port), timeout=15) as raw:
                if proxy_protocol:
                    raw.sendall(b"PROXY TCP4 127.0.0.66 127.0.0.1 1 2\r\n")
                with client_context(ca).wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    assert s.recv(100).startswith(b"HTTP/1.1 200 ")
                    break
        except (ssl.SSLError, ConnectionResetError):
            assert time.monotonic() < deadline
            time.sleep(0.05)
