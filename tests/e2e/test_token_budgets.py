"""Token budgets end to end (issue 19's "Done means"): real gateways, a real redis-server (single and
Cluster), the real ``openai`` SDK (sync and async, streamed and not) and the bundled stub.

Two gateways share one Redis in a module-scoped fixture; each check spends a budget of its own by
naming its own rule (rules here are chosen by the request's model, so a check's model is its
budget), and a check that needs client keys issues its own. The Cluster pair races for one budget
the same way. Redis killed mid-run has its own gateways (tests/e2e/test_token_budgets_redis.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.policy.tokenlimit import TokenLimit, cost
from gateway.usage.estimate import input_tokens
from support.overrides import wait_for
from support.processes import CITY, Gateway, GatewayFactory, Stub, run_stub
from support.redis_server import RedisServer, running

pytestmark = pytest.mark.e2e

GB = "2.125.160.216"
FROM_GB = {"X-Forwarded-For": GB}
ADMIN = "test-admin-token-budgets"
OPERATOR_KEY = "sk-operator-upstream-key"
RACE_BUDGET = 1500  # tokens: about ten of the race's fifty requests fit
RACE_MAX_TOKENS = 100

POLICY = """version: 1
redis: {{on_error: closed}}
upstreams:
  default: {{url: "{stub}"}}
  operator: {{url: "{stub}", api_key_env: E2E_OPERATOR_KEY, client_keys: required}}
defaults: {{action: allow, unknown: allow, private: allow, invalid: deny, missing: allow}}
rules:
  - name: race
    models: [race]
    action: allow
    token_limit: [{{tokens: {race}, per: 1h, by: [rule], kind: quota}}]
  - name: streamed
    models: [streamed]
    action: allow
    token_limit: [{{tokens: 10000000, per: 1h, by: [rule]}}]
  - name: quota
    models: [quota]
    action: allow
    token_limit: [{{tokens: 1000, per: 1d, by: [rule], kind: quota}}]
  - name: rate
    models: [rate]
    action: allow
    token_limit: [{{tokens: 1000, per: 4s, by: [rule]}}]
  - name: streams
    models: [streams]
    action: allow
    max_concurrent: {{streams: 2, by: [rule]}}
  - name: keyed
    models: [keyed]
    action: route
    upstream: operator
    token_limit: [{{tokens: 1000, per: 1d, by: [api_key], kind: quota}}]
    rate_limit: {{requests: 8, per: 1h, by: api_key}}
