#!/usr/bin/env python3
"""Benchmark the gateway against a bare upstream and against nginx + geoip2.

One run starts, all on 127.0.0.1 and on ports the OS hands out:

* a static upstream (nginx, one worker) answering POST /v1/chat/completions with a
  fixed chat-completion body, so the upstream costs next to nothing;
* the gateway (``sys.executable -m gateway serve --workers 1``) with the full benchmark
  policy (bench/policy.yaml: every rule kind, City + ASN + Anonymous-IP test databases)
  and its access log written to a file, twice: alone, and with a shadow policy judged
  beside the active one on every request (bench/policy-shadow.yaml);
* nginx with ngx_http_geoip2_module doing the same block-and-proxy job by country, as
  the reference point of what a C proxy does on the same hardware;

then drives each with wrk (bench/xff.lua: one request in four comes from a refused
country) at 64 connections (throughput) and at 1 connection (latency).

Then the stream benchmarks (bench/streams.py): thousands of
concurrent SSE streams with spaced events from an emitter on the other CPU (gateway
CPU time per relayed event), and many held streams (gateway RSS per stream).

Servers share one CPU and wrk gets the other, so "req/s" means "on one core" and wrk
never competes with what it measures. Results go to stdout as a Markdown table and to
bench/results/latest.json.

Exit status: 0 when every server ran and every sanity check passed, whether or not the
performance targets were met (those are reported as PASS/MISS, since they depend on the
machine); 1 when a sanity check failed (for example the refusal share is not ~25%, so
the numbers would not measure blocking); 2 when the benchmark could not run at all.

Standard library only, plus PyYAML, which the project already depends on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import streams as stream_bench

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the interpreter used
    sys.exit("bench/run.py: PyYAML is missing; run it with the project's Python (pip install -e .)")

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
GEOIP_DIR = REPO_DIR / "tests" / "fixtures" / "geoip"
POLICY = BENCH_DIR / "policy.yaml"
REFERENCE_POLICY = REPO_DIR / "policies" / "openai-supported.yaml"
XFF_LUA = BENCH_DIR / "xff.lua"
UPSTREAM_TEMPLATE = BENCH_DIR / "nginx-upstream.conf.in"
GEOIP2_TEMPLATE = BENCH_DIR / "nginx-geoip2.conf.in"
DEFAULT_OUTPUT = BENCH_DIR / "results" / "latest.json"

CITY_DB = GEOIP_DIR / "GeoIP2-City-Test.mmdb"
ASN_DB = GEOIP_DIR / "GeoLite2-ASN-Test.mmdb"
ANONYMOUS_DB = GEOIP_DIR / "GeoIP2-Anonymous-IP-Test.mmdb"

# The X-Forwarded-For rotation: GB, SE, US are allowed by the `supported` rule and are
# not flagged by the Anonymous-IP test database (81.2.69.x is, so it is not used); CN is
# refused. bench/policy.yaml's `tests` pin these decisions and the preflight runs them.
ALLOWED_ADDRS = ("2.125.160.216", "89.160.20.112", "216.160.83.56")
REFUSED_ADDRS = ("175.16.199.1",)
ROTATION = (*ALLOWED_ADDRS, *REFUSED_ADDRS)
REFUSED_SHARE = len(REFUSED_ADDRS) / len(ROTATION)
SHARE_TOLERANCE = 0.03  # absolute; wrk stops mid-rotation, so the share is not exact
MAX_SOCKET_ERROR_SHARE = 0.01

CHAT_PATH = "/v1/chat/completions"
PROBE_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"probe"}]}'
UPSTREAM_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    },
    separators=(",", ":"),
)

THROUGHPUT_CONNECTIONS = 64
TARGET_RPS = 10000.0
TARGET_ADDED_P50_MS = 0.15
TARGET_STREAM_CPU_RATIO = 1 / 3  # native CPU per relayed event vs the previous data plane's
# The previous (uvicorn + aiohttp) data plane's CPU per relayed event, measured by this script
# in the same run as the native one before that plane was removed (2026-11-22, 2,000 streams,
# one event each per 0.1 s, quiet 2-core machine; the bare pipe floor was 9.1 µs in that run).
PREVIOUS_STREAM_CPU_US = 30.3
TARGET_HELD_KIB = 8.0
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

# Never route the benchmark's own HTTP calls through an http_proxy from the environment:
# every request must go to 127.0.0.1 and nowhere else.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(Exception):
    """The benchmark could not run (missing tool, a server that does not start...)."""


def log(message: str) -> None:
    """Progress goes to stderr so that stdout holds only the table (or the JSON)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- tools and CPU pinning -------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    nginx: str
    wrk: str
    taskset: str | None
    geoip2_module: Path | None


