"""Token counts estimated without a tokenizer: input from the request body, output from what was relayed.

Used where the provider's count is not at hand: to reserve before the request
goes up (the input side), and to charge a stream that ended without usage (the
client left, the upstream cut it, or the upstream sends none).

Bytes per token per model family, with no vocabulary shipped: a tokenizer's
vocabulary is megabytes and its exact count would still miss the provider's own
framing. The ratios are set so that an estimate rarely falls short of the real
count (a reservation that falls short lets a budget overshoot, one that runs
over only holds room a little longer): tests/usage/test_estimate.py checks them
against real o200k_base / cl100k_base counts of the example prompts in
tests/fixtures/prompts.json. The input side counts the whole body, JSON syntax
included, which adds about one token per message: OpenAI adds three per message
for its own framing, so the two roughly cancel.

A body whose text is written as JSON ``\\u`` escapes (Python's ``json.dumps``
default for anything not ASCII) has six bytes per character: each escape is
weighed as the three-byte UTF-8 character it mostly stands for.
"""

from __future__ import annotations

import math

# (model name prefix, bytes per token); the first prefix that matches wins, so longer ones come first.
_FAMILIES: tuple[tuple[str, float], ...] = (
    ("gpt-4o", 4.0),  # o200k_base
    ("chatgpt-4o", 4.0),
    ("gpt-4.1", 4.0),
    ("gpt-4.5", 4.0),
    ("gpt-5", 4.0),
    ("gpt-oss", 4.0),
    ("o1", 4.0),
    ("o3", 4.0),
    ("o4", 4.0),
    ("gpt-4", 3.6),  # cl100k_base
    ("gpt-3.5", 3.6),
    ("text-embedding", 3.6),
    ("claude", 3.2),  # Anthropic's tokenizer is not public: a more cautious ratio
)
DEFAULT = 3.2  # any other model (Llama, Mistral, Qwen, ...): their vocabularies are smaller than o200k's
SSE_BYTES_PER_TOKEN = 120  # a streamed chunk carries about one token in 120-250 bytes of JSON and framing
_ESCAPE = b"\\u"


def bytes_per_token(model: str | None) -> float:
    """The ratio for a model's family (a provider prefix such as ``openai/`` is ignored)."""
    if not model:
        return DEFAULT
    name = model.rpartition("/")[2].lower()
    for prefix, ratio in _FAMILIES:
        if name.startswith(prefix):
            return ratio
    return DEFAULT


def input_tokens(body: bytes, model: str | None) -> int:
    """Estimated input tokens of a request body (its bytes, or its text when it is escaped JSON)."""
    size = len(body)
    if _ESCAPE in body:
        size -= 3 * body.count(_ESCAPE)  # a 6-byte escape weighs as the 3-byte UTF-8 character it mostly is
    return math.ceil(size / bytes_per_token(model)) if size else 0


def output_from_text(chars: int, model: str | None) -> int:
    """Estimated output tokens of ``chars`` characters of answer text (UTF-8 bytes count as chars here)."""
    return math.ceil(chars / bytes_per_token(model)) if chars > 0 else 0


def output_from_bytes(size: int, sse: bool, model: str | None) -> int:
    """Estimated output tokens of ``size`` bytes relayed whose text could not be told apart."""
    if size <= 0:
        return 0
    return math.ceil(size / SSE_BYTES_PER_TOKEN) if sse else math.ceil(size / bytes_per_token(model))
