"""HAProxy (Debian's) with the shipped Lua action in front of a recording upstream, asking a real decision service.

One HAProxy (deploy/edges/haproxy/haproxy.cfg and regiongate.lua, as shipped but for ports and the
upstream), one ``regiongate serve --port 0 --authz-port`` with Redis, one recording upstream for the
module. The test client stands for a load balancer at 127.0.0.1 in front of HAProxy: the shipped
config's ``set-src`` line is switched on for 127.0.0.1, so HAProxy's ``src`` is the last
X-Forwarded-For hop (what the balancer saw) and everything left of it is the client's own writing.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.authz import EDGE_CLIENTS, EDGE_POLICY, Edge, error_code, running_edge, shipped
from support.live import wait_until
from support.processes import free_port, stop

pytestmark = pytest.mark.e2e

CN, GB, UA43, GB2 = (EDGE_CLIENTS[k] for k in ("CN", "GB", "UA-43", "GB-2"))
LUA = Path(__file__).resolve().parents[2] / "deploy" / "edges" / "haproxy" / "regiongate.lua"


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    with running_edge(tmp_path_factory.mktemp("haproxy-edge")) as running:
        yield running


@pytest.fixture(scope="module")
def haproxy(edge: Edge, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    port = free_port()
    directory = tmp_path_factory.mktemp("haproxy")
    upstream = f"127.0.0.1:{edge.upstream.port}"
    config = shipped(
        "haproxy/haproxy.cfg",
        {
            "lua-load /etc/haproxy/regiongate.lua": f"lua-load {LUA}",
            "bind :8080": f"bind 127.0.0.1:{port}",
            "http://127.0.0.1:9001": edge.authz,
            "# http-request set-src hdr_ip(x-forwarded-for,-1) if { src 10.0.0.0/8 }":
                "http-request set-src hdr_ip(x-forwarded-for,-1) if { src 127.0.0.1 }",
            "server openai api.openai.com:443 ssl sni str(api.openai.com) verify required "
            "ca-file /etc/ssl/certs/ca-certificates.crt": f"server openai {upstream}",
            "server openai_eu eu.api.openai.com:443 ssl sni str(eu.api.openai.com) verify required "
            "ca-file /etc/ssl/certs/ca-certificates.crt": f"server openai_eu {upstream}",
        },
    )  # fmt: skip
    (directory / "haproxy.cfg").write_text(config)
    check = subprocess.run([binary, "-c", "-f", str(directory / "haproxy.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    log = directory / "haproxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, "-db", "-f", str(directory / "haproxy.cfg")], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            assert time.monotonic() < deadline, "haproxy did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def call(haproxy: str, client: str, path: str = "/v1/models", *, spoof: str | None = None, **kw: Any) -> httpx.Response:
    """A request from ``client`` as the balancer in front of HAProxy forwards it (its hop last)."""
    forwarded = f"{spoof}, {client}" if spoof else client
    headers = {"x-forwarded-for": forwarded, **kw.pop("headers", {})}
    return httpx.request(str(kw.pop("method", "GET")), haproxy + path, headers=headers, timeout=10, **kw)


def test_callers_get_the_proxy_ports_answers_and_the_upstream_only_regiongates_facts(edge: Edge, haproxy: str) -> None:
    before = len(edge.received())
    spoofed = {"x-regiongate-country": "CN", "x-regiongate-decision": "deny", "x-regiongate-asn": "1"}
    gb = call(haproxy, GB, headers=spoofed)
    assert gb.status_code == 200, gb.text
    sent = edge.received()[before]
    assert sent.headers[b"x-regiongate-country"] == b"GB"
    assert sent.headers[b"x-regiongate-decision"] == b"allow"
    assert sent.headers[b"x-regiongate-rule"] == b"gb"
    assert sent.headers.get(b"x-regiongate-asn", b"") == b""  # the client's own is replaced, never passed on
    assert sent.headers[b"x-regiongate-policy"].decode() == edge.direct(GB).headers["x-regiongate-policy"]
    for client, rule in ((CN, "defaults.action"), (UA43, "crimea")):
        refused = call(haproxy, client)
        direct = edge.direct(client)
        assert refused.status_code == direct.status_code == 403
        assert refused.content == direct.content  # byte for byte the proxy port's OpenAI body
        assert refused.headers["content-type"] == "application/json"
        assert "x-regiongate-rule" not in refused.headers  # the proxy port's refusal: no facts for the client
        assert edge.rule(client) == rule
    files = call(haproxy, GB, "/v1/files/abc")
    assert files.status_code == 403 and edge.rule(GB, "/v1/files/abc") == "no-files"
    assert len(edge.received()) == before + 1  # refusals never reach the upstream


def test_a_spoofed_forwarded_for_counts_for_nothing(edge: Edge, haproxy: str) -> None:
    before = len(edge.received())
    refused = call(haproxy, CN, spoof=GB)  # the client wrote a GB address; the balancer saw CN
    assert refused.status_code == 403 and refused.content == edge.direct(CN).content
    assert edge.rule(CN) == "defaults.action"  # what HAProxy's request was judged by: the balancer's CN
    unknown = call(haproxy, UA43.replace("43", "44"), spoof=GB)  # not in the database: defaults.unknown
    assert unknown.status_code == 403 and edge.rule(UA43.replace("43", "44")) == "defaults.unknown"
    assert len(edge.received()) == before


def test_the_model_is_read_from_the_body(edge: Edge, haproxy: str) -> None:
    def chat(model: str) -> httpx.Response:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        return call(haproxy, GB, "/v1/chat/completions", method="POST", content=body,
                    headers={"content-type": "application/json"})  # fmt: skip

    before = len(edge.received())
    refused = chat("gpt-4o")
    assert refused.status_code == 403 and error_code(refused) == "model_not_allowed_in_region"
    allowed = chat("gpt-4o-mini")
    assert allowed.status_code == 200
    sent = edge.received()[before]
    assert sent.headers[b"x-regiongate-rule"] == b"gb-small-models"
    assert json.loads(sent.body)["model"] == "gpt-4o-mini"  # the body goes on untouched


def test_a_rate_limited_caller_gets_429_with_retry_after(edge: Edge, haproxy: str) -> None:
    codes = [call(haproxy, GB2).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    limited = call(haproxy, GB2)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    assert error_code(limited) == "rate_limit_exceeded"


def test_overrides_and_hot_reload_apply_through_haproxy(edge: Edge, haproxy: str) -> None:
    override = edge.add_override({"action": "allow", "country": "CN", "reason": "haproxy test"})
    wait_until(lambda: call(haproxy, CN).status_code == 200, "the override lets CN through HAProxy")
    edge.remove_override(override)
    wait_until(lambda: call(haproxy, CN).status_code == 403, "CN refused again")
    edge.policy.write_text(
        EDGE_POLICY.replace("rules:\n", "rules:\n  - {name: cn, countries: [CN], action: allow}\n", 1)
    )
    try:
        wait_until(lambda: call(haproxy, CN).status_code == 200, "the reloaded policy lets CN through HAProxy")
        assert edge.received()[-1].headers[b"x-regiongate-rule"] == b"cn"
    finally:
        edge.policy.write_text(EDGE_POLICY)
        wait_until(lambda: call(haproxy, CN).status_code == 403, "the policy as it was")


def test_decisions_are_counted_as_haproxy(edge: Edge, haproxy: str) -> None:
    call(haproxy, CN)
    edge.direct(CN)
    metrics = edge.gateway.metrics()
    assert 'country="CN",decision="deny",rule="defaults.action",upstream="",via="haproxy"}' in metrics

    def vias() -> set[str | None]:
        return {line.get("via") for line in edge.gateway.log_lines()}

    # forward: direct(); nginx: Edge.rule (the access log is written by its own thread, so waited for)
    wait_until(lambda: {"haproxy", "forward"} <= vias(), "the access log names each contract")
    assert vias() <= {"haproxy", "forward", "nginx"}


def test_a_service_that_cannot_answer_fails_closed(edge: Edge, haproxy: str) -> None:
    """The shipped `closed`: with Regiongate away, a 503 OpenAI-shaped, and nothing forwarded."""
    before = len(edge.received())
    edge.gateway.proc.send_signal(signal.SIGSTOP)  # the service holds its port but answers nothing
    try:
        down = call(haproxy, GB)  # the action's own timeout (1 s), not this test's, ends the wait
    finally:
        edge.gateway.proc.send_signal(signal.SIGCONT)
    assert down.status_code == 503 and error_code(down) == "authz_unavailable"
    assert len(edge.received()) == before