def find_tools(need_geoip2: bool) -> Tools:
    """Find nginx, wrk (required), taskset and the geoip2 module (optional or required)."""
    nginx, wrk = shutil.which("nginx"), shutil.which("wrk")
    missing = [name for name, path in (("nginx", nginx), ("wrk", wrk)) if path is None]
    if missing or nginx is None or wrk is None:
        raise BenchError(
            f"not found on PATH: {', '.join(missing)} (Debian: apt-get install nginx wrk)"
        )
    module = find_geoip2_module(nginx)
    if need_geoip2 and module is None:
        raise BenchError(
            "ngx_http_geoip2_module.so not found in nginx's modules path "
            "(Debian: apt-get install libnginx-mod-http-geoip2), or pass --skip-nginx-geoip2"
        )
    return Tools(nginx=nginx, wrk=wrk, taskset=shutil.which("taskset"), geoip2_module=module)


def find_geoip2_module(nginx: str) -> Path | None:
    """Look where this nginx was built to load modules from, then in Debian's usual place."""
    out = subprocess.run([nginx, "-V"], capture_output=True, text=True, check=False).stderr
    match = re.search(r"--modules-path=(\S+)", out)
    dirs = [Path(match.group(1))] if match else []
    dirs.append(Path("/usr/lib/nginx/modules"))
    for directory in dirs:
        candidate = directory / "ngx_http_geoip2_module.so"
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class Pinning:
    """Which CPU the servers get and which one wrk gets; None means unpinned."""

    taskset: str | None
    server_cpu: int | None
    client_cpu: int | None
    note: str

    def server(self, cmd: Sequence[str]) -> list[str]:
        return self._wrap(cmd, self.server_cpu)

    def client(self, cmd: Sequence[str]) -> list[str]:
        return self._wrap(cmd, self.client_cpu)

    def _wrap(self, cmd: Sequence[str], cpu: int | None) -> list[str]:
        if self.taskset is None or cpu is None:
            return list(cmd)
        return [self.taskset, "-c", str(cpu), *cmd]


def plan_pinning(taskset: str | None) -> Pinning:
    """Servers on the first CPU we may use, wrk on the second; unpinned if we cannot.

    The CPUs come from our own affinity mask rather than being 0 and 1 outright, so that
    a container limited to, say, CPUs 2-3 still pins correctly.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpus:
        cpus = list(range(os.cpu_count() or 1))
    if taskset is None:
        return Pinning(None, None, None, "UNPINNED: taskset not found; servers and wrk share CPUs")
    if len(cpus) < 2:
        return Pinning(None, None, None, "UNPINNED: only one CPU; servers and wrk share it")
    server, client = cpus[0], cpus[1]
    return Pinning(taskset, server, client, f"servers pinned to CPU {server}, wrk to CPU {client}")


# --- processes -------------------------------------------------------------------------


def free_port() -> int:
    """Ask the OS for a free loopback port (closed again at once; a small race we accept)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    """The environment minus REGIONGATE_* settings, which would silently change the run."""
    return {k: v for k, v in os.environ.items() if not k.startswith("REGIONGATE_")}


def raise_child_nofile() -> None:
    """Run in a child before exec: thousands of held streams need twice as many descriptors."""
    stream_bench.raise_nofile()


def spawn(cmd: Sequence[str], log_path: Path, many_files: bool = False) -> subprocess.Popen[bytes]:
    """Start a server in its own session, output to a log file.

    Its own session keeps Ctrl-C from reaching it directly, so shutdown happens in one
    place (stop()) in a known order, and lets stop() kill the whole group if need be.
    """
    with log_path.open("wb") as out:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_DIR,
            env=child_env(),
            start_new_session=True,
            preexec_fn=raise_child_nofile if many_files else None,
        )


def stop(proc: subprocess.Popen[bytes], name: str) -> None:
    """SIGTERM (both nginx and the gateway shut down on it), then SIGKILL the group."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {proc.pid}) ignored SIGTERM; killing its process group")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tails(paths: Sequence[Path], lines: int = 30) -> str:
    """The last lines of each log, for error messages."""
    out = []
    for path in paths:
        try:
            text = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            text = "(none)"
        out.append(f"--- {path.name} ---\n{text}")
    return "\n".join(out)


def wait_ready(
    proc: subprocess.Popen[bytes], name: str, logs: Sequence[Path], ready: Callable[[], bool]
) -> None:
    """Poll ready() until it holds; fail with the server's logs if it exits or times out."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise BenchError(f"{name} exited with status {code} at startup:\n{tails(logs)}")
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.05)
    raise BenchError(f"{name} not ready after {STARTUP_TIMEOUT_S:.0f}s:\n{tails(logs)}")


