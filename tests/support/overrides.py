"""Helpers for override tests: a gateway that admits GB and refuses CN, and the admin calls."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from support.processes import CITY, POLICIES, Gateway, GatewayFactory, Stub

TOKEN = "test-admin-token-overrides"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GB, CN = "2.125.160.216", "175.16.199.1"
COUNTRY_ONLY = str(POLICIES / "openai-supported-country-only.yaml")


def overrides_gateway(
    gateway: GatewayFactory,
    stub: Stub,
    *args: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Gateway:
    return gateway(
        "--upstream",
        stub.url,
        "--policy",
        COUNTRY_ONLY,
        "--geoip",
        CITY,
        "--trusted-proxy",
        "127.0.0.1/32",
        *args,
        env={"REGIONGATE_ADMIN_TOKEN": TOKEN, **(env or {})},
        preexec_fn=preexec_fn,
    )


def status_of(gw: Gateway, ip: str, token: str | None = None, timeout: float = 10) -> int:
    headers = {"X-Forwarded-For": ip}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.get(gw.url + "/v1/models", headers=headers, timeout=timeout).status_code


def add(gw: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(gw.admin + "/admin/overrides", json=body, headers=AUTH, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def remove(gw: Gateway, id: str) -> None:
    r = httpx.delete(gw.admin + f"/admin/overrides/{id}", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text


def list_ids(gw: Gateway) -> list[str]:
    r = httpx.get(gw.admin + "/admin/overrides", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return [o["id"] for o in r.json()["overrides"]]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def limited_policy(requests: int, by: str = "ip", on_error: str = "open", per: str = "1h") -> str:
    """GB and SE let through under a shared rate limit; everything else refused."""
    return f"""version: 1
redis: {{on_error: {on_error}}}
rules:
  - name: limited
    countries: [GB, SE]
    action: allow
    rate_limit: {{requests: {requests}, per: {per}, by: {by}}}
"""


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("REGIONGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "override", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )
