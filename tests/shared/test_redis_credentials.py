"""A Redis credential never reaches the command line's echo, stderr, /readyz or an error, in any spelling.

A password in the URL is refused (it shows in the process list), as
``user:password@`` and as a query parameter; and every URL shown is
redacted by one function, so not even the refusal repeats the secret.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.shared.redisconn import RedisConfigError, parse_url, redact
from support.overrides import overrides_gateway, wait_for
from support.processes import GatewayFactory, Stub
from support.redis_server import RedisServer, running

SECRET = "hunter2-Sekret"
CREDENTIAL_URLS = [
    f"redis://127.0.0.1:6379/0?password={SECRET}",
    f"redis://127.0.0.1:6379/0?db=0&password={SECRET}",
    f"redis://127.0.0.1:6379/0?PASSWORD={SECRET}",
    f"redis://127.0.0.1:6379/0?pa%73sword={SECRET}",  # the name escaped
    f"redis://127.0.0.1:6379/0?password=x&password={SECRET}",  # given twice
    f"redis://127.0.0.1:6379/0?auth={SECRET}",
    f"redis://127.0.0.1:6379/0?sentinel_password={SECRET}",
    f"redis://127.0.0.1:6379/0?ssl_keyfile_password={SECRET}",
    f"redis://:{SECRET}@127.0.0.1:6379/0",
    f"redis://user:{SECRET}@127.0.0.1:6379/0",
    f"rediss://user:{SECRET}@cache.internal:6380/0",
    f"rediss://cache.internal:6380/0?password={SECRET}",
    f"redis+sentinel://:{SECRET}@s1:26379,s2:26379/main",
    f"redis+sentinel://s1:26379,s2:26379/main?password={SECRET}",
    f"redis+cluster://n1:7000,n2:7001?password={SECRET}",
    f"unix:///run/redis.sock?db=0&password={SECRET}",
]


@pytest.mark.parametrize("url", CREDENTIAL_URLS)
def test_a_credential_in_the_url_is_refused_without_repeating_it(url: str) -> None:
    with pytest.raises(RedisConfigError) as e:
        parse_url(url)
    assert SECRET not in str(e.value) and "REGIONGATE_REDIS_PASSWORD" in str(e.value)
    assert SECRET not in redact(url)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://h:1/0", "redis://h:1/0"),
        ("redis://gateway@h:1/0", "redis://gateway@h:1/0"),
        ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
        (f"unix:///run/redis.sock?db=2&password={SECRET}", "unix:///run/redis.sock?db=2&password=***"),
        (f"redis://h/0?client_name={SECRET}&db=1", "redis://h/0?client_name=***&db=1"),  # every value but db
        (f"redis://h/0#{SECRET}", "redis://h/0#***"),
        (f"redis://u:{SECRET}@h/0?password={SECRET}", "redis://u:***@h/0?password=***"),
        (f"redis://u:{SECRET}@[::1]:6379/0", "redis://u:***@[::1]:6379/0"),
        ("redis://[bad", "<unparseable URL>"),
    ],
)
def test_redact_hides_every_credential(url: str, shown: str) -> None:
    assert redact(url) == shown


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("REGIONGATE_")}


@pytest.mark.parametrize("url", CREDENTIAL_URLS[:4] + CREDENTIAL_URLS[8:10] + CREDENTIAL_URLS[-1:])
@pytest.mark.parametrize(
    "command",
    [
        ("serve", "--port", "0", "--admin-port", "0", "--redis"),
        ("audit", "tail", "--redis"),
        ("override", "list", "--redis"),
    ],
)
@pytest.mark.e2e
def test_every_command_refuses_it_in_one_line_and_never_prints_it(command: tuple[str, ...], url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", *command, url], capture_output=True, text=True, timeout=60, env=_clean_env()
    )
    assert out.returncode != 0
    assert "REGIONGATE_REDIS_PASSWORD" in out.stderr and "Traceback" not in out.stderr
    assert SECRET not in out.stderr + out.stdout


@pytest.mark.e2e
def test_the_url_from_the_environment_is_refused_the_same() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", "0", "--admin-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_clean_env(), "REGIONGATE_REDIS_URL": CREDENTIAL_URLS[0]},
    )
    assert out.returncode == 2 and "REGIONGATE_REDIS_PASSWORD" in out.stderr and SECRET not in out.stderr


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running(tmp_path_factory.mktemp("redis")) as server:
        yield server


def test_an_accepted_url_is_shown_redacted_in_stderr_and_readyz(
    gateway: GatewayFactory, stub: Stub, redis_server: RedisServer
) -> None:
    """A URL that is accepted (a user name, an option) still never shows a query value: stderr, /readyz."""
    url = f"redis://default@127.0.0.1:{redis_server.port}/0?client_name={SECRET}"
    gw = overrides_gateway(gateway, stub, "--redis", url, "--redis-prefix", f"cred-{time.monotonic_ns()}:")

    def readyz() -> dict[str, Any]:
        return httpx.get(gw.admin + "/readyz", timeout=10).json()  # type: ignore[no-any-return]

    wait_for(lambda: readyz()["overrides"]["up"] is True, 10, "Redis to answer")  # 50 ms calls, a busy machine
    ready = readyz()
    assert ready["overrides"]["url"] == f"redis://default@127.0.0.1:{redis_server.port}/0?client_name=***"
    assert SECRET not in gw.stderr() + json.dumps(ready) + gw.metrics()
