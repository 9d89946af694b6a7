"""Configuration mistakes at ``serve``: one line each, exit 2, and never the secret.

Every case runs the real ``python -m gateway serve`` and reads everything it
printed, because a secret must not appear in any of it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.processes import free_port, write

SECRET = "hunter2-s3cr3t"


def serve(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``serve`` on free ports; return (exit status, stdout, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("REGIONGATE_")}
    full_env.update(env or {})
    argv = [sys.executable, "-m", "gateway", "serve", "--access-log", "off"]
    if "--port" not in args and "REGIONGATE_PORT" not in full_env:
        argv += ["--port", str(free_port())]
    if "--admin-port" not in args and "REGIONGATE_ADMIN_PORT" not in full_env:
        argv += ["--admin-port", str(free_port())]
    # A mistake must stop it at once; a gateway that started anyway is cut off here.
    r = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=30, env=full_env)
    return r.returncode, r.stdout, r.stderr


def assert_one_line_error(status: int, out: str, err: str, *expected: str) -> str:
    assert status == 2, err
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in err
    assert lines[0].startswith("regiongate"), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--upstream", f"http://user:{SECRET}@example.com"], {}, ["--upstream", "credentials", "api_key_env"]),
        (["--upstream", f"https://:{SECRET}@example.com/v1"], {}, ["--upstream", "credentials"]),
        (["--upstream", f"http://{SECRET}@example.com"], {}, ["--upstream", "credentials"]),
        ([], {"REGIONGATE_UPSTREAM": f"https://key:{SECRET}@example.com"}, ["REGIONGATE_UPSTREAM", "credentials"]),
        (["--upstream", f"http://example.com/?key={SECRET}"], {}, ["--upstream", "query"]),
        (["--upstream", f"ftp://{SECRET}.example"], {}, ["--upstream", "http://"]),
        (["--log-key", SECRET, "--workers", "0"], {}, ["--workers", "1 or more"]),
        ([], {"REGIONGATE_LOG_KEY": SECRET, "REGIONGATE_PORT": "eighty"}, ["REGIONGATE_PORT", "whole number"]),
        (["--log-key", SECRET, "--port", "70000"], {}, ["--port", "65535 or less"]),
        ([], {"REGIONGATE_WORKERS": "-3"}, ["REGIONGATE_WORKERS", "1 or more"]),
        ([], {"REGIONGATE_LOG_LEVEL": "loud"}, ["REGIONGATE_LOG_LEVEL", "'debug'"]),
        (["--log-level", "loud"], {}, ["--log-level", "--help"]),
        (["--log-key", SECRET, "--trusted-proxy", "10.0.0.1/8"], {}, ["--trusted-proxy"]),
    ],
)
@pytest.mark.e2e
def test_flag_and_variable_errors_are_one_line_without_secrets(
    args: list[str], env: dict[str, str], expected: list[str]
) -> None:
    status, out, err = serve(*args, env=env)
    assert_one_line_error(status, out, err, *expected)
    assert SECRET not in out + err


@pytest.mark.e2e
def test_policy_upstream_with_credentials_names_file_and_line_not_the_password(tmp_path: Path) -> None:
    policy = write(
        tmp_path,
        "p.yaml",
        f"version: 1\nupstreams:\n  default:\n    url: 'http://admin:{SECRET}@127.0.0.1:9'\n",
    )
    status, out, err = serve("--policy", policy)
    line = assert_one_line_error(status, out, err, f"{policy}:4:", "upstreams.default.url", "api_key_env")
    assert SECRET not in out + err and "admin" not in line


@pytest.mark.e2e
def test_upstream_key_from_the_environment_is_never_printed(tmp_path: Path) -> None:
    policy = write(
        tmp_path,
        "p.yaml",
        "version: 1\nupstreams:\n  default: {url: 'http://127.0.0.1:9', api_key_env: UPSTREAM_KEY}\n",
    )
    status, out, err = serve("--policy", policy, "--port", "70000", env={"UPSTREAM_KEY": SECRET})
    assert_one_line_error(status, out, err, "--port")
    assert SECRET not in out + err


@pytest.mark.e2e
def test_help_never_shows_a_variable_value() -> None:
    env = {**os.environ, "REGIONGATE_LOG_KEY": SECRET, "REGIONGATE_UPSTREAM": f"http://u:{SECRET}@h"}
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--help"], capture_output=True, text=True, timeout=30, env=env
    )
    assert r.returncode == 0 and "REGIONGATE_LOG_KEY" in r.stdout
    assert SECRET not in r.stdout + r.stderr


# --- listening ----------------------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other process is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.e2e
def test_proxy_port_in_use_says_which_address_and_which_listener(taken_port: int) -> None:
    status, out, err = serve("--port", str(taken_port))
    assert_one_line_error(
        status, out, err, f"127.0.0.1:{taken_port}", "proxy (--host/--port)", "already in use", "cannot start"
    )


@pytest.mark.e2e
def test_admin_port_in_use_says_it_is_the_control_plane(taken_port: int) -> None:
    status, out, err = serve("--admin-port", str(taken_port))
    assert_one_line_error(
        status, out, err, f"127.0.0.1:{taken_port}", "control plane (--admin-host/--admin-port)", "already in use"
    )


@pytest.mark.e2e
def test_same_port_for_both_listeners() -> None:
    port = str(free_port())
    status, out, err = serve("--port", port, "--admin-port", port)
    assert_one_line_error(status, out, err, f"127.0.0.1:{port}", "--port and --admin-port")


@pytest.mark.e2e
def test_address_not_on_this_machine() -> None:
    status, out, err = serve("--host", "192.0.2.1")  # TEST-NET-1: never a local address
    assert_one_line_error(status, out, err, "192.0.2.1:", "proxy", "no such address on this machine")


@pytest.mark.e2e
def test_ipv6_address_is_written_with_brackets() -> None:
    status, out, err = serve("--admin-host", "2001:db8::1")  # documentation range: never local
    assert_one_line_error(status, out, err, "[2001:db8::1]:", "control plane")
