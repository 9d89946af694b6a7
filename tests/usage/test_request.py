"""The token fields of a request, and the body asking for usage with every other byte's meaning kept."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.modelfield import read_model, rename
from gateway.usage.request import BadTokens, RequestTokens, read_request, with_usage

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("path", "body", "cap"),
    [
        (CHAT, {"max_tokens": 10}, 10),
        (CHAT, {"max_completion_tokens": 20}, 20),
        (CHAT, {"max_tokens": 10, "max_completion_tokens": 20}, 20),  # the upstream obeys one: reserve the larger
        (CHAT, {"max_output_tokens": 30}, None),  # not a chat field
        (CHAT, {"max_tokens": None}, None),  # null is no cap, as OpenAI reads it
        ("/v1/completions", {"max_tokens": 5}, 5),
        ("/v1/messages", {"max_tokens": 1024}, 1024),
        ("/v1/responses", {"max_output_tokens": 300, "max_tokens": 9}, 300),
        ("/v1/responses?x=1", {"max_output_tokens": 300}, 300),
        ("/v1/unknown", {"max_output_tokens": 3, "max_tokens": 4}, 4),  # a path not known: any of the three
    ],
)
def test_the_output_cap_per_path(path: str, body: dict[str, Any], cap: int | None) -> None:
    assert read_request(json.dumps(body).encode(), path).output_cap == cap


def test_stream_and_the_clients_own_include_usage() -> None:
    assert read_request(b'{"stream":true}', CHAT) == RequestTokens(None, True, False)
    assert read_request(b'{"stream":"true"}', CHAT).stream is False  # not a boolean: the upstream refuses it
    asked = b'{"stream":true,"stream_options":{"include_usage":true}}'
    assert read_request(asked, CHAT) == RequestTokens(None, True, True)
    assert read_request(b'{"stream":true,"stream_options":{"include_usage":false}}', CHAT).wants_usage is False


@pytest.mark.parametrize("body", [b"", b"not json", b"[1]", b'"x"', b"\xff{}"])
def test_a_body_that_is_not_a_json_object_is_unreadable_not_waved_through(body: bytes) -> None:
    assert read_request(body, CHAT) == RequestTokens(None, False, False, readable=False)


@pytest.mark.parametrize(
    ("body", "param", "code", "message"),
    [
        (b'{"max_tokens":0}', "max_tokens", "integer_below_min_value", "Expected a value >= 1, but got 0 instead."),
        (b'{"max_tokens":-5}', "max_tokens", "integer_below_min_value", "but got -5 instead."),
        (b'{"max_tokens":"5"}', "max_tokens", "invalid_type", "expected an integer, but got a string instead."),
        (b'{"max_tokens":5.0}', "max_tokens", "invalid_type", "but got a decimal instead."),
        (b'{"max_tokens":true}', "max_tokens", "invalid_type", "but got a boolean instead."),
        (b'{"max_completion_tokens":[1]}', "max_completion_tokens", "invalid_type", "but got an array instead."),
        (b'{"max_tokens":1,"max_tokens":2}', "max_tokens", "invalid_value", "more than one 'max_tokens'"),
        (b'{"max_tok\\u0065ns":1,"max_tokens":2}', "max_tokens", "invalid_value", "more than one 'max_tokens'"),
        (b'{"stream":false,"stream":true}', "stream", "invalid_value", "more than one 'stream'"),
        (b'{"MAX_TOKENS":100000}', "max_tokens", "invalid_value", "in another case or spelling ('MAX_TOKENS')"),
        (b'{"maxTokens":100000}', "max_tokens", "invalid_value", "in another case or spelling"),
        (b'{"Stream":true}', "stream", "invalid_value", "in another case or spelling"),
    ],
)
def test_a_field_that_cannot_be_read_safely_is_refused(body: bytes, param: str, code: str, message: str) -> None:
    with pytest.raises(BadTokens) as refused:
        read_request(body, CHAT)
    assert (refused.value.param, refused.value.code) == (param, code)
    assert message in refused.value.message


def test_nested_fields_of_the_same_name_are_not_duplicates() -> None:
    body = b'{"messages":[{"max_tokens":1,"stream":true}],"tools":[{"max_tokens":2}],"max_tokens":7}'
    assert read_request(body, CHAT) == RequestTokens(7, False, False)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model":"m","stream":true}', b'{"stream_options":{"include_usage":true},"model":"m","stream":true}'),
        (b"  {}", b'  {"stream_options":{"include_usage":true}}'),
        (b'{"stream_options":null}', b'{"stream_options":{"include_usage":true}}'),
        (b'{"stream_options" : {}}', b'{"stream_options" : {"include_usage":true}}'),
        (b'{"stream_options":{"include_usage":false}}', b'{"stream_options":{"include_usage":true}}'),
        (
            b'{"stream_options":{"continuous_usage_stats":true, "include_usage" :  false }}',
            b'{"stream_options":{"continuous_usage_stats":true, "include_usage" :  true }}',
        ),
        (
            b'{"stream_options":{"x":[{"include_usage":false}]}}',
            b'{"stream_options":{"include_usage":true,"x":[{"include_usage":false}]}}',
        ),
    ],
)
def test_with_usage_splices_bytes(body: bytes, expected: bytes) -> None:
    assert with_usage(body) == expected
    assert read_request(expected, CHAT).wants_usage


def test_with_usage_changes_nothing_when_the_client_asked() -> None:
    body = b'{"model":"m","stream_options":{"include_usage":true}}'
    assert with_usage(body) is body


@pytest.mark.parametrize(
    "body",
    [b'{"stream_options":"yes"}', b'{"stream_options":[true]}', b"[]", b'{"stream_options":{"Include_Usage":false}}'],
)
def test_with_usage_refuses_what_it_cannot_set_safely(body: bytes) -> None:
    with pytest.raises(BadTokens):
        with_usage(body)


VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
KEYS = st.sampled_from(["messages", "temperature", "user", "stream", "n", "tools", "x"]) | st.text(max_size=6)


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = draw(st.dictionaries(KEYS, VALUES, max_size=5))
    for key in list(doc):
        folded = key.lower().replace("_", "").replace("-", "")
        if folded in {"maxtokens", "stream", "streamoptions", "model"} or "\x00" in key:  # modelfield's refusals
            del doc[key]
    if draw(st.booleans()):
        doc["model"] = draw(st.text(max_size=10))
    options = draw(
        st.sampled_from([None, "absent", "empty", "false", "true", "other"]),
    )
    if options != "absent":
        doc["stream_options"] = {
            None: None,
            "empty": {},
            "false": {"include_usage": False},
            "true": {"include_usage": True},
            "other": {"continuous_usage_stats": True, "include_usage": False},
        }[options]
    return doc


@given(bodies(), st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]), st.booleans())
def test_with_usage_keeps_every_other_bytes_meaning_and_the_model(
    doc: dict[str, Any], separators: tuple[str, str], ascii_only: bool
) -> None:
    body = json.dumps(doc, separators=separators, ensure_ascii=ascii_only).encode()
    out = with_usage(body)
    expected = {**doc, "stream_options": {**(doc.get("stream_options") or {}), "include_usage": True}}
    assert orjson.loads(out) == expected
    assert list(orjson.loads(out)["stream_options"]) == list(expected["stream_options"])  # order kept
    before, after = read_model(body), read_model(out)
    assert after.model == before.model
    if before.model is not None:
        assert out[after.start : after.end] == body[before.start : before.end]  # the very bytes
        assert orjson.loads(rename(out, after, "renamed"))["model"] == "renamed"
