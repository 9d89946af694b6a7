"""The decision service's core, built in this process as ``regiongate serve`` builds it (fast tier)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from gateway.authz.judge import Judge
from gateway.authz.query import Answer, Contract, Query
from gateway.dataplane.limits import Limits
from gateway.dataplane.server import Request
from gateway.metrics import Metrics
from gateway.runtime import Runtime, Settings, load_runtime
from support.processes import CITY, ROOT, Gateway, GatewayFactory, RawUpstream, Sent, free_port, stop

GB, CN = "2.125.160.216", "175.16.199.1"

POLICY = """\
version: 1
upstreams:
  default: {url: "http://127.0.0.1:9"}
  eu: {url: "http://127.0.0.1:9"}
rules:
  - {name: no-files, paths: ["/v1/files*"], action: deny}
  - {name: small-models, countries: [SE], models: ["gpt-4o-mini"], action: route, upstream: eu}
  - {name: gb, countries: [GB], action: allow}
defaults: {action: deny, missing: deny}
"""


def runtime_for(tmp_path: Path, policy: str = POLICY, **settings: object) -> Runtime:
    path = tmp_path / "authz-policy.yaml"
    path.write_text(policy)
    access_log = tmp_path / "authz-access.log"
    options = {"policy": str(path), "geoip": (CITY,), "access_log": str(access_log), "watch": False} | settings
    return load_runtime(Settings(**options))


def judge_for(runtime: Runtime, via: Contract = "forward") -> tuple[Judge, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return Judge(runtime, metrics, Limits(), via), metrics


def ask(judge: Judge, query: Query) -> Answer:
    """Judge one query whose answer does not wait (no Redis)."""
    answers: list[Answer] = []
    judge.ask(query, answers.append)
    assert len(answers) == 1
    return answers[0]


# --- end to end: the real proxies in front of a real `regiongate serve --authz-port` ----------------

# A City-type database for the edge tests, written with mmdb-writer in GeoIP2-City's record layout:
# MaxMind's test databases have no Ukrainian subdivisions, and one .mmdb per type is read.
EDGE_CLIENTS = {"CN": "203.0.113.7", "GB": "192.0.2.10", "UA-43": "198.51.100.43", "GB-2": "192.0.2.11"}

EDGE_POLICY = """\
version: 1
rules:
  - {name: no-files, paths: ["/v1/files*"], action: deny}
  - name: crimea
    countries: [UA]
    subdivisions: [UA-43]
    action: deny
  - {name: ua, countries: [UA], action: allow}
  - name: gb-small-models
    countries: [GB]
    paths: ["/v1/chat/*"]
    allow_models: ["gpt-4o-mini"]
    action: allow
  - name: gb-limited
    cidrs: ["192.0.2.11/32"]
    action: allow
    rate_limit: {requests: 3, per: 1h, by: ip}
  - {name: gb, countries: [GB], action: allow}
