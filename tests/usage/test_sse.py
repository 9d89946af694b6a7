"""The event-stream splitter and the tap, fed arbitrarily split input: the same events, usage and bytes
as one whole buffer gives, and the events a WHATWG-style reference parser finds in it.

The streams are generated: LF, CRLF or CR framing (one per stream: a CR-ended line followed by an
LF-ended blank line *is* a CRLF, so a stream that mixes those two cannot say what it meant), comments,
``event:`` and ``id:`` lines, multi-line data, JSON chunks in OpenAI's shape with answer text of
any characters, ``[DONE]``; the cut points between reads are anywhere, a CRLF's two bytes included.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.usage import Usage
from gateway.usage.sse import Event, Splitter
from gateway.usage.tap import UsageTap

EOLS = ("\n", "\r\n", "\r")
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)  # any character UTF-8 can carry
LINE = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=8)
_LINES = re.compile(r"\r\n|\r|\n")


def reference(stream: str) -> list[str]:
    """The data of each event, as the WHATWG "interpreting an event stream" algorithm dispatches it."""
    lines = _LINES.split(stream)
    lines.pop()  # after the last line end: an incomplete line, never processed
    events, data = [], None
    for line in lines:
        if not line:
            if data is not None:
                events.append(data)
            data = None
        elif line.startswith(":"):
            continue
        else:
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            if name == "data":
                data = value if data is None else data + "\n" + value
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def run_splitter(pieces: list[bytes], limit: int = 1 << 20) -> list[Event]:
    splitter = Splitter(limit)
    events = [event for piece in pieces for event in splitter.feed(piece)]
    return events + splitter.end()


def chunk(text: str, usage: bool) -> dict[str, Any]:
    choices = [{"index": 0, "delta": {"content": text}}]
    out: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "choices": choices}
    if usage:
        out["usage"] = None
    return out


@st.composite
def streams(draw: st.DrawFn) -> str:
    eol = draw(st.sampled_from(EOLS))
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            lines.append(": keep-alive")
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(["event: delta", "id: 7", "retry: 10", "event:x"])))
        kind = draw(st.sampled_from(["json", "multi", "done", "bare"]))
        if kind == "json":
            text = draw(TEXT)
            lines.append("data: " + json.dumps(chunk(text, False), ensure_ascii=draw(st.booleans())))
        elif kind == "multi":
            lines += ["data:" + draw(LINE) for _ in range(2)]
        elif kind == "done":
            lines.append("data: [DONE]")
        else:
            lines.append("data")
        lines.append("")
        if draw(st.booleans()):
            lines.append("")  # an extra blank line: nothing to dispatch
    return "".join(line + eol for line in lines)


@given(streams(), st.lists(st.integers(0, 10_000), max_size=12))
def test_split_reads_give_the_events_of_the_whole_buffer(stream: str, cuts: list[int]) -> None:
    data = stream.encode()
    whole = run_splitter([data])
    pieces = run_splitter(split(data, cuts))
    assert pieces == whole
    assert b"".join(e.raw for e in whole) == data
    assert [e.data.decode() for e in whole if e.data is not None] == reference(stream)


@given(streams(), st.lists(st.integers(0, 10_000), max_size=12), st.integers(4, 64))
def test_an_event_over_the_limit_is_passed_on_and_given_up_the_same_way_however_split(
    stream: str, cuts: list[int], limit: int
) -> None:
    data = stream.encode()
    whole = run_splitter([data], limit)
    pieces = run_splitter(split(data, cuts), limit)
    assert b"".join(e.raw for e in pieces) == data  # every byte passes once, in order
    kept = [e.data for e in whole if e.data is not None]
    assert [e.data for e in pieces if e.data is not None] == kept
    assert all(len(e.raw) <= limit or e.overflow for e in pieces)


def test_a_crlf_split_between_reads_is_one_line_end() -> None:
    splitter = Splitter()
    assert splitter.feed(b"data: a\r") == []
    assert splitter.feed(b"\n") == []  # CR LF: one line end, not a line end and a blank line
    assert splitter.feed(b"\r") == []  # maybe the start of another CRLF: held
    assert splitter.feed(b"\ndata: b\r\n\r\n") == [Event(b"data: a\r\n\r\n", b"a"), Event(b"data: b\r\n\r\n", b"b")]


def test_an_oversized_event_is_not_kept() -> None:
    splitter = Splitter(limit=100)
    assert splitter.feed(b"data: " + b"x" * 200) == [Event(b"data: " + b"x" * 200, None, overflow=True)]
    assert splitter.feed(b"y" * 10) == [Event(b"y" * 10, None, overflow=True)]
    assert splitter.feed(b"\n") == []  # maybe half its blank line: three bytes at most are held
    assert splitter.feed(b'\ndata: {"ok":1}\n\n') == [
        Event(b"\n\n", None, overflow=True),
        Event(b'data: {"ok":1}\n\n', b'{"ok":1}'),
    ]
    assert splitter.skipped == 1


# --- the tap over OpenAI's stream with and without include_usage -----------------------------------


@st.composite
def openai_streams(draw: st.DrawFn) -> tuple[bytes, bytes, Usage]:
    """(the stream as the upstream sends it without include_usage, the same with it, its usage)."""
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    texts = draw(st.lists(TEXT, max_size=8))
    compact = draw(st.booleans())
    separators = (",", ":") if compact else (", ", ": ")
    usage = Usage(draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6)))
    comment = draw(st.booleans())

    def event(payload: dict[str, Any]) -> str:
        return "data: " + json.dumps(payload, separators=separators) + eol + eol

    def body(with_usage: bool) -> bytes:
        events = [event(chunk(t, with_usage)) for t in texts]
        if with_usage:
            totals = {"prompt_tokens": usage.input, "completion_tokens": usage.output, "total_tokens": usage.total}
            events.append(event({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": totals}))
        if comment:
            events.insert(0, ": comment" + eol + eol)
        return ("".join(events) + "data: [DONE]" + eol + eol).encode()

    return body(False), body(True), usage


def tap_through(pieces: list[bytes], strip: bool) -> tuple[bytes, UsageTap]:
    tap = UsageTap("chat", strip, "gpt-4o")
    out = b"".join(tap.feed(piece) for piece in pieces) + tap.end()
    return out, tap


@settings(max_examples=200)
@given(openai_streams(), st.lists(st.integers(0, 10_000), max_size=12))
def test_the_strip_gives_the_stream_without_the_injection_however_split(
    case: tuple[bytes, bytes, Usage], cuts: list[int]
) -> None:
    plain, injected, usage = case
    out, tap = tap_through(split(injected, cuts), strip=True)
    assert out == plain
    assert tap.usage() == usage
    out, tap = tap_through(split(injected, cuts), strip=False)
    assert out == injected  # without the strip: every byte as it came
    assert tap.usage() == usage
    out, tap = tap_through(split(plain, cuts), strip=True)
    assert out == plain  # nothing to strip: nothing changed
    assert tap.usage() is None


def test_without_the_strip_feed_returns_the_very_same_object() -> None:
    tap = UsageTap("chat", False, None)
    for piece in (b"data: {", b'"choices":[]}\n', b"\n", b'data: {"usage":{"prompt_tokens":1}}\n\n'):
        assert tap.feed(piece) is piece
    assert tap.end() == b""
    assert tap.usage() == Usage(1, 0)


def test_with_the_strip_a_whole_event_with_nothing_to_take_out_is_the_same_object() -> None:
    tap = UsageTap("chat", True, None)
    event = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    assert tap.feed(event) is event


@pytest.mark.parametrize(
    ("raw", "stripped"),
    [
        (b'data: {"a":1,"usage":null}\n\n', b'data: {"a":1}\n\n'),
        (b'data: {"a": 1, "usage": null}\r\n\r\n', b'data: {"a": 1}\r\n\r\n'),
        (b'data: {"usage":null,"a":1}\n\n', b'data: {"a":1}\n\n'),
        (b'event: x\ndata: { "usage" : null , "a":1}\n\n', b'event: x\ndata: { "a":1}\n\n'),
        # left alone: not null, not the top-level object's, in a string
        (b'data: {"a":1,"usage":{"prompt_tokens":1}}\n\n', None),
        (b'data: {"a":{"b":1,"usage":null},"c":2}\n\n', None),
        (b'data: {"a":"\\"usage\\":null"}\n\n', None),
    ],
)
def test_the_null_usage_member_is_taken_out_only_where_openai_puts_it(raw: bytes, stripped: bytes | None) -> None:
    tap = UsageTap("chat", True, None)
    assert tap.feed(raw) == (raw if stripped is None else stripped)
