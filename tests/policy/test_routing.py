"""Upstream groups, fallback and failover, passive health, upstream region refusals, per-upstream auth and
client address: real gateway and stub processes, real sockets, the real openai SDK.

Until rules can route (``action: route``), the ``default`` upstream is made a group (``urls:``) with its
own ``fallback:``; an ``allow`` rule sends GB callers to it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.policy import parse_policy
from gateway.stub import REGION_REFUSAL
from gateway.yamlfile import FileError
from support.live import wait_until, write_by_rename
from support.processes import CITY, Gateway, GatewayFactory, Stub, free_port, run_stub, unanswered_port, write

TRUST = ["--trusted-proxy", "127.0.0.1/32"]
GB = "2.125.160.216"
FROM_GB = {"X-Forwarded-For": GB}
CHAT: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def routed(gateway: GatewayFactory, tmp_path: Path, upstreams: str, env: dict[str, str] | None = None) -> Gateway:
    """A gateway whose policy has these ``upstreams:`` (YAML lines, indented two spaces) and lets GB in."""
    text = (
        f"version: 1\nupstreams:\n{upstreams}\ndefaults: {{action: deny, unknown: deny}}\n"
        "rules:\n  - {name: gb, countries: [GB], action: allow}\n"
    )
    return gateway("--policy", write(tmp_path, "p.yaml", text), "--geoip", CITY, *TRUST, env=env)


def with_fallback(gateway: GatewayFactory, tmp_path: Path, first: str, then: str, name: str = "backup") -> Gateway:
    """``default`` at ``first``, falling back to upstream ``name`` at ``then``."""
    return routed(gateway, tmp_path, f'  default: {{url: "{first}", fallback: [{name}]}}\n  {name}: {{url: "{then}"}}')


def dead_url() -> str:
    """A loopback port nothing listens on: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