def http(
    url: str, *, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One request without proxies; HTTP error statuses are returned, not raised."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post_chat(url: str, client_ip: str) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", "X-Forwarded-For": client_ip}
    return http(url, body=PROBE_BODY, headers=headers)


# --- the three servers -----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A server wrk drives."""

    key: str
    label: str
    url: str
    pid: int
    refuses: bool  # whether it must refuse the CN address


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


def start_upstream(
    stack: contextlib.ExitStack, tools: Tools, pin: Pinning, workdir: Path
) -> Target:
    port = free_port()
    prefix = workdir / "upstream"
    values = {"PREFIX": str(prefix), "PORT": str(port), "BODY": nginx_literal(UPSTREAM_BODY)}
    proc = start_nginx(stack, tools, pin, prefix, "upstream", render(UPSTREAM_TEMPLATE, values))
    url = f"http://127.0.0.1:{port}{CHAT_PATH}"
    wait_ready(proc, "upstream nginx", nginx_logs(prefix), lambda: _ok(url, ALLOWED_ADDRS[0]))
    return Target("upstream", "bare upstream", url, proc.pid, refuses=False)


SHADOW_POLICY = BENCH_DIR / "policy-shadow.yaml"
RATELIMIT_POLICY = BENCH_DIR / "policy-ratelimit.yaml"
ROUTE_POLICY = BENCH_DIR / "policy-route.yaml"
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
}
# The shadow policy costs per request, not per event: the stream benchmarks run the plain gateway.
STREAM_GATEWAYS = ("gateway",)


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
) -> Target:
    """The gateway under test, as `python -m gateway` of the interpreter running us.

    Its access log goes to a file, as a production gateway's would.
    """
    label, extra = GATEWAYS[key]
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
    return Target(key, label, f"http://127.0.0.1:{port}{path}", proc.pid, True)


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


# --- policy ----------------------------------------------------------------------------


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans, as the gateway reads policies.

    Under PyYAML's YAML 1.1 rules `countries: [NO]` loads as [False]: Norway would
    vanish from the nginx map while the gateway still allows it.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_Yaml12Loader)


@dataclass(frozen=True)
class BenchPolicy:
    """What nginx+geoip2 must mirror from bench/policy.yaml."""

    countries: tuple[str, ...]
    block_body: str


def load_bench_policy() -> BenchPolicy:
    """Read the supported countries and the refusal body from bench/policy.yaml.

    bench/policy.yaml is the one source for both contenders, so nginx blocks exactly
    what the gateway's `supported` rule allows and answers with the same body.
    """
    doc = load_yaml(POLICY)
    countries = tuple(supported_countries(doc, POLICY))
    bad = [c for c in countries if not re.fullmatch(r"[A-Z]{2}", c)]
    if bad:
        raise BenchError(f"{POLICY}: not ISO 3166-1 alpha-2 codes: {bad}")
    block = doc.get("block") or {}
    error = {
        "message": block.get("message", "Country, region, or territory not supported"),
        "type": block.get("type", "request_forbidden"),
        "param": None,
        "code": block.get("code", "unsupported_country_region_territory"),
    }
    body = json.dumps({"error": error}, separators=(",", ":"))
    warn_if_drifted(set(countries))
    return BenchPolicy(countries, body)


def supported_countries(doc: dict[str, Any], path: Path) -> list[str]:
    for rule in doc.get("rules") or []:
        if rule.get("name") == "supported":
            return [str(c) for c in rule["countries"]]
    raise BenchError(f"{path}: no rule named 'supported'")


def warn_if_drifted(countries: set[str]) -> None:
    """The benchmark should use the shipped list; say so if the two have diverged."""
    with contextlib.suppress(OSError, BenchError, yaml.YAMLError):
        reference = set(supported_countries(load_yaml(REFERENCE_POLICY), REFERENCE_POLICY))
        if reference != countries:
            log(
                f"WARNING: bench/policy.yaml's supported countries differ from "
                f"{REFERENCE_POLICY.relative_to(REPO_DIR)}: "
                f"only in bench {sorted(countries - reference)}, "
                f"only in shipped {sorted(reference - countries)}"
            )


