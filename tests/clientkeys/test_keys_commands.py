"""`regiongate keys` and /admin/keys against real gateways, a keys file and a real Redis.

The token is printed once (alone on stdout), a list never shows a hash, a revoke made by a command reaches a
running gateway within a poll, the admin routes check the token before any body, and no token or hash
reaches /readyz or the gateway's own output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.processes import CITY, POLICIES, Gateway, GatewayFactory, Stub, free_port
from support.redis_server import RedisServer, running

pytestmark = pytest.mark.e2e
TOKEN = "test-admin-token-client-keys"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADMIN_ENV = {"REGIONGATE_ADMIN_TOKEN": TOKEN}
SAFETY = 10.0  # bounds a broken gateway only: every wait below ends when the change is seen
TOKEN_LINE = re.compile(r"rg-[A-Za-z0-9_-]{43}\n")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running(tmp_path_factory.mktemp("redis")) as server:
        yield server


def command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``regiongate keys ...`` as its own process (a few tests: the rest call it in this one, which is quicker)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("REGIONGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "keys", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


@pytest.fixture
def keys(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``regiongate keys ...`` in this process: the same parser and code, without an interpreter's start."""
    from gateway.cli import main

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        with monkeypatch.context() as m:
            for name in [n for n in os.environ if n.startswith("REGIONGATE_")]:
                m.delenv(name)
            for name, value in (env or {}).items():
                m.setenv(name, value)
            capsys.readouterr()
            code = main(["keys", *args])
            out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


Keys = Callable[..., subprocess.CompletedProcess[str]]


def serve(gateway: GatewayFactory, stub: Stub, *args: str, wait: bool = True) -> Gateway:
    return gateway(
        "--upstream",
        stub.url,
        "--policy",
        str(POLICIES / "openai-supported-country-only.yaml"),
        "--geoip",
        CITY,
        *args,
        env=ADMIN_ENV,
        wait=wait,
    )


def listed(gw: Gateway) -> dict[str, dict[str, Any]]:
    r = httpx.get(gw.admin + "/admin/keys", headers=AUTH, timeout=SAFETY)
    assert r.status_code == 200, r.text
    return {k["name"] + ("" if k["state"] == "active" else f"/{k['id']}"): k for k in r.json()["keys"]}