def sdk(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-client", default_headers=FROM_GB, max_retries=0)


def metric(gw: Gateway, name: str, **labels: str) -> float:
    """One sample's value (0 when absent); ``labels`` must be all of its labels."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in gw.metrics().splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def stub_503() -> Iterator[Stub]:
    with run_stub("--status", "503") as s:
        yield s


@pytest.fixture
def refusing() -> Iterator[Stub]:
    with run_stub("--refuse-region") as s:
        yield s


# --- groups and failover ------------------------------------------------------------------------


def test_second_url_serves_when_the_first_refuses_connections(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path
) -> None:
    dead = dead_url()
    gw = routed(gateway, tmp_path, f'  default: {{urls: ["{dead}", "{stub.url}"]}}')
    answer = sdk(gw).chat.completions.create(**CHAT)
    assert answer.choices[0].message.content
    assert stub.stats()["requests"] == 1
    (entry,) = gw.wait_log(1)
    assert entry["upstream"] == "default" and entry["target"] == "default/1" and entry["status"] == 200
    assert entry["failovers"] == [{"from": "default/0", "to": "default/1", "reason": "connect_error"}]
    assert (
        metric(gw, "regiongate_failovers_total", **{"from": "default/0", "to": "default/1"}, reason="connect_error")
        == 1
    )
    assert metric(gw, "regiongate_upstream_requests_total", upstream="default", target="0", status_class="error") == 1
    assert metric(gw, "regiongate_upstream_requests_total", upstream="default", target="1", status_class="2xx") == 1
    assert httpx.get(gw.admin + "/readyz").json()["upstreams"] == {"default": [dead, stub.url]}


def test_connect_timeout_fails_over(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    with unanswered_port() as port:
        gw = routed(
            gateway,
            tmp_path,
            f'  default: {{urls: ["http://127.0.0.1:{port}", "{stub.url}"], timeouts: {{connect: 0.5}}}}',
        )
        assert httpx.get(gw.url + "/v1/models", headers=FROM_GB, timeout=20).status_code == 200
    (entry,) = gw.wait_log(1)
    assert entry["failovers"] == [{"from": "default/0", "to": "default/1", "reason": "connect_timeout"}]


def test_failover_on_503_sends_the_same_body_to_the_fallback(
    gateway: GatewayFactory, stub: Stub, stub_503: Stub, tmp_path: Path
) -> None:
    gw = with_fallback(gateway, tmp_path, stub_503.url, stub.url)
    body = b'{"z": 1, "model": "gpt-4o", "a": [1, 2]}'
    r = httpx.post(gw.url + "/echo/x", content=body, headers={**FROM_GB, "content-type": "application/json"})
    assert r.status_code == 200
    assert r.json()["body"] == body.decode() and r.json()["body_length"] == len(body)
    assert stub_503.stats()["requests"] == 1 and stub.stats()["requests"] == 1
    (entry,) = gw.wait_log(1)
    assert entry["target"] == "backup/0"
    assert entry["failovers"] == [{"from": "default/0", "to": "backup/0", "reason": "status_503"}]
    assert metric(gw, "regiongate_failovers_total", **{"from": "default/0", "to": "backup/0"}, reason="status_503") == 1
    assert metric(gw, "regiongate_upstream_requests_total", upstream="default", target="0", status_class="5xx") == 1
    assert metric(gw, "regiongate_upstream_requests_total", upstream="backup", target="0", status_class="2xx") == 1


def test_503_passes_through_when_nothing_is_left_to_try(
    gateway: GatewayFactory, stub_503: Stub, tmp_path: Path
) -> None:
    gw = routed(gateway, tmp_path, f'  default: {{url: "{stub_503.url}"}}')
    with pytest.raises(openai.InternalServerError) as e:
        sdk(gw).chat.completions.create(**CHAT)
    assert e.value.status_code == 503 and e.value.code == "stub"
    (entry,) = gw.wait_log(1)
    assert "failovers" not in entry and entry["target"] == "default/0"


def test_no_failover_after_the_first_byte(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    with run_stub() as backup:
        gw = with_fallback(gateway, tmp_path, stub.url, backup.url)
        stream = sdk(gw).chat.completions.create(**CHAT, stream=True, extra_headers={"x-stub-cut-after": "3"})
        with pytest.raises(openai.APIError) as e:
            for _ in stream:
                pass
        assert "ended the stream early" in str(e.value)
        assert backup.stats()["requests"] == 0
    (entry,) = gw.wait_log(1)
    assert entry["error"] == "upstream_stream_interrupted" and entry["target"] == "default/0"
    assert "failovers" not in entry


def test_a_streamed_upload_is_never_sent_twice(
    gateway: GatewayFactory, stub: Stub, stub_503: Stub, tmp_path: Path
) -> None:
    """A chunked body larger than the held buffer (64 KiB) went up once; the first upstream's 503 stands."""
    gw = with_fallback(gateway, tmp_path, stub_503.url, stub.url)

    r = httpx.post(gw.url + "/echo/upload", content=(b"x" * 4096 for _ in range(64)), headers=FROM_GB)
    assert r.status_code == 503 and r.json()["error"]["code"] == "stub"
    assert stub_503.stats()["requests"] == 1
    assert stub.stats()["requests"] == 0
    (entry,) = gw.wait_log(1)
    assert "failovers" not in entry and entry["target"] == "default/0"


def test_a_small_chunked_upload_is_held_and_sent_again(
    gateway: GatewayFactory, stub: Stub, stub_503: Stub, tmp_path: Path
) -> None:
    gw = with_fallback(gateway, tmp_path, stub_503.url, stub.url)

    r = httpx.post(gw.url + "/echo/upload", content=iter([b"first,", b"second"]), headers=FROM_GB)
    assert r.status_code == 200 and r.json()["body"] == "first,second"
    assert stub.stats()["requests"] == 1


# --- passive health -------------------------------------------------------------------------------


def test_an_ejected_url_is_skipped_then_tried_again_after_its_backoff(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path
) -> None:
    dead = dead_url()
    gw = routed(
        gateway,
        tmp_path,
        f'  default: {{urls: ["{dead}", "{stub.url}"], health: {{failures: 1, backoff: 5s, max_backoff: 10s}}}}',
    )
    tried_dead = {"from": "default/0", "to": "default/1", "reason": "connect_error"}
    # 1: the first URL refuses, and is ejected (one failure is enough here).
    assert httpx.get(gw.url + "/v1/models", headers=FROM_GB).status_code == 200
    # 2: while it is ejected, the request goes straight to the second.
    assert httpx.get(gw.url + "/v1/models", headers=FROM_GB).status_code == 200
    first, second = gw.wait_log(2)
    assert first["failovers"] == [tried_dead]
    assert "failovers" not in second and second["target"] == "default/1"

    # After the backoff the first URL is tried again, by itself.
    def retried() -> bool:
        assert httpx.get(gw.url + "/v1/models", headers=FROM_GB).status_code == 200
        return any(e.get("failovers") == [tried_dead] for e in gw.log_lines()[2:])

    wait_until(retried, "the ejected URL tried again after its backoff", attempts=200, pause=0.2)
    assert stub.stats()["requests"] >= 3


def test_what_health_learnt_survives_a_reload_that_keeps_the_url(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path
) -> None:
    dead = dead_url()
    gw = routed(
        gateway, tmp_path, f'  default: {{urls: ["{dead}", "{stub.url}"], health: {{failures: 1, backoff: 10m}}}}'
    )
    assert httpx.get(gw.url + "/v1/models", headers=FROM_GB).status_code == 200
    policy = tmp_path / "p.yaml"
    write_by_rename(policy, policy.read_text() + "revision: two\n")
    wait_until(lambda: httpx.get(gw.admin + "/readyz").json()["policy"]["version"] == "two", "the reload")
    assert httpx.get(gw.url + "/v1/models", headers=FROM_GB).status_code == 200
    first, second = gw.wait_log(2)
    assert first["failovers"] == [{"from": "default/0", "to": "default/1", "reason": "connect_error"}]
    assert "failovers" not in second and second["target"] == "default/1"  # still ejected


def test_all_urls_ejected_are_still_tried(gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = routed(
        gateway,
        tmp_path,
        f'  default: {{urls: ["{dead_url()}", "{dead_url()}"], health: {{failures: 1, backoff: 1m}}}}',
    )
    for _ in range(2):
        r = httpx.get(gw.url + "/v1/models", headers=FROM_GB)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
    first, second = gw.wait_log(2)
    both = [{"from": "default/0", "to": "default/1", "reason": "connect_error"}]
    assert first["failovers"] == both
    assert second["failovers"] == both  # both ejected by then: both tried anyway, in order


# --- upstream region refusals ---------------------------------------------------------------------


def test_region_refusal_fails_over_and_is_counted_and_logged(
    gateway: GatewayFactory, stub: Stub, refusing: Stub, tmp_path: Path
) -> None:
    gw = with_fallback(gateway, tmp_path, refusing.url, stub.url, "other")
    for _ in range(2):
        assert sdk(gw).chat.completions.create(**CHAT).choices[0].message.content
    assert metric(gw, "regiongate_upstream_region_refusals_total", upstream="default") == 2
    assert (
        metric(gw, "regiongate_failovers_total", **{"from": "default/0", "to": "other/0"}, reason="region_refusal") == 2
    )
    assert metric(gw, "regiongate_upstream_requests_total", upstream="default", target="0", status_class="4xx") == 2
    warnings = wait_until(lambda: re.findall(r".*refuses the gateway's region.*", gw.stderr()), "the warning")
    assert len(warnings) == 1  # once a minute per upstream, however many refusals
    assert "Country, region, or territory not supported" in warnings[0] and "default" in warnings[0]


def test_region_refusal_passes_through_unchanged_when_nothing_is_left(
    gateway: GatewayFactory, refusing: Stub, tmp_path: Path
) -> None:
    gw = routed(gateway, tmp_path, f'  default: {{url: "{refusing.url}"}}')
    r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=FROM_GB)
    assert r.status_code == 403
    assert r.content == REGION_REFUSAL
    assert "aiohttp" in r.headers["server"]  # the upstream's answer, not the gateway's own refusal
    with pytest.raises(openai.PermissionDeniedError) as e:
        sdk(gw).chat.completions.create(**CHAT)
    assert e.value.code == "unsupported_country_region_territory"
    assert metric(gw, "regiongate_upstream_region_refusals_total", upstream="default") == 2
    wait_until(lambda: "refuses the gateway's region" in gw.stderr(), "the warning")
    entries = gw.wait_log(2)
    assert [e["decision"] for e in entries] == ["allow", "allow"]


def test_other_403s_are_passed_on_as_they_came(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    with run_stub() as backup:
        gw = with_fallback(gateway, tmp_path, stub.url, backup.url, "b")
        r = httpx.get(gw.url + "/v1/models", headers={**FROM_GB, "x-stub-status": "403"})
        assert r.status_code == 403 and r.json()["error"]["message"] == "stub error 403"
        assert backup.stats()["requests"] == 0
    assert metric(gw, "regiongate_upstream_region_refusals_total", upstream="default") == 0


# --- what each upstream is told -------------------------------------------------------------------


def echoed(r: httpx.Response) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in r.json()["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


def test_client_address_drop_sends_no_address(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = routed(gateway, tmp_path, f'  default: {{url: "{stub.url}", client_address: drop}}')
    r = httpx.get(gw.url + "/echo/x", headers={"X-Forwarded-For": f"6.6.6.6, {GB}", "X-Real-IP": GB})
    assert r.status_code == 200
    headers = echoed(r)
    for name in ("x-forwarded-for", "x-regiongate-client-ip", "x-real-ip", "forwarded"):
        assert name not in headers


def test_client_address_forward_is_the_default(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = routed(gateway, tmp_path, f'  default: {{url: "{stub.url}"}}')
    headers = echoed(httpx.get(gw.url + "/echo/x", headers=FROM_GB))
    assert headers["x-forwarded-for"] == [f"{GB}, 127.0.0.1"]
    assert headers["x-regiongate-client-ip"] == [GB]


def test_azure_style_auth_header(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    secret = "az-key-4711-secret"
    gw = routed(
        gateway,
        tmp_path,
        f'  default: {{url: "{stub.url}", api_key_env: AZ_KEY, auth: {{header: api-key, format: "{{key}}"}}}}',
        env={"AZ_KEY": secret},
    )
    r = httpx.get(gw.url + "/echo/x", headers={**FROM_GB, "Authorization": "Bearer sk-client", "api-key": "mine"})
    headers = echoed(r)
    assert headers["api-key"] == [secret]
    assert "authorization" not in headers
    assert secret not in httpx.get(gw.admin + "/readyz").text
    assert secret not in gw.metrics()
    assert secret not in gw.stderr()
    assert secret not in gw.access_log.read_text()


def test_bearer_format_with_a_prefix(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    gw = routed(
        gateway,
        tmp_path,
        f'  default: {{url: "{stub.url}", api_key_env: K, auth: {{header: X-Api-Token, format: "Token {{key}}"}}}}',
        env={"K": "abc"},
    )
    headers = echoed(httpx.get(gw.url + "/echo/x", headers={**FROM_GB, "Authorization": "Bearer sk-client"}))
    assert headers["x-api-token"] == ["Token abc"] and "authorization" not in headers


# --- policy errors name file and line ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstreams", "line", "message"),
    [
        ('  default: {url: "http://a", fallback: [nope]}', 3, "upstreams.default.fallback: no upstream named 'nope'"),
        ('  default: {url: "http://a", fallback: [default]}', 3, "'default' is this upstream itself"),
        (
            '  default: {url: "http://a", fallback: [b]}\n  b: {url: "http://b", fallback: [c]}\n'
            '  c:\n    url: "http://c"\n    fallback: [default]',
            7,
            "a cycle: default -> b -> c -> default",
        ),
        ('  default: {url: "http://a", urls: ["http://b"]}', 3, "give either url (one URL) or urls"),
        ("  default: {api_key_env: K}", 3, "give either url (one URL) or urls"),
        (
            '  default:\n    url: "http://a"\n    api_key_env: K\n    auth: {format: "Bearer"}',
            6,
            "'{key}' exactly once",
        ),
        (
            '  default:\n    url: "http://a"\n    api_key_env: K\n    auth: {header: "bad header"}',
            6,
            "HTTP header name",
        ),
        ('  default:\n    url: "http://a"\n    auth: {header: api-key}', 5, "auth: needs api_key_env"),
        ('  default:\n    urls: ["http://a", "ftp://b"]', 4, "must be an http:// or https:// URL"),
        ('  default:\n    url: "http://a"\n    client_address: hide', 5, "is not one of 'forward' or 'drop'"),
        ('  default:\n    url: "http://a"\n    health: {backoff: 1m, max_backoff: 10s}', 5, "max_backoff is shorter"),
    ],
)
def test_policy_errors_name_file_and_line(upstreams: str, line: int, message: str) -> None:
    with pytest.raises(FileError) as e:
        parse_policy(f"version: 1\nupstreams:\n{upstreams}\n", "p.yaml")
    text = e.value.render()
    assert f"p.yaml:{line}:" in text and message in text, text


def test_startup_refuses_a_fallback_cycle_with_file_and_line(gateway: GatewayFactory, tmp_path: Path) -> None:
    text = (
        'version: 1\nupstreams:\n  default: {url: "http://127.0.0.1:9", fallback: [b]}\n'
        '  b: {url: "http://127.0.0.1:9", fallback: [default]}\n'
    )
    path = write(tmp_path, "cycle.yaml", text)
    gw = gateway("--policy", path, "--geoip", CITY, wait=False)
    assert gw.proc.wait(timeout=30) != 0
    assert f"{path}:4:" in gw.stderr() and "a cycle: default -> b -> default" in gw.stderr()
    assert "Traceback" not in gw.stderr()


def test_fallback_to_default_from_the_command_line(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    """``default`` may come from --upstream; a policy upstream can still name it as its fallback."""
    dead = dead_url()
    path = write(tmp_path, "p.yaml", f'version: 1\nupstreams:\n  eu: {{url: "{dead}", fallback: [default]}}\n')
    gw = gateway("--policy", path, "--geoip", CITY, "--upstream", stub.url)
    assert httpx.get(gw.admin + "/readyz").json()["upstreams"] == {"eu": dead, "default": stub.url}


# --- a held body, renamed per upstream (body_for) ---------------------------------------------------


def test_each_upstream_gets_its_own_body_with_its_length(
    gateway: GatewayFactory, stub: Stub, stub_503: Stub, tmp_path: Path
) -> None:
    """A body read for its model goes to each upstream tried as that upstream's bytes, with their own length:
    renamed for the one with a model map, as the client wrote it for the fallback without one."""
    text = (
        f'version: 1\nupstreams:\n  default: {{url: "{stub_503.url}", models: {{gpt-4o: qwen-plus}}, '
        f'fallback: [backup]}}\n  backup: {{url: "{stub.url}"}}\n'
        "rules:\n  - {name: gb, countries: [GB], action: allow}\n"
    )
    gw = gateway("--policy", write(tmp_path, "p.yaml", text), "--geoip", CITY, *TRUST)
    body = '{"model": "gpt-4o", "n": 1}'
    r = httpx.post(gw.url + "/echo/x", content=body, headers={**FROM_GB, "content-type": "application/json"})
    assert r.status_code == 200
    assert r.json()["body"] == body
    headers = echoed(r)
    assert headers["content-length"] == [str(len(body))]
    assert "transfer-encoding" not in headers
    (entry,) = gw.wait_log(1)
    assert entry["failovers"] == [{"from": "default/0", "to": "backup/0", "reason": "status_503"}]
    assert entry["model"] == "gpt-4o"


# --- the pieces, on their own -----------------------------------------------------------------------


def test_chain_order_is_own_urls_then_each_fallback_depth_first() -> None:
    from gateway.proxy.upstreams import build_upstreams

    text = (
        "version: 1\nupstreams:\n"
        '  default: {urls: ["http://a0", "http://a1"], fallback: [b, c]}\n'
        '  b: {url: "http://b0", fallback: [d]}\n'
        '  c: {url: "http://c0", fallback: [d]}\n'
        '  d: {url: "http://d0"}\n'
    )
    groups = build_upstreams(parse_policy(text, "p.yaml").upstreams, {})
    assert [m.label for m in groups["default"].chain] == ["default/0", "default/1", "b/0", "d/0", "c/0"]
    assert [m.label for m in groups["c"].chain] == ["c/0", "d/0"]
    assert [m.label for m in groups["d"].chain] == ["d/0"]


def test_health_ejects_doubles_caps_and_resets() -> None:
    from gateway.dataplane.health import Health
    from gateway.policy import HealthSpec
    from gateway.proxy.upstreams import health

    h = Health(health(HealthSpec(failures=2, backoff="1s", max_backoff="3s")))
    h.failed(now=100)
    assert not h.ejected(100)  # one failure of two
    h.failed(now=100)
    assert h.ejected(100.5) and not h.ejected(101)  # ejected for 1 s
    h.failed(now=100.5)  # a request still under way when it was ejected: no longer
    assert not h.ejected(101)
    h.failed(now=101)  # back, and failing again: 2 s at once
    assert h.ejected(102.9) and not h.ejected(103)
    h.failed(now=103)
    assert h.ejected(105.9) and not h.ejected(106)  # 4 s capped to 3 s
    h.ok()
    h.failed(now=200)
    assert not h.ejected(200)  # a success resets the count and the backoff
    h.failed(now=200)
    assert h.ejected(200.9) and not h.ejected(201)
    # Left out, max_backoff is 60 s, or backoff if that is longer.
    assert HealthSpec(backoff="10m").max_backoff_seconds == 600
    assert HealthSpec(backoff="2s").max_backoff_seconds == 60


def test_region_refusal_is_read_from_plain_and_compressed_bodies() -> None:
    import gzip
    import zlib

    from gateway.dataplane.failover import region_refusal

    message = "Country, region, or territory not supported"
    assert region_refusal(REGION_REFUSAL, None) == message
    assert region_refusal(gzip.compress(REGION_REFUSAL), b"gzip") == message
    assert region_refusal(zlib.compress(REGION_REFUSAL), b"deflate") == message
    assert region_refusal(REGION_REFUSAL, b"br") is None  # cannot be read: passed on as it came
    assert region_refusal(b'{"error": {"code": "model_not_found", "message": "x"}}', None) is None
    assert region_refusal(b"<html>forbidden</html>", None) is None
    assert region_refusal(b'["error"]', None) is None
    assert region_refusal(b'{"error": {"code": "unsupported_country_region_territory"}}', None) == ""


def test_a_key_that_cannot_go_in_a_header_is_refused_without_showing_it() -> None:
    from gateway.proxy.upstreams import UpstreamConfigError, build_upstreams

    specs = parse_policy('version: 1\nupstreams:\n  default: {url: "http://a", api_key_env: K}\n', "p.yaml").upstreams
    with pytest.raises(UpstreamConfigError) as e:
        build_upstreams(specs, {"K": "sk-line1\nX-Evil: 1"})
    assert "cannot go in a header" in str(e.value) and "sk-line1" not in str(e.value)
    (member,) = build_upstreams(specs, {"K": "sk-ok"})["default"].members
    assert member.auth == (b"authorization", b"Bearer sk-ok")
    assert "sk-ok" not in repr(member)