def preflight_policy() -> None:
    """Run the policy's own tests with the gateway's checker before starting anything.

    They pin the decision for every address in the rotation, so a policy or database
    change that would make the 25% refusal share wrong fails here, with the reason.
    """
    cmd = [sys.executable, "-m", "gateway", "check", str(POLICY), "--quiet"]
    for db in (CITY_DB, ASN_DB, ANONYMOUS_DB):
        cmd += ["--geoip", str(db)]
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO_DIR, env=child_env(), check=False
    )
    if result.returncode != 0:
        raise BenchError(
            f"`gateway check {POLICY.name}` failed ({result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )


# --- sanity probes ---------------------------------------------------------------------


def probe(target: Target, refusal_body: str) -> list[str]:
    """Send each rotation address once and check the decision and the response body."""
    problems: list[str] = []
    expected_refusal = json.loads(refusal_body)
    for ip in ROTATION:
        status, body = post_chat(target.url, ip)
        must_refuse = target.refuses and ip in REFUSED_ADDRS
        if must_refuse:
            if status != 403 or parse_json(body) != expected_refusal:
                problems.append(
                    f"{target.label}: {ip} should get 403 with the refusal body, "
                    f"got {status} {body[:200]!r}"
                )
        elif status != 200 or (parse_json(body) or {}).get("object") != "chat.completion":
            problems.append(
                f"{target.label}: {ip} should get 200 with the upstream's completion, "
                f"got {status} {body[:200]!r}"
            )
    return problems


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


# --- wrk -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkRun:
    """One wrk run, in the units the table uses."""

    connections: int
    duration_s: float
    requests: int
    rps: float
    non2xx: int
    non2xx_share: float
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]


def run_wrk(tools: Tools, pin: Pinning, url: str, connections: int, duration_s: int) -> WrkRun:
    """One wrk run, read from the JSON line xff.lua's done() prints."""
    cmd = pin.client([
        tools.wrk, "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "5s",
        "-s", str(XFF_LUA), url, "--", *ROTATION,
    ])  # fmt: skip
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration_s + 60, cwd=REPO_DIR, check=False
    )
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if result.returncode != 0 or line is None:
        raise BenchError(
            f"wrk failed ({result.returncode}) against {url}:\n{result.stdout}{result.stderr}"
        )
    return wrk_run_from(json.loads(line.removeprefix("BENCH_JSON ")), connections)


def wrk_run_from(data: dict[str, Any], connections: int) -> WrkRun:
    requests = int(data["requests"])
    duration_s = data["duration_us"] / 1e6
    errors = {k: int(v) for k, v in data["errors"].items()}
    non2xx = errors.pop("status")
    latency = {k: round(v / 1000.0, 3) for k, v in data["latency_us"].items()}
    return WrkRun(
        connections=connections,
        duration_s=round(duration_s, 3),
        requests=requests,
        rps=round(requests / duration_s, 1) if duration_s else 0.0,
        non2xx=non2xx,
        non2xx_share=round(non2xx / requests, 4) if requests else 0.0,
        socket_errors=errors,
        latency_ms=latency,
    )


@dataclass
class TargetResult:
    key: str
    label: str
    pid: int
    throughput: WrkRun
    latency: WrkRun
    added_p50_ms: float | None = None
    # CPU time of the target's own process per request at 64 connections: less sensitive to
    # a busy machine than req/s (nginx targets: the master only, so not comparable).
    cpu_us_per_request: float | None = None
    problems: list[str] = field(default_factory=list)


def measure(
    target: Target, tools: Tools, pin: Pinning, duration_s: int, warmup_s: int
) -> TargetResult:
    """Warm up (pools, caches; not recorded), then 64 connections, then 1 connection."""
    log(f"{target.label}: warm-up {warmup_s}s")
    run_wrk(tools, pin, target.url, THROUGHPUT_CONNECTIONS, warmup_s)
    log(f"{target.label}: {THROUGHPUT_CONNECTIONS} connections, {duration_s}s")
    cpu_before = stream_bench.cpu_seconds(target.pid)
    throughput = run_wrk(tools, pin, target.url, THROUGHPUT_CONNECTIONS, duration_s)
    cpu = stream_bench.cpu_seconds(target.pid) - cpu_before
    log(f"{target.label}: 1 connection, {duration_s}s")
    latency = run_wrk(tools, pin, target.url, 1, duration_s)
    result = TargetResult(target.key, target.label, target.pid, throughput, latency)
    if throughput.requests:
        result.cpu_us_per_request = round(cpu / throughput.requests * 1e6, 1)
    result.problems = check_run(target, throughput) + check_run(target, latency)
    return result