def seen(check: Callable[[], bool], what: str) -> float:
    """Wait until ``check`` holds (the gateway has applied a change); the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > SAFETY:
            raise AssertionError(f"the gateway never applied {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def issued(out: subprocess.CompletedProcess[str]) -> str:
    """The token `keys add` printed: alone on stdout, with the warning on stderr."""
    assert out.returncode == 0, out.stderr
    assert TOKEN_LINE.fullmatch(out.stdout), out.stdout
    assert "shown once and never again" in out.stderr and out.stdout.strip() not in out.stderr
    return out.stdout.strip()


def refused_on_the_head(port: int, path: str, *lines: str) -> bytes:
    """A POST declaring a 100 MB body, of which no byte is sent: the status line the gateway answers."""
    head = "\r\n".join([f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", *lines])
    with socket.create_connection(("127.0.0.1", port), timeout=SAFETY) as s:
        s.sendall((head + f"\r\nContent-Length: {100 * 1024 * 1024}\r\n\r\n").encode())
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
    return out.split(b"\r\n", 1)[0]


def test_keys_through_the_admin_api_and_a_keys_file(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, keys: Keys
) -> None:
    path = tmp_path / "keys.json"
    gw = serve(gateway, stub, "--keys-file", str(path))
    assert f"client keys: 0 active, in file {path}" in gw.stderr()
    ready = httpx.get(gw.admin + "/readyz").json()["client_keys"]
    assert ready == {"backend": "file", "keys": {"active": 0, "expired": 0, "revoked": 0}, "error": None,
                     "path": str(path)}  # fmt: skip

    # The token before any body: a declared 100 MB body without it is refused on the head alone.
    for lines in ([], ["Authorization: Bearer wrong"]):
        assert refused_on_the_head(gw.admin_port, "/admin/keys", *lines).startswith(b"HTTP/1.1 401"), lines
    assert httpx.delete(gw.admin + "/admin/keys/team-a").status_code == 401
    assert httpx.get(gw.admin + "/admin/keys").status_code == 401

    r = httpx.post(gw.admin + "/admin/keys", headers=AUTH, json={"name": "team-a", "expires_in": 3600,
                                                                 "meta": {"owner": "alice"}})  # fmt: skip
    assert r.status_code == 201, r.text
    body = r.json()
    token_a = body["token"]
    assert TOKEN_LINE.fullmatch(token_a + "\n") and "shown once" in body["warning"]
    assert (
        body["key"]["name"] == "team-a"
        and body["key"]["state"] == "active"
        and body["key"]["meta"] == {"owner": "alice"}
    )
    assert body["key"]["expires"] - body["key"]["created"] == pytest.approx(3600, abs=1)
    assert stat_mode(path) == 0o600
    stored = json.loads(path.read_text())
    hash_a = stored["keys"][0]["hash"]
    assert token_a not in path.read_text()

    for bad, status in [
        ({"name": "team-a"}, 409),
        ({"name": "team a"}, 422),
        ({"name": "x", "meta": {"k": "a\nb"}}, 422),
    ]:
        r = httpx.post(gw.admin + "/admin/keys", headers=AUTH, json=bad)
        assert r.status_code == status, (bad, r.text)

    # A command writing the file: the running gateway reads it within a poll.
    token_b = issued(command("add", "--name", "team-b", "--meta", "team=billing", "--keys-file", str(path)))
    took = seen(lambda: "team-b" in listed(gw), "a key added to its file")
    print(f"keys file: a key issued by a command was served after {took * 1000:.0f} ms")

    # Through the admin API: list (no hash, no token), then revoke by name.
    admin = ["--admin-url", gw.admin]
    out = keys("list", *admin, env=ADMIN_ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split() == ["ID", "NAME", "STATE", "CREATED", "EXPIRES", "META"]
    assert "team-a" in out.stdout and "team=billing" in out.stdout
    every = out.stdout + json.dumps(listed(gw)) + httpx.get(gw.admin + "/readyz").text
    for secret in (token_a, token_b, hash_a, stored["secret"]):
        assert secret not in every
    out = keys("revoke", "team-a", *admin, env=ADMIN_ENV)
    assert out.returncode == 0 and "revoked client key ck_" in out.stdout, out.stderr
    assert "team-a" not in listed(gw)  # revoked: listed under its id
    assert keys("revoke", "team-a", *admin, env=ADMIN_ENV).returncode == 1  # no live key has the name now

    # A revoke written to the file by a command: the gateway applies it within a poll.
    (key_b,) = [k for k in listed(gw).values() if k["name"] == "team-b"]
    out = keys("revoke", key_b["id"], "--keys-file", str(path), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["state"] == "revoked", out.stderr
    took = seen(lambda: "team-b" not in listed(gw), "a revoke written to its file")
    print(f"keys file: a revoke by a command was applied after {took * 1000:.0f} ms")
    r = httpx.delete(gw.admin + "/admin/keys/nobody", headers=AUTH)
    assert r.status_code == 404 and r.json() == {"detail": "no key nobody"}
    ready = httpx.get(gw.admin + "/readyz").json()["client_keys"]
    assert ready["keys"] == {"active": 0, "expired": 0, "revoked": 2}
    assert "team-" not in httpx.get(gw.admin + "/readyz").text  # counts only, never a name

    # A file broken by hand: the keys read before keep serving, /readyz says why, nothing writes over it.
    path.write_text("{ not json")
    seen(lambda: bool(httpx.get(gw.admin + "/readyz").json()["client_keys"]["error"]), "a broken file")
    warnings = httpx.get(gw.admin + "/readyz").json()["warnings"]
    assert any("not JSON" in w and "keep serving" in w for w in warnings), warnings
    r = httpx.post(gw.admin + "/admin/keys", headers=AUTH, json={"name": "team-c"})
    assert r.status_code == 503 and "fix the file first" in r.json()["detail"]
    assert path.read_text() == "{ not json" and len(listed(gw)) == 2
    for secret in (token_a, token_b):
        assert secret not in gw.stderr()


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_keys_in_redis_reach_a_running_gateway(
    gateway: GatewayFactory, stub: Stub, redis_server: RedisServer, keys: Keys
) -> None:
    prefix = f"kc{time.monotonic_ns()}:"
    redis = ["--redis", redis_server.url, "--redis-prefix", prefix]
    gw = serve(gateway, stub, *redis)
    assert "client keys: in Redis, shared by every replica" in gw.stderr()

    password = {"REGIONGATE_REDIS_PASSWORD": ""}  # read as the other commands read it: empty is none
    token = issued(command("add", "--name", "team-a", "--expires", "90d", *redis, env=password))
    took = seen(lambda: "team-a" in listed(gw), "a key issued into Redis")
    print(f"redis: a key issued by a command was served after {took * 1000:.0f} ms")
    key = listed(gw)["team-a"]
    assert key["expires"] - key["created"] == pytest.approx(90 * 86400, abs=5)
    hashes = redis_server.command("HVALS", f"{prefix}{{clientkeys}}:data")
    assert token not in hashes and '"hash"' in hashes

    out = keys("add", "--name", "team-a", *redis)
    assert out.returncode == 1 and "already named 'team-a'" in out.stderr and out.stdout == ""
    out = keys("add", "--name", "team-b", "--json", *redis, env={"REGIONGATE_REDIS_URL": "redis://ignored:1/0"})
    assert out.returncode == 0, out.stderr
    added = json.loads(out.stdout)
    assert added["key"]["name"] == "team-b" and TOKEN_LINE.fullmatch(added["token"] + "\n")

    out = keys("list", "--json", *redis)
    rows = json.loads(out.stdout)
    assert [r["name"] for r in rows] == ["team-a", "team-b"] and all("hash" not in r for r in rows)
    assert token not in out.stdout and added["token"] not in out.stdout

    out = keys("revoke", key["id"], *redis)
    assert out.returncode == 0, out.stderr
    took = seen(lambda: "team-a" not in listed(gw), "a revoke written to Redis")
    print(f"redis: a revoke by a command was applied by the gateway after {took * 1000:.0f} ms")
    assert token not in gw.stderr() and added["token"] not in gw.stderr()

    # What goes wrong says so, in one line, without a traceback.
    for args, says in [
        (["list", "--redis", f"redis://127.0.0.1:{free_port()}/0"], "Redis redis://127.0.0.1"),
        (["list", "--redis", "redis://:pw@127.0.0.1:1/0"], "REGIONGATE_REDIS_PASSWORD"),
        (["list"], "give --admin-url"),
        (["add", "--name", "x", "--expires", "soon", *redis], "--expires"),
        (["add", "--name", "x", "--meta", "novalue", *redis], "is not k=v"),
        (["add", "--name", "bad name", *redis], "may hold only"),
        (["list", "--admin-url", gw.admin], "REGIONGATE_ADMIN_TOKEN"),
    ]:
        out = keys(*args)
        assert out.returncode == 1 and says in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