defaults: {action: deny}
"""


def write_edge_db(path: Path) -> str:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, database_type="GeoIP2-City", languages=["en"], ipv4_compatible=True,
                        description={"en": "Regiongate test: decision service edges"})  # fmt: skip
    records = {
        "CN": {"iso_code": "CN"},
        "GB": {"iso_code": "GB"},
        "GB-2": {"iso_code": "GB"},
        "UA-43": {"iso_code": "UA"},
    }
    for key, country in records.items():
        record: dict[str, object] = {"country": country, "registered_country": country}
        if key == "UA-43":
            record["subdivisions"] = [{"iso_code": "43"}]
        writer.insert_network(IPSet([f"{EDGE_CLIENTS[key]}/32"]), record)
    writer.to_db_file(str(path))
    return str(path)


TOKEN = "t0ken-for-authz-tests-only"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def shipped(relative: str, replacements: dict[str, str]) -> str:
    """A shipped edge configuration (deploy/edges/...), with each named value replaced: each must be there,
    so the file the tests run is the file users copy."""
    text = (ROOT / "deploy" / "edges" / relative).read_text()
    for old, new in replacements.items():
        assert old in text, (relative, old)
        text = text.replace(old, new)
    return text


@dataclass
class Edge:
    """A decision service (regiongate serve --port 0 --authz-port) with Redis, an upstream that records
    what it receives, and the policy file it watches."""

    gateway: Gateway
    authz_port: int
    upstream: RawUpstream
    policy: Path

    @property
    def authz(self) -> str:
        return f"http://127.0.0.1:{self.authz_port}"

    def received(self) -> list[Sent]:
        return self.upstream.requests()

    def sent(self, marker: str) -> Sent:
        """The one request the upstream received with ``x-test-marker: marker`` (connections interleave)."""
        found = [s for s in self.upstream.requests() if s.headers.get(b"x-test-marker") == marker.encode()]
        assert len(found) == 1, found
        return found[0]

    def direct(self, client: str, path: str = "/v1/models", method: str = "GET") -> httpx.Response:
        """The forward contract asked directly: what the proxy port would answer, to compare with."""
        headers = {"x-forwarded-method": method, "x-forwarded-uri": path, "x-forwarded-for": client}
        return httpx.get(self.authz + "/authz/forward", headers=headers, timeout=10)

    def rule(self, client: str, path: str = "/v1/models") -> str:
        """The deciding rule, as the nginx contract reports it (its refusals carry the facts)."""
        headers = {"x-original-method": "GET", "x-original-uri": path, "x-forwarded-for": client}
        return httpx.get(self.authz + "/authz/nginx", headers=headers, timeout=10).headers["x-regiongate-rule"]

    def add_override(self, body: dict[str, Any]) -> str:
        r = httpx.post(self.gateway.admin + "/admin/overrides", json=body, headers=AUTH, timeout=10)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def remove_override(self, id: str) -> None:
        r = httpx.delete(self.gateway.admin + f"/admin/overrides/{id}", headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text


@contextlib.contextmanager
def running_edge(directory: Path, *args: str) -> Iterator[Edge]:
    """Redis, a recording upstream and ``regiongate serve --port 0 --authz-port P`` (the service alone)."""
    from support.redis_server import running

    directory.mkdir(parents=True, exist_ok=True)
    db = write_edge_db(directory / "edge-city.mmdb")
    policy = directory / "edge-policy.yaml"
    policy.write_text(EDGE_POLICY)
    upstream = RawUpstream()
    factory = GatewayFactory(directory)
    try:
        with running(directory / "redis") as redis:
            authz_port = free_port()
            gw = factory(
                "--port", "0", "--authz-port", str(authz_port), "--policy", str(policy), "--geoip", db,
                "--redis", redis.url, "--redis-prefix", f"rg-authz-{authz_port}:",
                "--trusted-proxy", "127.0.0.1/32", *args,
                env={"REGIONGATE_ADMIN_TOKEN": TOKEN},
            )  # fmt: skip
            gw.wait_redis()
            yield Edge(gw, authz_port, upstream, policy)
    finally:
        factory.close()
        upstream.close()


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


@contextlib.contextmanager
def running_proxy(argv: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    """A proxy binary listening on ``port`` (loopback) until the block ends; its output goes to ``log``."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{argv[0]} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield
    finally:
        stop(proc)


@contextlib.contextmanager
def inprocess_authz(runtime: Runtime) -> Iterator[str]:
    """The ``--authz-port`` listener in this process (the data plane's Listener serving
    :class:`gateway.authz.contracts.Contracts` on uvloop, in a thread); its base URL."""
    from gateway.authz.contracts import Contracts
    from support.wire import serving

    assert runtime.authz is not None
    authz, metrics, limits = runtime.authz, Metrics(CollectorRegistry()), Limits()

    def opened() -> Callable[[Request], None]:
        return Contracts(runtime, metrics, limits, authz).handle

    with serving(opened, limits, 64, metrics, "the in-process decision service") as port:
        yield f"http://127.0.0.1:{port}"
