"""The shipped routing examples: their own tests pass, and they do what docs/routing.md says with real processes
(their public upstream URLs swapped for local recording upstreams, nothing else changed)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.policy import json_schema
from gateway.yamlfile import load
from support.processes import CITY, POLICIES, GatewayFactory, RawUpstream, write

EXAMPLES = sorted((POLICIES / "examples").glob("*.yaml"))
TRUST = ["--trusted-proxy", "127.0.0.1/32"]
KEYS = {
    "OPENAI_API_KEY": "sk-openai-test",
    "OPENAI_EU_API_KEY": "sk-eu-test",
    "OPENAI_US_API_KEY": "sk-us-test",
    "OPENAI_AE_API_KEY": "sk-ae-test",
    "QWEN_API_KEY": "sk-qwen-test",
}


def test_the_examples_are_shipped() -> None:
    assert [p.name for p in EXAMPLES] == ["eu-residency.yaml", "migrate-blocked-regions.yaml", "token-budgets.yaml"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
@pytest.mark.parametrize("geoip", [[], ["--geoip", CITY]], ids=["embedded", "city"])
@pytest.mark.e2e
def test_each_example_passes_regiongate_check(path: Path, geoip: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(path), *geoip], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert ": ok: " in r.stdout and "FAILED" not in r.stdout
    with open(path) as f:
        jsonschema.validate(load(f.read(), str(path)).data, json_schema())


def requests_of(up: RawUpstream) -> list[tuple[dict[bytes, bytes], bytes]]:
    return [(sent.headers, sent.body) for sent in up.requests()]


def local_copy(tmp_path: Path, name: str, urls: dict[str, str]) -> str:
    text = (POLICIES / "examples" / name).read_text()
    for public, local in urls.items():
        assert public in text
        text = text.replace(public, local)
    return write(tmp_path, name, text)


@pytest.fixture
def ups() -> Iterator[dict[str, RawUpstream]]:
    made = {name: RawUpstream() for name in ("openai", "eu", "us", "ae", "qwen", "qwen-cn")}
    yield made
    for up in made.values():
        up.close()


def sdk(gw, who: str) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(
        base_url=gw.url + "/v1", api_key="sk-caller", default_headers={"X-Forwarded-For": who}, max_retries=0
    )


def test_migrate_blocked_regions_end_to_end(
    gateway: GatewayFactory, tmp_path: Path, ups: dict[str, RawUpstream]
) -> None:
    policy = local_copy(
        tmp_path,
        "migrate-blocked-regions.yaml",
        {
            "https://api.openai.com": ups["openai"].url,
            "https://dashscope-intl.aliyuncs.com/compatible-mode": ups["qwen"].url + "/compatible-mode",
            "https://dashscope.aliyuncs.com/compatible-mode": ups["qwen-cn"].url + "/compatible-mode",
        },
    )
    gw = gateway("--policy", policy, "--geoip", CITY, *TRUST, env=KEYS)
    hello: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    # Mainland China: to Qwen, the model translated, Qwen's key, no caller address.
    sdk(gw, "175.16.199.1").chat.completions.create(model="gpt-4o", messages=hello)
    ((headers, body),) = requests_of(ups["qwen"])
    assert json.loads(body) == {"model": "qwen-plus", "messages": hello}
    assert headers[b"authorization"] == b"Bearer sk-qwen-test"
    assert b"x-forwarded-for" not in headers and b"x-regiongate-client-ip" not in headers
    # A model with no counterpart: OpenAI's 403, nothing sent anywhere.
    with pytest.raises(openai.PermissionDeniedError) as e:
        sdk(gw, "175.16.199.1").chat.completions.create(model="o1-preview", messages=hello)
    assert e.value.code == "model_not_allowed_in_region"
    # Great Britain stays on OpenAI with OpenAI's key and its model as sent.
    sdk(gw, "81.2.69.142").chat.completions.create(model="gpt-4o", messages=hello)
    ((headers, body),) = requests_of(ups["openai"])
    assert json.loads(body)["model"] == "gpt-4o" and headers[b"authorization"] == b"Bearer sk-openai-test"
    # Russia: neither provider.
    with pytest.raises(openai.PermissionDeniedError) as e:
        sdk(gw, "2a02:d0c0::1").chat.completions.create(model="gpt-4o", messages=hello)
    assert e.value.code == "unsupported_country_region_territory"
    assert len(requests_of(ups["qwen"])) == 1 and requests_of(ups["qwen-cn"]) == []


def test_eu_residency_end_to_end(gateway: GatewayFactory, tmp_path: Path, ups: dict[str, RawUpstream]) -> None:
    policy = local_copy(
        tmp_path,
        "eu-residency.yaml",
        {
            "https://api.openai.com": ups["openai"].url,
            "https://eu.api.openai.com": ups["eu"].url,
            "https://us.api.openai.com": ups["us"].url,
            "https://ae.api.openai.com": ups["ae"].url,
        },
    )
    gw = gateway("--policy", policy, "--geoip", CITY, *TRUST, env=KEYS)
    # DE, SE | GB, CH | US
    for who in ("2a02:d180::1", "89.160.20.112", "81.2.69.142", "2a02:d000::1", "216.160.83.56"):
        r = httpx.post(gw.url + "/v1/embeddings", json={"model": "m", "input": "x"}, headers={"X-Forwarded-For": who})
        assert r.status_code == 200
    assert [h[b"authorization"] for h, _ in requests_of(ups["eu"])] == [b"Bearer sk-eu-test"] * 2
    assert [h[b"authorization"] for h, _ in requests_of(ups["openai"])] == [b"Bearer sk-openai-test"] * 2
    assert [h[b"authorization"] for h, _ in requests_of(ups["us"])] == [b"Bearer sk-us-test"]
    assert requests_of(ups["ae"]) == []
    r = httpx.post(gw.url + "/v1/embeddings", json={"model": "m"}, headers={"X-Forwarded-For": "175.16.199.1"})
    assert r.status_code == 403
