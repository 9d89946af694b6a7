"""Usage read from every known answer shape, whole and streamed, as providers document them.

The bodies are the providers' own documented examples (OpenAI's chat completion with cached and
reasoning tokens, the Responses API's response and its ``response.completed`` event, Anthropic's
message and its ``message_start`` / ``message_delta`` events), trimmed of fields that do not matter.
"""

from __future__ import annotations

import gzip
import itertools
import json
import zlib
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.usage import Usage
from gateway.usage.estimate import output_from_bytes, output_from_text
from gateway.usage.read import from_body, from_tail, from_usage
from gateway.usage.tap import BODY_LIMIT, UsageTap

OPENAI_CHAT: dict[str, Any] = {
    "id": "chatcmpl-abc123",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."}, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 128, "audio_tokens": 0},
    },
}
RESPONSES: dict[str, Any] = {
    "id": "resp_67ccd2bed1ec8190",
    "object": "response",
    "status": "completed",
    "output": [{"type": "message", "content": [{"type": "output_text", "text": "In a peaceful grove..."}]}],
    "usage": {
        "input_tokens": 328,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 52,
        "output_tokens_details": {"reasoning_tokens": 12},
        "total_tokens": 380,
    },
}
ANTHROPIC: dict[str, Any] = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "content": [{"type": "text", "text": "Hi! My name is Claude."}],
    "stop_reason": "end_turn",
    "usage": {
        "input_tokens": 2095,
        "output_tokens": 503,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 50,
    },
}


def body(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def test_whole_answers_of_every_shape() -> None:
    assert from_body(body(OPENAI_CHAT)) == Usage(2006, 300, 1920, 128)
    assert from_body(body(RESPONSES)) == Usage(328, 52, 0, 12)
    # Anthropic's input_tokens leaves out the cache: input is the sum, cached the cache reads
    assert from_body(body(ANTHROPIC)) == Usage(2095 + 100 + 50, 503, 50, 0)
    assert from_body(body({"type": "message", "usage": {"input_tokens": 5, "output_tokens": 1}})) == Usage(5, 1)
    embeddings = {"object": "list", "data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    assert from_body(body(embeddings)) == Usage(8, 0)
    completions = {"object": "text_completion", "usage": {"prompt_tokens": 5, "completion_tokens": 7}}
    assert from_body(body(completions)) == Usage(5, 7)


def test_what_is_not_usage_is_none_never_zero() -> None:
    assert from_body(b"not json") is None
    assert from_body(b"[1, 2]") is None
    assert from_body(body({"id": "x"})) is None
    assert from_body(body({"usage": None})) is None
    assert from_usage({"total_tokens": 5}) is None
    # a count that is not a non-negative integer is absent
    assert from_usage({"prompt_tokens": -1, "completion_tokens": "3"}) == Usage(0, 0)
    assert from_usage({"prompt_tokens": True, "completion_tokens": 2.5}) == Usage(0, 0)


def test_a_body_past_the_bound_is_read_from_its_end() -> None:
    big = {**OPENAI_CHAT, "choices": [{"index": 0, "message": {"content": "x" * (BODY_LIMIT + 10)}}]}
    data = body(big)
    tap = UsageTap("chat", False, "gpt-4o")
    for i in range(0, len(data), 1 << 16):
        piece = data[i : i + (1 << 16)]
        assert tap.feed(piece) is piece
    tap.end()
    assert tap.usage() == Usage(2006, 300, 1920, 128)
    assert from_tail(b'... "text":"the key \\"usage\\": {\\"prompt_tokens\\": 9}"}') is None  # inside a string


def test_a_content_coded_answer_is_read_from_a_decoded_side_copy() -> None:
    data = body(OPENAI_CHAT)
    for coded in (gzip.compress(data), zlib.compress(data)):
        tap = UsageTap("chat", False, None)
        assert b"".join(tap.feed(coded[i : i + 3]) for i in range(0, len(coded), 3)) + tap.end() == coded
        assert tap.usage() == Usage(2006, 300, 1920, 128)
    events = b'data: {"choices":[]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n'
    tap = UsageTap("chat", True, None)  # a coded stream is passed as it came, never stripped
    coded = gzip.compress(events)
    assert tap.feed(coded) is coded and tap.end() == b""
    assert tap.usage() == Usage(4, 2)


def test_another_coding_is_not_read_and_is_estimated() -> None:
    tap = UsageTap("chat", False, "gpt-4o")
    brotli_ish = b"\x8b\x02\x80" + b"\x00" * 40
    assert tap.feed(brotli_ish) is brotli_ish
    tap.end()
    assert tap.usage() is None
    assert tap.estimate(100) == Usage(100, output_from_bytes(43, False, "gpt-4o"), source="estimate")


def responses_stream(usage: dict[str, Any] | None) -> bytes:
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": {"id": "resp_1", "status": "in_progress", "usage": None}}),
        ("response.output_text.delta", {"item_id": "m", "delta": "Hello"}),
        ("response.output_text.delta", {"item_id": "m", "delta": " world"}),
        ("response.output_text.done", {"item_id": "m", "text": "Hello world"}),
    ]
    if usage is not None:
        events.append(("response.completed", {"response": {"id": "resp_1", "status": "completed", "usage": usage}}))
    return b"".join(
        b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps({"type": kind, **doc}).encode()) for kind, doc in events
    )