def check_run(target: Target, run: WrkRun) -> list[str]:
    """The refused share must be ~25% (0 for the bare upstream) and sockets mostly clean."""
    where = f"{target.label} @{run.connections}"
    if run.requests == 0:
        return [f"{where}: no request completed"]
    problems = []
    expected = REFUSED_SHARE if target.refuses else 0.0
    if abs(run.non2xx_share - expected) > SHARE_TOLERANCE:
        problems.append(
            f"{where}: non-2xx share {run.non2xx_share:.1%}, expected {expected:.0%} "
            f"(±{SHARE_TOLERANCE:.0%}): the blocking is not what the benchmark assumes"
        )
    errors = sum(run.socket_errors.values())
    if errors > MAX_SOCKET_ERROR_SHARE * run.requests:
        problems.append(
            f"{where}: {errors} socket errors in {run.requests} requests {run.socket_errors}"
        )
    return problems


# --- targets and report ----------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    name: str
    measured: float
    threshold: float
    unit: str
    passed: bool
    margin: float  # positive when met, by how much; negative when missed


def evaluate(results: dict[str, TargetResult], streams: dict[str, Any] | None = None) -> list[Goal]:
    """The gateway's performance targets; missing one is reported, not an error."""
    gw = results.get("gateway")
    if gw is None:
        return []
    goals = stream_goals(streams or {})
    goals[:0] = [
        Goal(
            f"gateway req/s @{THROUGHPUT_CONNECTIONS} >= {TARGET_RPS:,.0f}",
            gw.throughput.rps, TARGET_RPS, "req/s",
            gw.throughput.rps >= TARGET_RPS, gw.throughput.rps - TARGET_RPS,
        ),
    ]  # fmt: skip
    if gw.added_p50_ms is not None:
        goals.append(
            Goal(
                f"gateway added p50 @1 < {TARGET_ADDED_P50_MS:g} ms",
                gw.added_p50_ms, TARGET_ADDED_P50_MS, "ms",
                gw.added_p50_ms < TARGET_ADDED_P50_MS, TARGET_ADDED_P50_MS - gw.added_p50_ms,
            )
        )  # fmt: skip
    return goals


def stream_goals(streams: dict[str, Any]) -> list[Goal]:
    goals = []
    native = streams.get("gateway")
    if native:
        new, old = native["relay"]["cpu_us_per_event"], PREVIOUS_STREAM_CPU_US
        if new:
            ratio = new / old
            goals.append(
                Goal(
                    f"stream CPU per event <= {TARGET_STREAM_CPU_RATIO:.2f} x the previous data plane's "
                    f"({PREVIOUS_STREAM_CPU_US:g} µs, recorded)",
                    round(ratio, 3), TARGET_STREAM_CPU_RATIO, "x",
                    ratio <= TARGET_STREAM_CPU_RATIO, TARGET_STREAM_CPU_RATIO - ratio,
                )
            )  # fmt: skip
    if native and native["held"]["kib_per_stream"] is not None:
        kib = native["held"]["kib_per_stream"]
        goals.append(
            Goal(
                f"held stream memory <= {TARGET_HELD_KIB:g} KiB ({native['held']['streams']:,} streams)",
                kib, TARGET_HELD_KIB, "KiB", kib <= TARGET_HELD_KIB, TARGET_HELD_KIB - kib,
            )
        )  # fmt: skip
    return goals


def fill_added_latency(results: dict[str, TargetResult]) -> None:
    """Added p50 @1 = the target's p50 at one connection minus the bare upstream's."""
    base = results["upstream"].latency.latency_ms["p50"]
    for result in results.values():
        result.added_p50_ms = round(result.latency.latency_ms["p50"] - base, 3)


