"""A gateway with no token budget records the provider's usage of every answer: the real ``openai`` SDK
through a gateway process to the bundled stub, non-streamed and a stream with ``include_usage``; the
tokens the SDK was told are the ones in ``/metrics`` and the access log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from support.overrides import wait_for
from support.processes import CITY, Gateway, GatewayFactory, Stub, run_stub

pytestmark = pytest.mark.e2e

POLICY = """version: 1
defaults: {{action: allow, unknown: allow, private: allow, invalid: deny, missing: allow}}
upstreams:
  default: {{url: "{stub}"}}
rules:
  - name: everyone
    countries: [GB]
    action: allow
"""
GB = "81.2.69.142"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("observed")
    with run_stub() as stub:
        yield from _gateway(tmp, stub)


def _gateway(tmp: Path, stub: Stub) -> Iterator[Gateway]:
    policy = tmp / "plain.yaml"
    policy.write_text(POLICY.format(stub=stub.url))
    factory = GatewayFactory(tmp)
    try:
        yield factory("--policy", str(policy), "--geoip", CITY, "--trusted-proxy", "127.0.0.1/32")
    finally:
        factory.close()


def tokens(gw: Gateway, kind: str) -> float:
    total = 0.0
    for line in gw.metrics().splitlines():
        if line.startswith("regiongate_tokens_total{") and f'kind="{kind}"' in line and 'source="usage"' in line:
            assert 'country="GB"' in line, line
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_usage_is_recorded_without_a_budget(gw: Gateway) -> None:
    client = openai.OpenAI(
        base_url=gw.url + "/v1", api_key="sk-test", default_headers={"x-forwarded-for": GB}, max_retries=0
    )
    whole = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello."}])
    chunks: list[Any] = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Count to three, please."}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    told = [whole.usage, chunks[-1].usage]
    assert all(u is not None for u in told)
    lines: list[dict[str, Any]] = []

    def logged() -> bool:
        lines[:] = [line for line in gw.log_lines() if line.get("status") == 200]
        return len(lines) >= 2

    wait_for(logged, 10, "two access-log lines")
    assert [line["usage"] for line in lines] == [
        {"input": u.prompt_tokens, "output": u.completion_tokens, "source": "usage"} for u in told if u is not None
    ]
    assert tokens(gw, "input") == sum(u.prompt_tokens for u in told if u is not None)
    assert tokens(gw, "output") == sum(u.completion_tokens for u in told if u is not None)