def anthropic_stream(delta: bool) -> bytes:
    start = {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 25, "output_tokens": 1}}}
    events: list[dict[str, Any]] = [
        start,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}},
        {"type": "content_block_stop", "index": 0},
    ]
    if delta:
        events.append({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}})
        events.append({"type": "message_stop"})
    return b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode()) for e in events)


def feed_split(data: bytes, cuts: list[int], shape: str, model: str | None = "gpt-4o") -> UsageTap:
    tap = UsageTap(shape, False, model)
    edges = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    for a, b in itertools.pairwise(edges):
        piece = data[a:b]
        assert tap.feed(piece) is piece
    assert tap.end() == b""
    return tap


CUTS = st.lists(st.integers(0, 5000), max_size=10)


@given(CUTS)
def test_the_responses_api_stream_is_read_from_response_completed_however_split(cuts: list[int]) -> None:
    usage = RESPONSES["usage"]
    assert feed_split(responses_stream(usage), cuts, "responses").usage() == Usage(328, 52, 0, 12)
    cut = feed_split(responses_stream(None), cuts, "responses")
    assert cut.usage() is None
    assert cut.estimate(50) == Usage(50, 4, source="estimate")  # "Hello world": 11 bytes of deltas


@given(CUTS)
def test_anthropics_stream_merges_message_start_with_message_delta_however_split(cuts: list[int]) -> None:
    assert feed_split(anthropic_stream(True), cuts, "messages", "claude-x").usage() == Usage(25, 15)
    cut = feed_split(anthropic_stream(False), cuts, "messages", "claude-x")
    assert cut.usage() is None  # message_delta never came: the output is not known
    assert cut.estimate(999) == Usage(25, 2, source="estimate")  # the stream told its input; "Hello!" estimated


def test_anthropics_message_delta_may_carry_the_input_side_too() -> None:
    data = anthropic_stream(False) + (
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":7,'
        b'"input_tokens":30,"cache_read_input_tokens":10}}\n\n'
    )
    assert feed_split(data, [], "messages").usage() == Usage(40, 7, 10, 0)


def test_the_last_usage_of_a_stream_wins() -> None:
    # vLLM's continuous usage: every chunk carries the running totals
    data = b"".join(
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":9,"completion_tokens":%d}}\n\n' % n
        for n in range(1, 4)
    )
    assert feed_split(data, [], "chat").usage() == Usage(9, 3)


def test_an_oversized_event_passes_unchanged_and_leaves_the_usage_to_the_estimate() -> None:
    huge = b'data: {"choices":[{"delta":{"content":"' + b"x" * (2 << 20) + b'"}}],"usage":null}\n\n'
    last = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    tap = UsageTap("chat", True, "gpt-4o")
    out = b"".join(tap.feed(huge[i : i + 65536]) for i in range(0, len(huge), 65536))
    assert out == huge  # given up on: passed as it came, usage:null and all
    assert tap.feed(last) == b"" and tap.end() == b""  # the usage-only chunk is still read and stripped
    assert tap.usage() == Usage(1, 2)


def test_a_whole_answer_is_read_once_it_is_whole_and_one_cut_short_is_estimated_from_its_text() -> None:
    data = body(OPENAI_CHAT)
    tap = UsageTap("chat", False, "gpt-4o")
    tap.feed(data[:50])
    assert tap.usage() is None  # not whole yet: nothing read, nothing lost
    tap.feed(data[50:])
    tap.end()
    assert tap.usage() == Usage(2006, 300, 1920, 128)
    cut = UsageTap("chat", False, "gpt-4o")
    cut.feed(b'{"id":"x","choices":[{"message":{"content":"' + b"word " * 40 + b'"}}],"usage":{"prompt_')
    assert cut.usage() is None
    assert cut.estimate(7) == Usage(7, output_from_text(200, "gpt-4o"), source="estimate")


def test_a_whole_answer_without_usage_is_estimated_from_its_text_in_any_shape() -> None:
    for shape, doc in [
        ("responses", {**RESPONSES, "usage": None}),
        ("messages", {k: v for k, v in ANTHROPIC.items() if k != "usage"}),
        ("chat", {k: v for k, v in OPENAI_CHAT.items() if k != "usage"}),
    ]:
        tap = UsageTap(shape, False, "gpt-4o")
        tap.feed(body(doc))
        tap.end()
        text = {"responses": "In a peaceful grove...", "messages": "Hi! My name is Claude.", "chat": "Hi."}[shape]
        assert tap.usage() is None
        assert tap.estimate(3) == Usage(3, output_from_text(len(text), "gpt-4o"), source="estimate"), shape