def markdown_table(results: dict[str, TargetResult]) -> str:
    c = THROUGHPUT_CONNECTIONS
    rows = [
        f"| target | req/s @{c} | p50 @{c} | p99 @{c} | p50 @1 | p99 @1 "
        "| added p50 @1 vs bare upstream | non-2xx @64 / @1 | process CPU µs / request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        t, lat = r.throughput.latency_ms, r.latency.latency_ms
        added = (
            "-" if r.key == "upstream" or r.added_p50_ms is None else f"{r.added_p50_ms:+.3f} ms"
        )
        rows.append(
            f"| {r.label} | {r.throughput.rps:,.0f} | {t['p50']:.3f} ms | {t['p99']:.3f} ms "
            f"| {lat['p50']:.3f} ms | {lat['p99']:.3f} ms | {added} "
            f"| {r.throughput.non2xx_share:.1%} / {r.latency.non2xx_share:.1%} "
            f"| {'-' if r.cpu_us_per_request is None or r.key not in GATEWAYS else r.cpu_us_per_request} |"
        )
    return "\n".join(rows)


def stream_table(streams: dict[str, Any]) -> list[str]:
    if not streams:
        return []
    rows = [
        "| data plane | streams | events relayed | gateway CPU µs / event | emitter CPU | client CPU "
        "| held streams | RSS delta | KiB / held stream | dropped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in streams.items():
        relay, held = r["relay"], r["held"] or {}
        label = GATEWAYS[key][0] if key in GATEWAYS else "bare byte pipe on uvloop (floor, no HTTP)"
        per_event = "-" if relay["cpu_us_per_event"] is None else f"{relay['cpu_us_per_event']:.1f}"
        per_stream = "-" if held.get("kib_per_stream") is None else f"{held['kib_per_stream']:.2f}"
        rss = f"{(held['rss_after_kib'] - held['rss_before_kib']) / 1024:,.1f} MiB" if held else "-"
        rows.append(
            f"| {label} | {relay['streams']:,} | {relay['events_in_window']:,} "
            f"(expected {relay['expected_events']:,.0f}) | {per_event} | {relay['emitter_cpu_share']:.0%} "
            f"| {relay['client_cpu_share']:.0%} | {held.get('streams', 0):,} | {rss} | {per_stream} "
            f"| {relay['dropped']} / {held.get('dropped', '-')} |"
        )
    return [*rows, ""]


def goal_lines(goals: list[Goal]) -> list[str]:
    lines = []
    for g in goals:
        verdict = "PASS" if g.passed else "MISS"
        pct = f", {g.margin / g.threshold:+.0%}" if g.threshold else ""
        value = f"{g.measured:,.0f}" if g.unit == "req/s" else f"{g.measured:.3f}"
        margin = f"{g.margin:+,.0f}" if g.unit == "req/s" else f"{g.margin:+.3f}"
        if g.unit == "x":
            value, margin = f"{g.measured:.2f}", f"{g.margin:+.2f}"
        lines.append(f"{verdict}  {g.name}: {value} {g.unit} (margin {margin} {g.unit}{pct})")
    return lines


def report_text(
    results: dict[str, TargetResult], goals: list[Goal], problems: list[str], meta: dict[str, Any]
) -> str:
    lines = [
        f"Regiongate benchmark: {meta['duration_s']}s per run, wrk -t1, {meta['pinning']['note']}",
        "",
        markdown_table(results),
        "",
        *stream_table(meta.get("streams") or {}),
        *goal_lines(goals),
    ]
    if problems:
        lines += ["", "SANITY CHECKS FAILED (the figures above do not measure what they claim):"]
        lines += [f"  - {p}" for p in problems]
    else:
        lines += ["", f"sanity: refusal share ~{REFUSED_SHARE:.0%} where expected, bodies checked"]
    return "\n".join(lines)


def environment(tools: Tools) -> dict[str, Any]:
    """What the figures depend on, recorded next to them."""

    def first_line(cmd: Sequence[str], any_status: bool = False) -> str | None:
        """First line of a command's output; wrk -v prints its version but exits 1."""
        try:
            r = subprocess.run(
                cmd, capture_output=True, text=True, cwd=REPO_DIR, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        text = (r.stdout or r.stderr).strip()
        return text.splitlines()[0] if (r.returncode == 0 or any_status) and text else None

    cpu = None
    with contextlib.suppress(OSError):
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
             if ln.startswith("model name")),
            None,
        )  # fmt: skip
    commit = first_line(["git", "rev-parse", "HEAD"])
    dirty = None
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                cwd=REPO_DIR, timeout=10, check=False)  # fmt: skip
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "gateway_version": first_line([sys.executable, "-m", "gateway", "--version"]),
        "nginx": first_line([tools.nginx, "-v"]),
        "wrk": first_line([tools.wrk, "-v"], any_status=True),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "git_commit": commit,
        "git_dirty": dirty,
    }