"""


@dataclass
class Pair:
    """Two gateways sharing one Redis, and the stub behind them."""

    a: Gateway
    b: Gateway
    stub: Stub
    redis: list[RedisServer]

    def sdk(self, gw: Gateway, key: str = "sk-client", retries: int = 0) -> openai.OpenAI:
        return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=retries, default_headers=FROM_GB)


@contextlib.contextmanager
def pair(tmp: Path, stub: Stub, redis: list[RedisServer], url: str) -> Iterator[Pair]:
    policy = tmp / "budgets.yaml"
    policy.write_text(POLICY.format(stub=stub.url, race=RACE_BUDGET))
    factory = GatewayFactory(tmp)
    args = (
        "--policy", str(policy), "--geoip", CITY, "--trusted-proxy", "127.0.0.1/32",
        "--redis", url, "--redis-prefix", f"e2e{time.monotonic_ns()}:",
        # Counted to the token: no check may fall back to on_error because a loaded machine answered late.
        "--redis-timeout", "2",
    )  # fmt: skip
    env = {"REGIONGATE_ADMIN_TOKEN": ADMIN, "E2E_OPERATOR_KEY": OPERATOR_KEY}
    try:
        a, b = factory(*args, env=env), factory(*args, env=env)
        a.wait_redis()
        b.wait_redis()
        yield Pair(a, b, stub, redis)
    finally:
        factory.close()


@pytest.fixture(scope="module")
def stub_server() -> Iterator[Stub]:
    with run_stub() as s:
        yield s


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, stub_server: Stub) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("budgets-single")
    with running(tmp / "redis") as redis, pair(tmp, stub_server, [redis], redis.url) as p:
        yield p


@pytest.fixture(scope="module")
def clustered(tmp_path_factory: pytest.TempPathFactory, stub_server: Stub) -> Iterator[Pair]:
    from support.redis_server import cluster

    tmp = tmp_path_factory.mktemp("budgets-cluster")
    with cluster(tmp) as nodes:
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes)
        with pair(tmp, stub_server, nodes, url) as p:
            yield p


# --- helpers ----------------------------------------------------------------------------------


def chat(model: str, max_tokens: int, content: str = "Count to three.", **more: Any) -> bytes:
    """A request body as bytes, so a test can work out what the gateway reserves for it."""
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **more}
    ).encode()


def reserved(body: bytes, model: str, max_tokens: int, limit: TokenLimit) -> int:
    """What the gateway reserves for ``body`` under ``limit``: the documented estimate."""
    return cost(limit, input_tokens(body, model), max_tokens)


def lines_for(gw: Gateway, model: str, count: int) -> list[dict[str, Any]]:
    """The access-log lines of requests for ``model``, once there are at least ``count``."""
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        found[:] = [line for line in gw.log_lines() if line.get("model") == model]
        return len(found) >= count

    wait_for(enough, 10, f"{count} access-log lines for {model!r}")
    return found


def tokens_metric(gw: Gateway, source: str) -> float:
    """``regiongate_tokens_total`` summed over every label but ``source``."""
    total = 0.0
    for line in gw.metrics().splitlines():
        if line.startswith("regiongate_tokens_total{") and f'source="{source}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def post(gw: Gateway, body: bytes, token: str | None = None, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {**FROM_GB, "content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return httpx.post(gw.url + path, content=body, headers=headers, timeout=30)


def answers(gw: Gateway, status: int, body: bytes, token: str | None = None) -> Callable[[], bool]:
    """A check for wait_for: ``body`` posted to ``gw`` gets ``status``."""
    return lambda: post(gw, body, token).status_code == status


def sse_bytes(url: str, body: bytes) -> bytes:
    with httpx.Client(timeout=30) as client:
        # One `created` for both answers (the stub writes the clock's second otherwise).
        headers = {**FROM_GB, "content-type": "application/json", "x-stub-created": "1764720000"}
        r = client.post(url + "/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 200, r.text
        return r.content


def usage_events(stream: bytes) -> list[dict[str, Any]]:
    """The ``usage`` of every SSE event that has one (not null)."""
    out = []
    for line in stream.split(b"\n"):
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if event.get("usage"):
                out.append(event["usage"])
    return out


# --- two gateways, one budget, fifty requests at once ---------------------------------------


def race(p: Pair, model: str) -> None:
    """Fifty requests at once, half on each gateway, for one quota of RACE_BUDGET tokens.

    The bound (docs/limits.md): the tokens admitted exceed the budget by at most the overshoot of the
    requests whose real usage exceeded their reservation. Each request here reserves its input estimate
    plus its max_tokens and the stub never answers more than max_tokens, so the overshoot is what the
    stub's input count exceeds the estimate by, summed (zero when the estimate holds).
    """
    limit = TokenLimit(model, 0, RACE_BUDGET, 3600.0, ("rule",), "total", "quota")
    bodies = [chat(model, RACE_MAX_TOKENS, f"Request {i}: count to three.") for i in range(50)]
    before = p.stub.stats()["requests"]

    async def burst() -> list[httpx.Response]:
        headers = {**FROM_GB, "content-type": "application/json"}
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(
                client.post((p.a if i % 2 else p.b).url + "/v1/chat/completions", content=body, headers=headers)
                for i, body in enumerate(bodies)
            ))  # fmt: skip

    replies = asyncio.run(burst())
    codes = [r.status_code for r in replies]
    admitted = [(body, r.json()["usage"]) for body, r in zip(bodies, replies, strict=True) if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert len(admitted) + len(refused) == 50, codes
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    used = sum(u["total_tokens"] for _, u in admitted)
    overshoot = sum(max(0, u["total_tokens"] - reserved(body, model, RACE_MAX_TOKENS, limit)) for body, u in admitted)
    assert used <= RACE_BUDGET + overshoot, (used, overshoot, len(admitted))
    # Contended and still used: some were refused, and the budget let through at least what fits reserved.
    each = max(reserved(body, model, RACE_MAX_TOKENS, limit) for body in bodies)
    assert refused and len(admitted) >= RACE_BUDGET // each, (len(admitted), each)
    # Only the admitted reached the upstream. (Either gateway alone would have admitted as many: the bound
    # above holds for the two together because they share the one budget.)
    assert p.stub.stats()["requests"] - before == len(admitted)


def test_two_gateways_hold_one_token_budget_against_fifty_at_once(single: Pair) -> None:
    race(single, "race")


def test_two_gateways_hold_one_token_budget_through_a_redis_cluster(clustered: Pair) -> None:
    race(clustered, "race")


# --- streams: counted from usage, the client's bytes untouched --------------------------------


def test_a_stream_without_include_usage_is_counted_and_reaches_its_client_byte_for_byte(single: Pair) -> None:
    body = chat("streamed", 20, stream=True)
    direct = sse_bytes(single.stub.url, body)
    via = sse_bytes(single.a.url, body)
    assert via == direct  # the injected include_usage, and its usage chunk, never reach the client
    assert usage_events(via) == []
    asked = sse_bytes(single.stub.url, chat("streamed", 20, stream=True, stream_options={"include_usage": True}))
    (usage,) = usage_events(asked)  # what the upstream reports when asked, as the gateway asked
    (line,) = lines_for(single.a, "streamed", 1)
    assert line["usage"] == {"input": usage["prompt_tokens"], "output": usage["completion_tokens"], "source": "usage"}


def test_include_usage_false_does_not_escape_counting(single: Pair) -> None:
    client = single.sdk(single.b)
    before = tokens_metric(single.b, "usage")
    chunks = list(
        client.chat.completions.create(
            model="streamed",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": False},
        )
    )
    assert chunks and all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    line = lines_for(single.b, "streamed", 1)[-1]
    assert line["usage"]["source"] == "usage" and line["usage"]["output"] > 0
    assert tokens_metric(single.b, "usage") - before == line["usage"]["input"] + line["usage"]["output"]
    # A client that asks for usage gets it, once, as the upstream sends it.
    asked = list(
        client.chat.completions.create(
            model="streamed",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert [c.usage.completion_tokens for c in asked if c.usage is not None] == [line["usage"]["output"]]


async def test_the_async_sdk_streams_through_a_budget(single: Pair) -> None:
    client = openai.AsyncOpenAI(base_url=single.a.url + "/v1", api_key="sk-x", max_retries=0, default_headers=FROM_GB)
    stream = await client.chat.completions.create(
        model="streamed", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text
    whole = await client.chat.completions.create(model="streamed", messages=[{"role": "user", "content": "Hi"}])
    assert whole.usage is not None and whole.usage.total_tokens > 0
    await client.close()


# --- the SDK's own errors: quota (not retried) and rate (retried) ------------------------------


def test_quota_and_rate_429s_are_the_sdks_errors_retried_or_not(single: Pair) -> None:
    sdk = single.sdk(single.a, retries=2)
    first = sdk.chat.completions.create(model="quota", messages=[{"role": "user", "content": "Hi"}], max_tokens=300)
    assert first.usage is not None
    left = 1000 - first.usage.total_tokens
    before = single.stub.stats()["requests"]
    with pytest.raises(openai.RateLimitError) as e:  # fits the quota, not what is left of it
        sdk.chat.completions.create(model="quota", messages=[{"role": "user", "content": "Hi"}], max_tokens=left)
    assert e.value.code == "insufficient_quota" and e.value.type == "insufficient_quota"
    assert e.value.response.headers["x-should-retry"] == "false"
    assert single.stub.stats()["requests"] == before
    quota_lines = [line for line in lines_for(single.a, "quota", 2) if line["status"] == 429]
    assert len(quota_lines) == 1  # x-should-retry: false, so the SDK did not try again

    # A rate: the first request holds most of it while the stub takes its time, so the second is refused
    # with a retry-after; with retries the SDK waits that long and gets through; without, it raises.
    slow = threading.Thread(
        target=lambda: single.sdk(single.b).chat.completions.create(
            model="rate", messages=[{"role": "user", "content": "Hi"}], max_tokens=900,
            extra_headers={"x-stub-delay": "1"},
        )
    )  # fmt: skip
    base = single.stub.stats()["requests"]
    slow.start()
    wait_for(lambda: single.stub.stats()["requests"] > base, 10, "the first rate-limited request upstream")
    with pytest.raises(openai.RateLimitError) as e:
        single.sdk(single.a).chat.completions.create(
            model="rate", messages=[{"role": "user", "content": "Hi"}], max_tokens=900
        )
    assert e.value.code == "rate_limit_exceeded" and e.value.response.headers["x-should-retry"] == "true"
    assert int(e.value.response.headers["retry-after"]) >= 1
    retried = single.sdk(single.a, retries=3).chat.completions.create(
        model="rate", messages=[{"role": "user", "content": "Hi"}], max_tokens=900
    )
    slow.join(30)
    assert retried.usage is not None
    rate_lines = lines_for(single.a, "rate", 3)
    assert [line["status"] for line in rate_lines][-1] == 200 and [ln["status"] for ln in rate_lines].count(429) >= 2
    assert single.stub.stats()["requests"] == base + 2  # the slow one and the retried one: no 429 went up


# --- concurrent streams across two gateways; a client that leaves ------------------------------


def test_concurrent_streams_hold_across_gateways_and_a_client_that_leaves_frees_its_slot(single: Pair) -> None:
    body = chat("streams", 200, stream=True)
    slow = {**FROM_GB, "content-type": "application/json", "x-stub-chunk-delay": "0.2", "x-stub-chunks": "100"}
    estimates = tokens_metric(single.a, "estimate")

    with httpx.Client(timeout=30) as ca, httpx.Client(timeout=30) as cb, contextlib.ExitStack() as streams:
        s1 = streams.enter_context(ca.stream("POST", single.a.url + "/v1/chat/completions", content=body, headers=slow))
        s2 = streams.enter_context(cb.stream("POST", single.b.url + "/v1/chat/completions", content=body, headers=slow))
        # Each stream's reader kept: a dropped generator closes its response (the client would leave).
        readers = [s.iter_raw() for s in (s1, s2)]
        for s, reader in zip((s1, s2), readers, strict=True):
            assert s.status_code == 200
            next(reader)  # under way upstream
        for gw in (single.a, single.b):
            r = post(gw, chat("streams", 5))
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text
            assert "retry-after" in r.headers
        s1.close()  # the client leaves mid-stream: its slot is released, and it is charged an estimate
        wait_for(answers(single.b, 200, chat("streams", 5)), 10, "the slot of the client that left")
    gone = [line for line in lines_for(single.a, "streams", 2) if line.get("error") == "client_disconnected"]
    assert len(gone) == 1 and gone[0]["usage"]["source"] == "estimate" and gone[0]["usage"]["output"] > 0
    assert tokens_metric(single.a, "estimate") > estimates
    # Both slots come back once the streams are over: two at once again.
    for gw in (single.a, single.b):
        wait_for(answers(gw, 200, chat("streams", 5)), 10, "the slots to come back")


# --- client keys ------------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {ADMIN}"}


def new_key(gw: Gateway, name: str) -> dict[str, str]:
    r = httpx.post(gw.admin + "/admin/keys", json={"name": name}, headers=AUTH)
    assert r.status_code == 201, r.text
    issued = r.json()
    return {"id": issued["key"]["id"], "token": issued["token"]}


def revoke(gw: Gateway, key: dict[str, str]) -> None:
    r = httpx.delete(gw.admin + f"/admin/keys/{key['id']}", headers=AUTH)
    assert r.status_code == 200, r.text


def keyed(p: Pair, gw: Gateway, token: str) -> openai.types.chat.ChatCompletion:
    """A request that reserves most of the keyed rule's 1,000-token quota, and uses a few dozen of it."""
    return p.sdk(gw, token).chat.completions.create(
        model="keyed", messages=[{"role": "user", "content": "Hi"}], max_tokens=950
    )


