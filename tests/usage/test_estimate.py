"""The input estimate against real token counts of the example requests (tests/fixtures/prompts/).

tokens.json holds each request's real o200k_base and cl100k_base count, as OpenAI bills its
prompt_tokens, recorded with gpt-tokenizer (the exact command is in count_tokens.cjs; the date and
the library's version are in the file). Each request is estimated as two clients send it: compact
UTF-8 JSON (JavaScript's JSON.stringify) and Python's json.dumps default (spaces, every character
outside ASCII as a \\u escape), which the openai package sends.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from gateway.usage.estimate import CAUTIOUS, CL100K, O200K, input_tokens, output_from_bytes, output_from_text, ratios
from support.processes import ROOT

PROMPTS = ROOT / "tests" / "fixtures" / "prompts"
EXAMPLES: list[dict[str, Any]] = json.loads((PROMPTS / "prompts.json").read_text())
COUNTS: dict[str, dict[str, int]] = json.loads((PROMPTS / "tokens.json").read_text())["counts"]
MODELS = {"o200k_base": "gpt-4o", "cl100k_base": "gpt-4"}
SENT_AS: dict[str, Callable[[Any], bytes]] = {
    "compact": lambda body: json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
    "python": lambda body: json.dumps(body).encode(),
}


def test_every_example_has_a_real_count() -> None:
    assert sorted(COUNTS) == sorted(e["name"] for e in EXAMPLES)
    assert len(EXAMPLES) >= 20


@pytest.mark.parametrize("sent_as", sorted(SENT_AS))
@pytest.mark.parametrize("encoding", sorted(MODELS))
def test_the_estimate_is_never_short_and_at_most_twice_the_real_count(encoding: str, sent_as: str) -> None:
    ratios_seen = {}
    for example in EXAMPLES:
        real = COUNTS[example["name"]][encoding]
        estimate = input_tokens(SENT_AS[sent_as](example["body"]), MODELS[encoding])
        assert real * 0.95 <= estimate <= 2 * real + 20, (example["name"], real, estimate)
        ratios_seen[example["name"]] = estimate / real
    large = [r for name, r in ratios_seen.items() if COUNTS[name][encoding] >= 40]
    assert len(large) >= 8 and sum(large) / len(large) < 1.6  # on average within 60 % over, for real prompts


def test_the_family_follows_the_model_name() -> None:
    assert ratios("gpt-4o-mini") is O200K and ratios("openai/gpt-4.1") is O200K and ratios("o3-mini") is O200K
    assert ratios("gpt-4-turbo") is CL100K and ratios("gpt-3.5-turbo") is CL100K
    assert ratios("claude-3-5-sonnet") is CAUTIOUS and ratios(None) is CAUTIOUS and ratios("llama3") is CAUTIOUS


def test_output_estimates() -> None:
    assert output_from_text(0, "gpt-4o") == 0 and output_from_text(34, "gpt-4o") == 10
    assert output_from_bytes(0, True, None) == 0 and output_from_bytes(240, True, None) == 2
    assert output_from_bytes(30, False, None) == 10
    assert input_tokens(b"", None) == 0