# --- main ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--duration",
        type=int,
        default=10,
        metavar="SECONDS",
        help="length of each measured wrk run (default 10)",
    )
    length.add_argument(
        "--quick",
        action="store_true",
        help="2 s runs and a 1 s warm-up: a smoke test, not a measurement",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        metavar="SECONDS",
        help="unrecorded wrk run before each target's measurements (default 2)",
    )
    p.add_argument(
        "--skip-nginx-geoip2", action="store_true", help="do not run the nginx+geoip2 comparison"
    )
    p.add_argument("--skip-streams", action="store_true", help="do not run the stream benchmarks")
    p.add_argument(
        "--streams",
        type=int,
        default=2000,
        help="concurrent event streams for the CPU-per-event benchmark (default 2000)",
    )
    p.add_argument(
        "--stream-interval",
        type=float,
        default=0.25,
        metavar="SECONDS",
        help="time between two events of one stream (default 0.25)",
    )
    p.add_argument(
        "--held-streams",
        type=int,
        default=10000,
        help="concurrent idle streams for the memory-per-stream benchmark (default 10000)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the results as JSON on stdout (the table goes to stderr)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"where to write the JSON results (default {DEFAULT_OUTPUT.relative_to(REPO_DIR)})",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 2, 1
        args.streams, args.held_streams = min(args.streams, 100), min(args.held_streams, 200)
    if args.duration < 1 or args.warmup < 1:
        p.error("--duration and --warmup must be at least 1 second")
    return args


def check_inputs() -> None:
    for path in (
        POLICY,
        SHADOW_POLICY,
        RATELIMIT_POLICY,
        ROUTE_POLICY,
        XFF_LUA,
        UPSTREAM_TEMPLATE,
        GEOIP2_TEMPLATE,
        CITY_DB,
        ASN_DB,
        ANONYMOUS_DB,
    ):
        if not path.is_file():
            raise BenchError(f"missing input file: {path}")


def start_targets(
    stack: contextlib.ExitStack,
    tools: Tools,
    pin: Pinning,
    workdir: Path,
    policy: BenchPolicy,
    with_nginx_geoip2: bool,
) -> list[Target]:
    # Other local users can reach nothing here, but nginx workers started as root drop to
    # `nobody`, which must be able to enter the prefix to create its temp paths.
    workdir.chmod(0o755)
    upstream = start_upstream(stack, tools, pin, workdir)
    base = upstream.url.removesuffix(CHAT_PATH)
    targets = [upstream, *(start_gateway(stack, pin, workdir, base, key) for key in GATEWAYS)]
    if with_nginx_geoip2:
        targets.append(start_nginx_geoip2(stack, tools, pin, workdir, upstream, policy))
    for t in targets:
        log(f"{t.label} ready: {t.url} (pid {t.pid})")
    return targets


def run_streams(
    args: argparse.Namespace, pin: Pinning, workdir: Path
) -> tuple[dict[str, Any], list[str]]:
    """Targets 3 and 4 for both data planes, one gateway at a time, against one emitter.

    The emitter and this process (the clients) share the CPU wrk used; the gateway has
    its own. The emitter is not the bottleneck when its CPU share stays well below one
    core and the events relayed match what the schedule asks for; both are reported, and
    a shortfall of more than 10% fails the sanity check.
    """
    problems: list[str] = []
    results: dict[str, Any] = {}
    port = free_port()
    with contextlib.ExitStack() as stack:
        log_path = workdir / "emitter.log"
        cmd = [sys.executable, str(BENCH_DIR / "streams.py"), "emit", "--port", str(port)]
        emitter = spawn(pin.client(cmd), log_path, many_files=True)
        stack.callback(stop, emitter, "emitter")
        wait_ready(emitter, "emitter", [log_path], lambda: _connects(port))
        stream_bench.raise_nofile()
        held_streams = fit_held_streams(args.held_streams)
        if pin.client_cpu is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {pin.client_cpu})
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        floor = relay_through_pipe(args, pin, workdir, port, emitter.pid)
        results["pipe"] = {"relay": asdict(floor), "held": None}
        if floor.dropped or floor.events_in_window < 0.9 * floor.expected_events:
            problems.append(
                f"bare pipe: {floor.events_in_window:,} of {floor.expected_events:,.0f} events, {floor.dropped} "
                f"dropped: the emitter ({floor.emitter_cpu_share:.0%} CPU) or the clients cannot keep the schedule"
            )
        for key in STREAM_GATEWAYS:
            with contextlib.ExitStack() as gw_stack:
                gw = start_gateway(gw_stack, pin, workdir, f"http://127.0.0.1:{port}", key)
                gw_port = int(gw.url.split(":")[2].split("/")[0])
                log(f"{gw.label}: {args.streams:,} streams, one event each per {args.stream_interval}s, "
                    f"{args.duration}s window")  # fmt: skip
                relay = asyncio.run(
                    stream_bench.measure_relay(
                        "127.0.0.1", gw_port, CHAT_PATH, ALLOWED_ADDRS[0], args.streams,
                        args.stream_interval, args.duration, gw.pid, emitter.pid,
                    )
                )  # fmt: skip
                log(f"{gw.label}: {held_streams:,} held streams")
                held = asyncio.run(
                    stream_bench.measure_held("127.0.0.1", gw_port, CHAT_PATH, ALLOWED_ADDRS[0], held_streams, gw.pid)
                )
            results[key] = {"relay": asdict(relay), "held": asdict(held)}
            where = gw.label
            if relay.dropped or held.dropped:
                problems.append(f"{where}: streams dropped: {relay.dropped} relayed, {held.dropped} held")
            if relay.events_in_window < 0.9 * relay.expected_events:
                problems.append(
                    f"{where}: {relay.events_in_window:,} events relayed, {relay.expected_events:,.0f} scheduled: "
                    f"the emitter ({relay.emitter_cpu_share:.0%} CPU), the clients or the gateway fell behind"
                )
    if pin.client_cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return results, problems


