"""The servers wrk drives: the bare upstream (nginx), the gateway in its configurations, and
nginx+geoip2; each checked once with every address of the rotation before it is measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import (
    ALLOWED_ADDRS,
    ANONYMOUS_DB,
    ASN_DB,
    CHAT_PATH,
    CITY_DB,
    GEOIP2_TEMPLATE,
    POLICY,
    RATELIMIT_POLICY,
    REFUSED_ADDRS,
    ROTATION,
    ROUTE_POLICY,
    SHADOW_POLICY,
    TOKENS_POLICY,
    UPSTREAM_BODY,
    UPSTREAM_TEMPLATE,
    BenchError,
    log,
)
from .policy import BenchPolicy
from .processes import Pinning, Tools, ask_nginx_contract, free_port, http, post_chat, spawn, stop, wait_ready


@dataclass(frozen=True)
class Target:
    """A server wrk drives."""

    key: str
    label: str
    url: str
    pid: int
    refuses: bool  # whether it must refuse the CN address
    also: tuple[int, ...] = ()  # other processes whose CPU a request costs (a decision service behind a proxy)
    decision_only: bool = False  # the decision service's /authz/nginx itself: 200 empty, or 403 + the body header
    admin: str | None = None  # a gateway's control plane (its /metrics)


def render(template: Path, values: dict[str, str]) -> str:
    """Fill @NAME@ placeholders (nginx itself uses $, so string.Template would clash)."""
    text = template.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    leftover = re.findall(r"@[A-Z0-9_]+@", text)
    if leftover:
        raise BenchError(f"{template.name}: unfilled placeholders {sorted(set(leftover))}")
    return text


def start_nginx(
    stack: contextlib.ExitStack,
    tools: Tools,
    pin: Pinning,
    prefix: Path,
    name: str,
    conf: str,
) -> subprocess.Popen[bytes]:
    """Run nginx from a prefix in our temp dir: its conf, pid, logs and temp paths.

    `-e` keeps nginx from opening its compiled-in /var/log error log before it has read
    the configuration, so it runs the same as root or as an ordinary user.
    """
    prefix.mkdir()
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    log_path = prefix / "console.log"
    cmd = [tools.nginx, "-p", str(prefix), "-c", str(conf_path), "-e", str(prefix / "error.log")]
    proc = spawn(pin.server(cmd), log_path)
    stack.callback(stop, proc, name)
    return proc


def nginx_logs(prefix: Path) -> list[Path]:
    """Startup errors go to the console, later ones to error.log: show both."""
    return [prefix / "console.log", prefix / "error.log"]


def start_upstream(stack: contextlib.ExitStack, tools: Tools, pin: Pinning, workdir: Path) -> Target:
    port = free_port()
    prefix = workdir / "upstream"
    values = {"PREFIX": str(prefix), "PORT": str(port), "BODY": nginx_literal(UPSTREAM_BODY)}
    proc = start_nginx(stack, tools, pin, prefix, "upstream", render(UPSTREAM_TEMPLATE, values))
    url = f"http://127.0.0.1:{port}{CHAT_PATH}"
    wait_ready(proc, "upstream nginx", nginx_logs(prefix), lambda: _ok(url, ALLOWED_ADDRS[0]))
    return Target("upstream", "bare upstream", url, proc.pid, refuses=False)


REDIS_MARK = "@REDIS@"  # replaced by the URL of the redis-server bench/run.py starts
ROUTE_MARK = "@ROUTE_POLICY@"  # replaced by ROUTE_POLICY with the bare upstream's URL written in
# key: (label, extra serve flags)
GATEWAYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gateway": ("gateway", ()),
    "gateway-shadow": ("gateway + shadow policy", ("--shadow-policy", str(SHADOW_POLICY))),
    # Redis on the gateway's core, as in a sidecar; one GCRA check per allowed request.
    # The audit stream is off here: this row is the rate limit's cost alone.
    "gateway-redis": (
        "gateway + Redis rate limit",
        ("--policy", str(RATELIMIT_POLICY), "--redis", REDIS_MARK, "--audit", "off"),
    ),
    # Every allowed request's JSON body read, its model checked against allow_models and
    # renamed for the upstream it is routed to: the routing step's cost beside the plain forward.
    "gateway-route": ("gateway + model-mapped route", ("--policy", ROUTE_MARK)),
    # Token budgets (issue 19): every allowed request's body held and read, two token limits and a
    # concurrency slot reserved in Redis in one step, the response read for its usage as it is relayed,
    # then settled and the slot released. The audit stream is off, as for the rate limit's row.
    "gateway-tokens": (
        "gateway + token budget",
        ("--policy", str(TOKENS_POLICY), "--redis", REDIS_MARK, "--audit", "off"),
    ),
}
# The shadow policy costs per request, not per event: the stream benchmarks run the plain gateway, and
# beside it the token-budgeted one, whose streams pass a usage tap (include_usage injected, stripped again).
STREAM_GATEWAYS = ("gateway", "gateway-tokens")
# Rows that measure a token budget only if the gateway really charged one: checked on its /metrics.
METERED = frozenset({"gateway-tokens"})


def start_redis(stack: contextlib.ExitStack, pin: Pinning, workdir: Path) -> str:
    """A throwaway redis-server (no persistence) on the servers' CPU; its URL."""
    server = shutil.which("redis-server")
    if server is None:
        raise BenchError("redis-server not found on PATH (Debian: apt-get install redis-server)")
    port = free_port()
    data = workdir / f"redis-{port}"
    data.mkdir()
    cmd = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(data)]
    log_path = workdir / f"redis-{port}.log"
    proc = spawn(pin.server(cmd), log_path)
    stack.callback(stop, proc, "redis-server")

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_ready(proc, "redis-server", [log_path], up)
    return f"redis://127.0.0.1:{port}/0"


