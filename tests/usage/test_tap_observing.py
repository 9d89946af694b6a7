"""The observing tap (:meth:`gateway.usage.tap.UsageTap.observing`): never a byte changed, the provider's
usage read from every shape, and a stream that shows no usage left unsplit."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.usage.shapes import shape_of
from gateway.usage.tap import UsageTap

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def chunk(text: str, usage: bool) -> dict[str, Any]:
    event: dict[str, Any] = {"id": "c", "choices": [{"index": 0, "delta": {"content": text}}]}
    if usage:
        event["usage"] = None
    return event


ASKED = sse([chunk("Hello ", True), chunk("there", True), {"id": "c", "choices": [], "usage": USAGE}])
NOT_ASKED = sse([chunk("Hello ", False), chunk("there", False)])
JSON = json.dumps({"id": "x", "choices": [], "usage": USAGE}).encode()
MESSAGES = (
    b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":25,'
    b'"output_tokens":1}}}\n\nevent: content_block_delta\ndata: {"type":"content_block_delta","delta":'
    b'{"type":"text_delta","text":"Hi"}}\n\nevent: message_delta\ndata: {"type":"message_delta",'
    b'"usage":{"output_tokens":15}}\n\n'
)


def relay(tap: UsageTap, pieces: list[bytes]) -> None:
    for piece in pieces:
        assert tap.feed(piece) is piece  # the very object: nothing copied, nothing changed
    assert tap.end() == b""


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    at = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    return [body[a:b] for a, b in itertools.pairwise(at) if b > a]


def test_an_observing_tap_never_strips() -> None:
    assert UsageTap.observing("chat").strips is False and UsageTap("chat", True, None).strips is True


@given(st.lists(st.integers(min_value=0), max_size=6))
def test_usage_is_read_however_the_body_is_split(cuts: list[int]) -> None:
    for shape, body, want in (("chat", ASKED, (11, 7)), ("chat", JSON, (11, 7)), ("messages", MESSAGES, (25, 15))):
        tap = UsageTap.observing(shape)
        relay(tap, split(body, cuts))
        usage = tap.usage()
        assert usage is not None and (usage.input, usage.output, usage.source) == (*want, "usage"), (shape, body)


def test_a_stream_that_shows_no_usage_is_never_split() -> None:
    tap = UsageTap.observing("chat")
    relay(tap, split(NOT_ASKED, [7, 30, 61]))
    assert tap._splitter is None and tap.usage() is None  # one scan per read, no event split out


def test_a_json_answer_without_usage_records_nothing_and_counts_no_text() -> None:
    tap = UsageTap.observing("chat")
    relay(tap, [b'{"id":"x","choices":[{"message":{"content":"Hello there"}}]}'])
    assert tap.usage() is None and tap.chars == 0


def test_shapes_are_matched_in_any_case() -> None:
    assert shape_of("/V1/Chat/Completions?x=1") == "chat" and shape_of("/v1/MESSAGES") == "messages"
    assert shape_of("/v1/chat/completion") is None