def relay_through_pipe(
    args: argparse.Namespace, pin: Pinning, workdir: Path, emitter_port: int, emitter_pid: int
) -> stream_bench.RelayMeasure:
    """The same relay load through a bare byte pipe on the gateway's CPU: the floor per event."""
    port = free_port()
    log_path = workdir / "pipe.log"
    cmd = [sys.executable, str(BENCH_DIR / "streams.py"), "pipe", "--port", str(port),
           "--upstream-port", str(emitter_port)]  # fmt: skip
    with contextlib.ExitStack() as stack:
        proc = spawn(pin.server(cmd), log_path, many_files=True)
        stack.callback(stop, proc, "pipe")
        wait_ready(proc, "pipe", [log_path], lambda: _connects(port))
        log(f"bare byte pipe (floor): {args.streams:,} streams")
        return asyncio.run(
            stream_bench.measure_relay(
                "127.0.0.1", port, CHAT_PATH, ALLOWED_ADDRS[0], args.streams,
                args.stream_interval, args.duration, proc.pid, emitter_pid,
            )
        )  # fmt: skip


def fit_held_streams(wanted: int) -> int:
    """As many held streams as one gateway process may hold under the open-file hard limit.

    Each held stream is two descriptors in the gateway (client and upstream side), and the
    native data plane keeps 64 back for its control plane; a hard limit we cannot raise
    (no CAP_SYS_RESOURCE) bounds the benchmark, and the output says so.
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    fit = (hard - 64) // 2 - 100  # the warm-up streams and some slack
    if wanted > fit:
        log(f"NOTE: open-file hard limit {hard}: {fit:,} held streams instead of {wanted:,} (raise it to measure more)")
        return fit
    return wanted


def stop_target(target: Target) -> None:
    """Free the CPU and descriptors of the wrk targets before the stream benchmarks."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(target.pid, signal.SIGTERM)


def _connects(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def run(args: argparse.Namespace) -> int:
    check_inputs()
    tools = find_tools(need_geoip2=not args.skip_nginx_geoip2)
    pin = plan_pinning(tools.taskset)
    log(pin.note)
    policy = load_bench_policy()
    preflight_policy()
    meta: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "quick": args.quick,
        "pinning": asdict(pin),
        "rotation": {"allowed": ALLOWED_ADDRS, "refused": REFUSED_ADDRS},
        "environment": environment(tools),
    }
    results: dict[str, TargetResult] = {}
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="regiongate-bench-")))
        targets = start_targets(stack, tools, pin, workdir, policy, not args.skip_nginx_geoip2)
        for t in targets:
            problems += probe(t, policy.block_body)
        for t in targets:
            results[t.key] = measure(t, tools, pin, args.duration, args.warmup)
            problems += results[t.key].problems
        for t in targets:
            stop_target(t)
        streams: dict[str, Any] = {}
        if not args.skip_streams:
            streams, stream_problems = run_streams(args, pin, workdir)
            problems += stream_problems
    meta["streams"] = streams
    fill_added_latency(results)
    goals = evaluate(results, streams)
    document = {
        **meta,
        "targets": {k: asdict(r) for k, r in results.items()},
        "goals": [asdict(g) for g in goals],
        "sanity_ok": not problems,
        "problems": problems,
    }
    write_json(args.output, document)
    text = report_text(results, goals, problems, meta)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(document, indent=2))
    else:
        print(text)
    log(f"results written to {display_path(args.output)}")
    return 1 if problems else 0


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_DIR))
    except ValueError:
        return str(path)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) takes the same path as Ctrl-C, so the servers are
    # stopped either way instead of being left running on their ports.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