def start_gateway(
    stack: contextlib.ExitStack,
    pin: Pinning,
    workdir: Path,
    upstream_base: str,
    key: str,
    path: str = CHAT_PATH,
    row: tuple[str, tuple[str, ...]] | None = None,
) -> Target:
    """The gateway under test, as `python -m gateway` of the interpreter running us.

    Its access log goes to a file, as a production gateway's would. ``row``: a label and
    serve flags for a row that is not in GATEWAYS (``--rules N``'s policy).
    """
    label, extra = row or GATEWAYS[key]
    if REDIS_MARK in extra:
        extra = tuple(start_redis(stack, pin, workdir) if a == REDIS_MARK else a for a in extra)
    if ROUTE_MARK in extra:
        routed = workdir / "policy-route.yaml"
        routed.write_text(ROUTE_POLICY.read_text(encoding="utf-8").replace("@UPSTREAM@", upstream_base))
        extra = tuple(str(routed) if a == ROUTE_MARK else a for a in extra)
    port, admin_port = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "gateway", "serve",
        "--policy", str(POLICY),
        "--geoip", str(CITY_DB), "--geoip", str(ASN_DB), "--geoip", str(ANONYMOUS_DB),
        "--trusted-proxy", "127.0.0.1/32",
        "--upstream", upstream_base,
        "--host", "127.0.0.1", "--port", str(port),
        "--admin-host", "127.0.0.1", "--admin-port", str(admin_port),
        "--access-log", str(workdir / f"{key}-access-{port}.log"),
        "--workers", "1",
        *extra,
    ]  # fmt: skip
    log_path = workdir / f"{key}-{port}.log"
    proc = spawn(pin.server(cmd), log_path, many_files=True)
    stack.callback(stop, proc, label)
    readyz = f"http://127.0.0.1:{admin_port}/readyz"
    wait_ready(proc, label, [log_path], lambda: http(readyz)[0] == 200)
    return Target(key, label, f"http://127.0.0.1:{port}{path}", proc.pid, True, admin=f"http://127.0.0.1:{admin_port}")


def start_nginx_geoip2(
    stack: contextlib.ExitStack,
    tools: Tools,
    pin: Pinning,
    workdir: Path,
    upstream: Target,
    policy: BenchPolicy,
) -> Target:
    assert tools.geoip2_module is not None
    port = free_port()
    prefix = workdir / "nginx-geoip2"
    values = {
        "PREFIX": str(prefix),
        "PORT": str(port),
        "GEOIP2_MODULE": str(tools.geoip2_module),
        "CITY_DB": str(CITY_DB),
        "UPSTREAM_PORT": upstream.url.split(":")[2].split("/")[0],
        "COUNTRY_MAP": "\n".join(f"        {c} 1;" for c in policy.countries),
        "BLOCK_BODY": nginx_literal(policy.block_body),
    }
    conf = render(GEOIP2_TEMPLATE, values)
    proc = start_nginx(stack, tools, pin, prefix, "nginx-geoip2", conf)
    url = f"http://127.0.0.1:{port}{CHAT_PATH}"
    wait_ready(proc, "nginx+geoip2", nginx_logs(prefix), lambda: _ok(url, ALLOWED_ADDRS[0]))
    return Target("nginx-geoip2", "nginx+geoip2", url, proc.pid, refuses=True)


def _ok(url: str, client_ip: str) -> bool:
    return post_chat(url, client_ip)[0] == 200