def test_client_keys_unknown_revoked_and_a_budget_by_the_keys_name(single: Pair) -> None:
    a, b = single.a, single.b
    with pytest.raises(openai.AuthenticationError) as e:
        keyed(single, a, "sk-made-up")
    assert e.value.code == "invalid_api_key" and e.value.status_code == 401
    team_a, team_b = new_key(a, "team-a"), new_key(a, "team-b")
    # The budget is team-a's, on both gateways, whatever token the upstream receives (the operator's).
    spent = 0
    while True:
        try:
            assert keyed(single, (a, b)[spent % 2], team_a["token"]).usage is not None
        except openai.RateLimitError as refused:
            assert refused.code == "insufficient_quota"
            break
        spent += 1
        assert spent < 20, "team-a's quota never ran out"
    assert spent >= 1
    assert keyed(single, b, team_b["token"]).usage is not None  # team-b has a budget of its own
    # A new token for the name is the same caller: team-a's budget is still spent.
    revoke(a, team_a)
    team_a = new_key(b, "team-a")
    with pytest.raises(openai.RateLimitError) as spent_already:
        keyed(single, a, team_a["token"])
    assert spent_already.value.code == "insufficient_quota"
    # So is its rate limit (8 requests an hour by api_key, counted before the budget): the name's 9th
    # request, whichever token made it, is the first the rate limit refuses.
    made = spent + 2
    assert made <= 8, made
    while made < 8:
        with pytest.raises(openai.RateLimitError) as still:
            keyed(single, (a, b)[made % 2], team_a["token"])
        assert still.value.code == "insufficient_quota"
        made += 1
    with pytest.raises(openai.RateLimitError) as rated:
        keyed(single, b, team_a["token"])
    assert rated.value.code == "rate_limit_exceeded" and rated.value.type == "requests"
    echoed = post(b, chat("keyed", 5), team_b["token"], "/echo/v1/chat/completions")
    assert echoed.status_code == 200 and OPERATOR_KEY in echoed.text and team_b["token"] not in echoed.text
    lines = lines_for(a, "keyed", 2)
    assert {line.get("caller") for line in lines if line["status"] != 401} == {"team-a"}
    # No token in Redis, the logs or the metrics: the budget's key names the key's name.
    redis_keys = single.redis[0].command("--scan")
    assert "team-a" in redis_keys
    for gw in (a, b):
        seen = redis_keys + gw.access_log.read_text() + gw.metrics()
        assert team_a["token"] not in seen and team_b["token"] not in seen

    # Revoked on one gateway, refused by both.
    revoke(a, team_b)
    revoked = time.monotonic()
    for gw in (a, b):
        wait_for(answers(gw, 401, chat("keyed", 5), team_b["token"]), 10, "the revoke")
    print(f"the revoke held on both gateways {time.monotonic() - revoked:.3f}s after it was made")

    # An API-key override names a key by its name: it holds for team-a whatever token team-a sends.
    r = httpx.post(
        a.admin + "/admin/overrides", json={"action": "deny", "api_key": "team-a", "reason": "by name"}, headers=AUTH
    )
    assert r.status_code == 201, r.text
    for gw in (a, b):
        wait_for(answers(gw, 403, chat("keyed", 5), team_a["token"]), 10, "the override")
    assert post(a, chat("keyed", 5), "sk-made-up").status_code == 401
