"""A real nginx in front, appending to ``Forwarded``: the client can never choose its own address.

nginx plays a trusted front proxy that appends its element to whatever
``Forwarded`` the client sent (RFC 7239 §4 allows it, and it is how nginx's
own documentation builds the header). Which address nginx appends is set by
the test through nginx's realip module (``X-Test-Client``), so that the test
client on loopback can play a caller in China or in Great Britain. The
gateway trusts only nginx (127.0.0.1) and reads ``Forwarded``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.processes import CITY, GatewayFactory, Stub, free_port, stop, write

GB, CN = "2.125.160.216", "175.16.199.1"
POLICY = """\
version: 1
defaults: {action: deny, unknown: deny, private: deny, invalid: deny, missing: deny}
rules:
  - {name: supported, countries: [GB, SE, US], action: allow}
"""

# Two ways operators append: the naive one (", for=..." when the client sent nothing) and
# the one with a map that leaves out the separator. Both must hold.
APPEND = {
    "naive": 'proxy_set_header Forwarded "$http_forwarded, for=$remote_addr";',
    "map": 'proxy_set_header Forwarded "${forwarded_prefix}for=$remote_addr";',
}

CONF = """\
worker_processes 1;
daemon off;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log warn;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path @PREFIX@/client_body;
    proxy_temp_path @PREFIX@/proxy;
    fastcgi_temp_path @PREFIX@/fastcgi;
    uwsgi_temp_path @PREFIX@/uwsgi;
    scgi_temp_path @PREFIX@/scgi;

    # The test client says which caller it plays; nginx believes it from loopback only.
    set_real_ip_from 127.0.0.1;
    real_ip_header X-Test-Client;

    map $http_forwarded $forwarded_prefix {
        ""      "";
        default "$http_forwarded, ";
    }

    server {
        listen 127.0.0.1:@PORT@;
        location / {
            proxy_pass http://127.0.0.1:@UPSTREAM@;
            @APPEND@
            proxy_set_header X-Test-Client "";
        }
    }
}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if found is None:
        pytest.fail("nginx not found (Debian: apt-get install nginx; scripts/test installs it)")
    return found


@contextlib.contextmanager
def run_nginx(tmp_path: Path, upstream_port: int, append: str) -> Iterator[int]:
    prefix = tmp_path / f"nginx-{append}"
    prefix.mkdir()
    port = free_port()
    conf = CONF
    for name, value in {
        "PREFIX": str(prefix),
        "PORT": str(port),
        "UPSTREAM": str(upstream_port),
        "APPEND": APPEND[append],
    }.items():
        conf = conf.replace(f"@{name}@", value)
    (prefix / "nginx.conf").write_text(conf)
    console = prefix / "console.log"
    with open(console, "wb") as out:
        proc = subprocess.Popen(
            [nginx_binary(), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {proc.returncode}: {console.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"nginx did not listen: {console.read_text()}")
            time.sleep(0.05)
        yield port
    finally:
        stop(proc)


def get(port: int, caller: str, forwarded: list[bytes]) -> int:
    """GET /v1/models through nginx as ``caller``, with exactly these Forwarded lines; the status."""
    head = b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\nX-Test-Client: %s\r\n" % caller.encode()
    head += b"".join(b"Forwarded: " + line + b"\r\n" for line in forwarded)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + b"\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


# What a caller in China writes to be judged as Great Britain.
ATTACKS = [
    b'for=2.125.160.216;x="',  # the reproduction: an unterminated quoted-string
    b'for=2.125.160.216;x="\\',  # a trailing backslash inside quotes
    b'for=2.125.160.216;x="\\"',  # an escaped quote that does not close
    b'for="2.125.160.216',
    b"for=2.125.160.216;x",  # a name without '=' that would take the ',' as its end
    b"for=2.125.160.216;x=",
    b"for=2.125.160.216;for=",
    b'for=2.125.160.216;x="a"b',
    b"for=2.125.160.216;for=2.125.160.216",
]
# Well-formed fields: the client's own elements are simply left of nginx's.
HARMLESS = [
    b"for=2.125.160.216",
    b"for=2.125.160.216, for=2.125.160.216",
    b'for=2.125.160.216;x="a,b;c"',
    b"for=2.125.160.216,",
    b"for=unknown",
]


@pytest.fixture
def gateway_behind_nginx(gateway: GatewayFactory, stub: Stub, tmp_path: Path):  # type: ignore[no-untyped-def]
    policy = write(tmp_path, "p.yaml", POLICY)
    return gateway(
        "--policy", policy, "--geoip", CITY, "--upstream", stub.url,
        "--trusted-proxy", "127.0.0.1/32", "--client-ip-header", "Forwarded",
    )  # fmt: skip


@pytest.mark.parametrize("append", sorted(APPEND))
def test_client_behind_nginx_cannot_choose_its_address(gateway_behind_nginx, tmp_path: Path, append: str) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_behind_nginx
    with run_nginx(tmp_path, gw.port, append) as port:
        # The baseline: through nginx, a GB caller is allowed and a CN caller refused.
        assert get(port, GB, []) == 200
        assert get(port, CN, []) == 403
        for attack in ATTACKS:
            assert get(port, CN, [attack]) == 403, attack
        for field in HARMLESS:
            assert get(port, CN, [field]) == 403, field
        # And the other way round: a GB caller writing CN is still judged as GB.
        assert get(port, GB, [f"for={CN}".encode()]) == 200
    sent = 2 + len(ATTACKS) + len(HARMLESS) + 1
    lines = gw.wait_log(sent)
    assert len(lines) == sent
    baseline, attacks, harmless = lines[:2], lines[2 : 2 + len(ATTACKS)], lines[2 + len(ATTACKS) : -1]
    assert [(entry["country"], entry["rule"]) for entry in baseline] == [("GB", "supported"), ("CN", "defaults.action")]
    for entry in attacks:  # an unreadable field: refused as invalid, never judged as GB
        assert entry["rule"] == "defaults.invalid" and entry["country"] is None, entry
        assert "malformed Forwarded" in str(entry["client_problem"])
    for entry in harmless:  # a readable field: the address nginx appended
        assert (entry["client"], entry["country"], entry["rule"]) == (CN, "CN", "defaults.action"), entry
    assert (lines[-1]["client"], lines[-1]["country"]) == (GB, "GB")
    assert not any(entry["country"] == "GB" for entry in attacks + harmless)
