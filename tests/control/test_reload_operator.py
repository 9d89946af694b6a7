"""Reloading the right gateway, and the words an operator reads: --pid-file, --no-watch, stub's busy port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support.live import TRUST, ask, policy, tag, wait_until
from support.processes import CITY, GatewayFactory, Stub, stop


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_through_the_pid_file_reloads_this_gateway_only(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, workers: str
) -> None:
    """Two gateways on one host: the pid file names the one to reload (pgrep -o would pick the oldest)."""
    path, other_path = tmp_path / "policy.yaml", tmp_path / "other.yaml"
    path.write_text(policy("allow", "first"))
    other_path.write_text(policy("allow", "first"))
    other = gateway("--policy", str(other_path), "--geoip", CITY, "--upstream", stub.url, *TRUST, "--no-watch")
    pid_file = tmp_path / "run" / "regiongate.pid"
    pid_file.parent.mkdir()
    args = ("--policy", str(path), "--geoip", CITY, "--upstream", stub.url, *TRUST, "--no-watch")
    gw = gateway(*args, "--pid-file", str(pid_file), "--workers", workers)
    assert pid_file.read_text() == f"{gw.proc.pid}\n"  # the supervising parent: it passes SIGHUP to every worker
    assert f"(pid {gw.proc.pid} in {pid_file})" in gw.stderr()

    edited = policy("deny", "second")
    path.write_text(edited)
    other_path.write_text(edited)
    os.kill(int(pid_file.read_text()), signal.SIGHUP)
    wait_until(lambda: all(ask(gw.url) == (403, tag(edited)) for _ in range(8)), "the edit serving")
    assert ask(other.url) == (200, tag(policy("allow", "first")))  # the other gateway was not signalled

    stop(gw.proc)
    assert gw.proc.returncode == 0
    assert not pid_file.exists()


def test_a_pid_file_that_cannot_be_written_stops_startup_in_one_line(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path
) -> None:
    gw = gateway("--upstream", stub.url, "--pid-file", str(tmp_path / "no-such-dir" / "gw.pid"), wait=False)
    assert gw.proc.wait(timeout=60) == 2
    err = gw.stderr()
    assert f"regiongate: cannot start: --pid-file {tmp_path}/no-such-dir/gw.pid: No such file or directory" in err
    assert "Traceback" not in err


def test_no_watch_announces_only_the_reloads_it_does(gateway: GatewayFactory, stub: Stub) -> None:
    watched = gateway("--upstream", stub.url)
    assert "reloads on change, SIGHUP, POST /admin/reload" in watched.stderr()
    unwatched = gateway("--upstream", stub.url, "--no-watch")
    err = unwatched.stderr()
    assert "reloads on SIGHUP, POST /admin/reload" in err
    assert "on change" not in err


@pytest.mark.e2e
def test_stub_on_a_busy_port_says_so_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "stub", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"regiongate: cannot start: cannot listen on 127.0.0.1:{port} for the stub upstream (--host/--port): "
        "address already in use: another process listens there (an earlier regiongate?); "
        "stop it or choose another port"
    ]
