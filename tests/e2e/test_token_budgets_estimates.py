"""An upstream that sends no usage is charged an estimate, flagged: the stub with ``--no-usage``.

One gateway (budgets in memory) in front of the stub started with ``--no-usage``: a whole answer and a
stream, neither carrying usage, through the real SDK. Each is charged what was relayed, flagged as an
estimate in the access log and on ``regiongate_tokens_total``; the budget still refuses once the
estimates have spent it.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from support.processes import CITY, GatewayFactory, run_stub

pytestmark = pytest.mark.e2e

POLICY = """version: 1
defaults: {action: allow, unknown: allow, private: allow, invalid: deny, missing: allow}
rules:
  - name: estimated
    models: [m]
    action: allow
    token_limit: [{tokens: 2000, per: 1d, by: [rule], kind: quota}]
"""


def test_an_upstream_without_usage_is_charged_an_estimate(gateway: GatewayFactory, tmp_path: Path) -> None:
    policy = tmp_path / "estimated.yaml"
    policy.write_text(POLICY)
    with run_stub("--no-usage") as stub:
        gw = gateway("--policy", str(policy), "--geoip", CITY, "--upstream", stub.url)
        sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-x", max_retries=0)
        whole = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=50)
        assert whole.usage is None and whole.choices[0].message.content
        chunks = list(
            sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=50, stream=True
            )
        )
        assert chunks and all(c.usage is None for c in chunks)
        lines = gw.wait_log(2)
        assert [line["usage"]["source"] for line in lines] == ["estimate", "estimate"]
        assert all(line["usage"]["output"] > 0 and line["usage"]["input"] > 0 for line in lines)
        metrics = gw.metrics()
        assert 'source="estimate"' in metrics and "regiongate_tokens_total{" in metrics
        assert not [
            m for m in metrics.splitlines() if m.startswith("regiongate_tokens_total{") and 'source="usage"' in m
        ]
        # The estimates are charged: a request whose reservation no longer fits is refused as a quota.
        spent = sum(line["usage"]["input"] + line["usage"]["output"] for line in lines)
        with pytest.raises(openai.RateLimitError) as e:
            sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2000 - spent
            )
        assert e.value.code == "insufficient_quota"
