"""Token counts estimated without a tokenizer: input from the request body, output from what was relayed.

Used where the provider's count is not at hand: to reserve before the request
goes up (the input side), and to charge a stream that ended without usage (the
client left, the upstream cut it, or the upstream sends none).

Bytes per token per model family, with no vocabulary shipped (a vocabulary is
megabytes, and an exact count of the text would still miss the provider's own
framing of tools and messages). The whole body is counted, JSON included, so a
field the estimator does not know (tools, a response schema) is counted too:
four kinds of byte, each with its own ratio, counted by ``bytes`` methods in C
(three passes over the body):

* ASCII letters, punctuation and white space;
* digits (tokenizers cut numbers into groups of at most three digits: dense);
* bytes of UTF-8 characters outside ASCII (two to four a character);
* ``\\u`` escapes (Python's ``json.dumps`` writes every such character as one),
  each weighed as one character.

The ratios are set so that an estimate is rarely short of the real count (a
reservation that falls short lets a budget overshoot; one that runs over only
holds room until the request settles): tests/usage/test_estimate.py checks
every example request in tests/fixtures/prompts/ against its real o200k_base
and cl100k_base count (recorded with gpt-tokenizer, see
tests/fixtures/prompts/count_tokens.cjs): never below 0.95 of it, and at most
twice it plus 20 tokens (a short request's JSON outweighs its text). Anthropic's
tokenizer and the open models' are not public here: their ratios are the more
cautious ones and are not measured.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Ratios:
    """Bytes (or escapes) per token of each kind."""

    ascii: float
    digits: float
    utf8: float  # bytes of characters outside ASCII
    escapes: float  # \\uXXXX escapes


O200K = Ratios(ascii=3.4, digits=2.5, utf8=3.0, escapes=2.9)  # fitted to tests/fixtures/prompts (o200k_base)
CL100K = Ratios(ascii=3.1, digits=2.5, utf8=2.6, escapes=1.5)  # (cl100k_base)
CAUTIOUS = Ratios(ascii=3.0, digits=2.0, utf8=2.0, escapes=1.0)  # not measured: Claude, Llama, Mistral, ...

# (model name prefix, ratios); the first prefix that matches wins, so longer ones come first.
_FAMILIES: tuple[tuple[str, Ratios], ...] = (
    ("gpt-4o", O200K),
    ("chatgpt-4o", O200K),
    ("gpt-4.1", O200K),
    ("gpt-4.5", O200K),
    ("gpt-5", O200K),
    ("gpt-oss", O200K),
    ("o1", O200K),
    ("o3", O200K),
    ("o4", O200K),
    ("gpt-4", CL100K),
    ("gpt-3.5", CL100K),
    ("text-embedding", CL100K),
)
SSE_BYTES_PER_TOKEN = 120  # a streamed chunk carries about one token in 120-250 bytes of JSON and framing
_ESCAPE = b"\\u"
_ESCAPES = re.compile(rb"\\u[0-9a-fA-F]{4}")
_HIGH = bytes(range(128, 256))
_DIGITS = b"0123456789"


def ratios(model: str | None) -> Ratios:
    """The ratios of a model's family (a provider prefix such as ``openai/`` is ignored)."""
    if not model:
        return CAUTIOUS
    name = model.rpartition("/")[2].lower()
    for prefix, found in _FAMILIES:
        if name.startswith(prefix):
            return found
    return CAUTIOUS


def input_tokens(body: bytes, model: str | None) -> int:
    """Estimated input tokens of a request body."""
    size = len(body)
    if not size:
        return 0
    r = ratios(model)
    utf8 = size - len(body.translate(None, _HIGH))
    escapes = 0
    if _ESCAPE in body:  # their hex digits are not digits of the text
        body, escapes = _ESCAPES.subn(b"", body)
    digits = len(body) - len(body.translate(None, _DIGITS))
    ascii_ = len(body) - utf8 - digits
    return math.ceil(max(ascii_, 0) / r.ascii + digits / r.digits + utf8 / r.utf8 + escapes / r.escapes)


def output_from_text(chars: int, model: str | None) -> int:
    """Estimated output tokens of ``chars`` bytes of answer text (as written in JSON strings)."""
    return math.ceil(chars / ratios(model).ascii) if chars > 0 else 0


def output_from_bytes(size: int, sse: bool, model: str | None) -> int:
    """Estimated output tokens of ``size`` bytes relayed whose text could not be told apart."""
    if size <= 0:
        return 0
    return math.ceil(size / SSE_BYTES_PER_TOKEN) if sse else math.ceil(size / ratios(model).ascii)