def nginx_literal(text: str) -> str:
    """Check a string can sit inside '...' in nginx.conf as is (no quote, $ or backslash)."""
    if any(ch in text for ch in "'$\\\n"):
        raise BenchError(f"cannot embed in nginx.conf literally: {text!r}")
    return text


def start_targets(
    stack: contextlib.ExitStack,
    tools: Tools,
    pin: Pinning,
    workdir: Path,
    policy: BenchPolicy,
    with_nginx_geoip2: bool,
    rules: tuple[int, Path] | None = None,
) -> list[Target]:
    # Other local users can reach nothing here, but nginx workers started as root drop to
    # `nobody`, which must be able to enter the prefix to create its temp paths.
    workdir.chmod(0o755)
    upstream = start_upstream(stack, tools, pin, workdir)
    base = upstream.url.removesuffix(CHAT_PATH)
    targets = [upstream, *(start_gateway(stack, pin, workdir, base, key) for key in GATEWAYS)]
    if rules is not None:  # --rules N: the bench policy behind N generated rules
        count, rules_policy = rules
        row = (f"gateway + {count:,} generated rules", ("--policy", str(rules_policy)))
        targets.append(start_gateway(stack, pin, workdir, base, "gateway-rules", row=row))
    if with_nginx_geoip2:
        targets.append(start_nginx_geoip2(stack, tools, pin, workdir, upstream, policy))
    for t in targets:
        log(f"{t.label} ready: {t.url} (pid {t.pid})")
    return targets


def stop_target(target: Target) -> None:
    """Free the CPU and descriptors of the wrk targets before the stream benchmarks."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(target.pid, signal.SIGTERM)


# --- sanity probes ---------------------------------------------------------------------


def probe(target: Target, refusal_body: str) -> list[str]:
    """Send each rotation address once and check the decision and the response body."""
    problems: list[str] = []
    expected_refusal = json.loads(refusal_body)
    for ip in ROTATION:
        status, body = ask_nginx_contract(target.url, ip) if target.decision_only else post_chat(target.url, ip)
        must_refuse = target.refuses and ip in REFUSED_ADDRS
        if target.decision_only and not must_refuse:
            if status != 200 or body:
                problems.append(f"{target.label}: {ip} should be allowed (200, no body), got {status} {body[:200]!r}")
            continue
        if must_refuse:
            if status != 403 or parse_json(body) != expected_refusal:
                problems.append(
                    f"{target.label}: {ip} should get 403 with the refusal body, got {status} {body[:200]!r}"
                )
        elif status != 200 or (parse_json(body) or {}).get("object") != "chat.completion":
            problems.append(
                f"{target.label}: {ip} should get 200 with the upstream's completion, got {status} {body[:200]!r}"
            )
    return problems


def metered(target: Target, stream: bool = False) -> list[str]:
    """A token-budget row measured a token budget: its gateway charged the budget from the provider's usage.

    Without it the row could silently measure a plain forward (a policy whose budget never applies, a
    request path that skips the tap). ``stream``: streams that ended came with the usage chunk the
    gateway asked for (include_usage injected); those the benchmark closes early are estimated.
    """
    if target.key not in METERED:
        return []
    assert target.admin is not None
    status, body = http(target.admin + "/metrics")
    text = body.decode("utf-8", "replace")
    charged = _sum(text, "regiongate_budget_tokens_total{")
    from_usage = _sum(text, "regiongate_tokens_total{", 'source="usage"')
    estimated = _sum(text, "regiongate_tokens_total{", 'source="estimate"')
    what = "streams" if stream else "requests"
    if status != 200 or not charged or not from_usage:
        return [
            f"{target.label}: its {what} were not metered (budget tokens charged: {charged:,.0f}, tokens from "
            f"usage: {from_usage:,.0f}; /metrics {status}): the row would measure a plain forward. Token budgets "
            "need issue 19's request path (token_limit and max_concurrent enforced, usage read as relayed)"
        ]
    # Requests cut short are charged estimates, as a client that leaves is: wrk closes its connections with
    # requests in flight at the end of each run, and the stream benchmarks close their streams before they
    # end. Those are a few per run; a row where the estimates outweigh the usage lost the usage itself.
    if estimated >= from_usage and not stream:
        return [
            f"{target.label}: {estimated:,.0f} tokens of its {what} were estimated, {from_usage:,.0f} read from "
            "the upstream's usage: the usage was lost"
        ]
    return []


def _sum(text: str, prefix: str, *parts: str) -> float:
    """The sum of the samples of ``/metrics`` lines starting with ``prefix`` and holding every one of ``parts``."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix) and all(p in line for p in parts)
    )


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
