"""gateway.modelfield against orjson's own reading, on bodies written every way JSON allows.

The generator writes JSON text itself (random whitespace, key order, \\u and
short escapes in keys and strings, surrogate pairs, nested "model" keys,
numbers in every form) so the scanner meets what clients really send, not
what one encoder happens to produce. Three decoders are the oracles: orjson,
Python's json, and a decoder that reads keys the way Go's encoding/json
fills a struct (case-insensitively, by the rules of its fold.go). For every
body the gateway accepts, all three read the model the gateway read; a
rename must change the parsed document in exactly one place and the bytes
in exactly one span.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.modelfield import BadBody, ModelField, is_json, read_model, rename
from support.json_oracles import (
    GO_FOLDS_TO_ASCII,
    go_fold_name,
    go_model,
    go_v2_fold_name,
    is_variant,
    oracle_model,
    python_model,
    variants_at_top,
)

# --- writing JSON text every way the grammar allows ------------------------------------

_WS = " \t\n\r"
_SHORT = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def ws(r: random.Random) -> str:
    return "".join(r.choice(_WS) for _ in range(r.choice((0, 0, 0, 1, 2, 5))))


def write_string(s: str, r: random.Random) -> str:
    out = ['"']
    for ch in s:
        code = ord(ch)
        must = ch in '"\\' or code < 0x20
        how = r.random()
        if must and ch in _SHORT and how < 0.5:
            out.append(_SHORT[ch])
        elif must or how < 0.15:
            if code > 0xFFFF:
                code -= 0x10000
                pair = (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF))
                out.append("".join(f"\\u{u:04x}" if r.random() < 0.5 else f"\\u{u:04X}" for u in pair))
            else:
                out.append(f"\\u{code:04x}" if r.random() < 0.5 else f"\\u{code:04X}")
        elif ch == "/" and how < 0.2:
            out.append("\\/")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def write_number(n: int | float, r: random.Random) -> str:
    if isinstance(n, int):
        return str(n) if r.random() < 0.8 else f"{n}e0" if n >= 0 else f"{n}E+0"
    text = repr(n)
    return text.replace("e", "E") if r.random() < 0.3 else text


def write(value: Any, r: random.Random) -> str:
    """JSON text for ``value``: dicts are lists of pairs so keys may repeat and keep their order."""
    if isinstance(value, Pairs):
        if not value.items:
            return "{" + ws(r) + "}"
        inner = ",".join(ws(r) + write_string(k, r) + ws(r) + ":" + ws(r) + write(v, r) + ws(r) for k, v in value.items)
        return "{" + inner + "}"
    if isinstance(value, list):
        if not value:
            return "[" + ws(r) + "]"
        return "[" + ",".join(ws(r) + write(v, r) + ws(r) for v in value) + "]"
    if isinstance(value, str):
        return write_string(value, r)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return write_number(value, r)


class Pairs:
    def __init__(self, items: list[tuple[str, Any]]) -> None:
        self.items = items


variant_keys = st.one_of(
    st.sampled_from(["MODEL", "Model", "mOdEl", "modeL", "mo_del", "MO-DEL", "_model", "model-", "m_o_d_e_l"]),
    st.sampled_from(["model\x00", "model\x00x", "\x00"]),  # read up to the NUL by a decoder of C strings
    st.lists(st.sampled_from("mM"), min_size=1, max_size=1).flatmap(
        lambda m: st.tuples(*(st.sampled_from((c, c.upper())) for c in "odel")).map(lambda t: m[0] + "".join(t))
    ),
).filter(lambda k: is_variant(k) or "\x00" in k)
keys = st.one_of(
    st.sampled_from(
        [
            "model",
            "messages",
            "model ",
            "modell",
            '"model',
            'x\\"model',
            "\\",
            "model\\",
            "modeI",  # a capital i: no decoder folds it to l
            "m\u043edel",  # a Cyrillic o
            "\uff4d\uff4f\uff44\uff45\uff4c",  # fullwidth letters
            "mode\u212a",  # the Kelvin sign folds to k, not l
            "\u017fodel",  # the long s folds to s, not m
        ]
    ),
    st.text(max_size=8),
).filter(lambda k: not is_variant(k))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(st.tuples(keys, inner), max_size=4).map(Pairs),
    ),
    max_leaves=12,
)
models = st.one_of(st.text(max_size=16), st.sampled_from(["gpt-4o", "o1-mini", "qwen-plus"]), values)


@st.composite
def bodies(draw: st.DrawFn, model_copies: int = -1, variants: int = 0) -> bytes:
    """A top-level object: other keys (never "model" itself nor a variant of it), ``model_copies``
    model keys (-1: 0 or 1) and ``variants`` keys that are "model" in another case (-1: 0 to 2)."""
    top_keys = keys.filter(lambda k: k != "model" and "\x00" not in k)  # a NUL: refused, drawn as a variant
    others = draw(st.lists(st.tuples(top_keys, values), max_size=5))
    copies = draw(st.integers(0, 1)) if model_copies < 0 else model_copies
    items = list(others)
    for _ in range(copies):
        items.insert(draw(st.integers(0, len(items))), ("model", draw(models)))
    for _ in range(draw(st.integers(0, 2)) if variants < 0 else variants):
        items.insert(draw(st.integers(0, len(items))), (draw(variant_keys), draw(models)))
    r = draw(st.randoms(use_true_random=False))
    return (ws(r) + write(Pairs(items), r) + ws(r)).encode()


# No deadline: the machine is shared and noisy, and how long an example takes is not what is tested.
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- properties ------------------------------------------------------------------------


@FAST
@given(bodies(variants=-1))
@example(b'{"model":"gpt-4o"}')
@example(b' {"a":{"model":"x"},"model":"y"} ')
@example(b'{"mod\\u0065l":"y"}')
@example(b'{"model":"\\ud83d\\ude00"}')
@example(b'{"model":"cheap-model","MODEL":"gpt-4o"}')
@example(b'{"a":{"MODEL":"x"},"model":"y","b":[{"Model":1}]}')
def test_read_model_agrees_with_every_decoder(body: bytes) -> None:
    """Accepted: orjson, Python's json and Go (v1 and v2 folding) read the gateway's model. Refused: a variant."""
    try:
        expected = oracle_model(body)
    except orjson.JSONDecodeError:  # numbers a double cannot hold: refused by both
        with pytest.raises(BadBody):
            read_model(body)
        return
    if variants_at_top(body):
        with pytest.raises(BadBody, match=r"another case|NUL"):
            read_model(body)
        return
    field = read_model(body)
    assert field.model == expected == python_model(body) == go_model(body) == go_model(body, go_v2_fold_name)
    if expected is None:
        assert (field.start, field.end) == (-1, -1)
    else:
        assert orjson.loads(body[field.start : field.end]) == expected  # the span is exactly the value


@FAST
@given(bodies(model_copies=1), st.text(max_size=20))
def test_rename_changes_only_the_model(body: bytes, new: str) -> None:
    try:
        before = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    field = read_model(body)
    out = rename(body, field, new)
    if field.model is None:  # the model was not a string: nothing to rename
        assert out == body
        return
    assert orjson.loads(out) == {**before, "model": new}
    assert out[: field.start] == body[: field.start]
    assert out[len(out) - (len(body) - field.end) :] == body[field.end :]
    assert read_model(out).model == new


@FAST
@given(bodies(model_copies=2))
def test_a_second_model_key_is_refused_whatever_the_parser_keeps(body: bytes) -> None:
    try:
        orjson.loads(body)  # a parser takes it (and silently keeps one copy)
    except orjson.JSONDecodeError:
        return
    with pytest.raises(BadBody, match="more than one"):
        read_model(body)


@FAST
@given(values.filter(lambda v: not isinstance(v, Pairs)), st.randoms(use_true_random=False))
def test_a_top_level_that_is_not_an_object_is_refused(value: Any, r: random.Random) -> None:
    with pytest.raises(BadBody):
        read_model(write(value, r).encode())


@FAST
@given(bodies(), st.data())
def test_damaged_bodies_are_refused_or_read_as_the_parser_reads_them(body: bytes, data: st.DataObject) -> None:
    """Any byte changed, dropped or added: BadBody, or the same model a parser sees; never another error."""
    i = data.draw(st.integers(0, len(body)))
    damage = data.draw(st.sampled_from(["replace", "drop", "insert"]))
    byte = bytes([data.draw(st.integers(0, 255))])
    body = body[:i] + (b"" if damage == "drop" else byte) + body[i + (damage != "insert") :]
    try:
        expected = oracle_model(body)
        parsed = True
    except (orjson.JSONDecodeError, AttributeError):  # unreadable, or not an object
        parsed = False
    if not parsed:
        with pytest.raises(BadBody):
            read_model(body)
        return
    try:
        assert read_model(body).model == expected
    except BadBody as e:  # a damaged key can become a second "model", or "model" in another case
        assert "more than one" in e.message or (
            ("another case" in e.message or "NUL" in e.message) and variants_at_top(body)
        )


@FAST
@given(st.binary(max_size=64))
def test_any_bytes_give_a_model_or_badbody(body: bytes) -> None:
    try:
        read_model(body)
    except BadBody as e:
        assert e.message and e.message.isprintable()


# --- hand cases ------------------------------------------------------------------------


def test_model_found_and_renamed_with_every_other_byte_kept() -> None:
    body = (
        b'{\n  "messages": [{"role": "user", "content": "hi", "model": "inner"}],\n  "model" :\t"gpt-4o",\n  "x": 1}\n'
    )
    field = read_model(body)
    assert field == ModelField("gpt-4o", body.index(b'"gpt-4o"'), body.index(b'"gpt-4o"') + 8)
    out = rename(body, field, "qwen-plus")
    assert out == body.replace(b'"gpt-4o"', b'"qwen-plus"')


def test_escaped_key_is_the_model_and_stays_escaped() -> None:
    body = b'{"\\u006d\\u006Fdel":"gpt-4o","a":"\\u00e9"}'
    field = read_model(body)
    assert field.model == "gpt-4o"
    assert rename(body, field, "qwen-plus") == b'{"\\u006d\\u006Fdel":"qwen-plus","a":"\\u00e9"}'


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"gpt-4o","model":"o1"}',
        b'{"model":"gpt-4o","mod\\u0065l":"o1"}',
        b'{"mod\\u0065l":"gpt-4o", "\\u006dodel" : 5}',
        b'{"model":null,"x":{},"model":"o1"}',
        b'{"model":"o1","model":"o1"}',
    ],
)
def test_duplicated_model_key_is_refused(body: bytes) -> None:
    assert orjson.loads(body)  # a parser accepts it: only the gateway's own check stands between
    with pytest.raises(BadBody, match='more than one "model"'):
        read_model(body)


CASE_VARIANTS = [
    b'{"model":"cheap-model","MODEL":"gpt-4o"}',  # the report: judged as cheap-model, served as gpt-4o
    b'{"MODEL":"gpt-4o","model":"cheap-model"}',
    b'{"MODEL":"gpt-4o"}',  # alone: no model here, gpt-4o in Go
    b'{"Model":"gpt-4o","messages":[]}',
    b'{"messages":[],"mOdEl":"gpt-4o"}',
    b'{"model":"cheap-model","MOD\\u0045L":"gpt-4o"}',
    b'{"model":"cheap-model","Mod\\u0065l":"gpt-4o"}',
    b'{"model":"cheap-model","\\u004d\\u004F\\u0044\\u0045\\u004c":"gpt-4o"}',
    b'{"mod\\u0065l":"cheap-model","\\u004dodel":"gpt-4o"}',
    b'{"model":"cheap-model","mo_del":"gpt-4o"}',  # json/v2 case:ignore also drops _ and -
    b'{"model":"cheap-model","MO-DEL":"gpt-4o"}',
    b'{"model":"cheap-model","mo\\u005fdel":"gpt-4o","x":1}',
    b'{"model":"cheap-model" , "MODEL"\n:\t"gpt-4o"}',
    b'{"model":"cheap-model","MODEL":null}',
    b'{"model":"cheap-model","MODEL":{"name":"gpt-4o"}}',
    b'{"a":{"model":"x"},"MODEL":"gpt-4o","b":["MODEL"],"model":"cheap-model"}',
]


@pytest.mark.parametrize("body", CASE_VARIANTS)
def test_model_in_another_case_is_refused(body: bytes) -> None:
    assert isinstance(orjson.loads(body), dict)  # a parser accepts it: only the gateway's own check stands between
    with pytest.raises(BadBody, match="another case") as e:
        read_model(body)
    assert e.value.message.isprintable() and len(e.value.message) < 200
    assert "gpt-4o" not in e.value.message and "cheap" not in e.value.message  # nothing of the body is echoed


@pytest.mark.parametrize(
    "body",
    [
        b'{"model\\u0000":"gpt-4o"}',  # "model" to a decoder of C strings, no model to orjson
        b'{"model":"cheap-model","model\\u0000x":"gpt-4o"}',
        b'{"\\u0000":1,"model":"cheap-model"}',
        b'{"mo\\u0000del":"x","model":"cheap-model"}',
    ],
)
def test_a_top_level_key_holding_a_nul_is_refused(body: bytes) -> None:
    assert isinstance(orjson.loads(body), dict)
    with pytest.raises(BadBody, match="NUL"):
        read_model(body)


def test_a_nul_in_a_nested_key_or_a_value_is_fine() -> None:
    body = b'{"messages":[{"model\\u0000":"x","content":"a\\u0000b"}],"model":"gpt-4o"}'
    assert read_model(body).model == "gpt-4o"


def test_the_go_style_decoder_sees_the_reported_bypass() -> None:
    """The third oracle is worth having: on the report's body it disagrees with orjson and Python's json."""
    body = CASE_VARIANTS[0]
    assert oracle_model(body) == python_model(body) == "cheap-model"
    assert go_model(body) == go_model(body, go_v2_fold_name) == "gpt-4o"
    assert go_model(b'{"MODEL":"gpt-4o"}') == "gpt-4o"
    assert go_model(b'{"model":"a","MODEL":null}') == "a"  # a null leaves the field as it was
    assert go_model(b'{"mo_del":"gpt-4o"}') is None and go_model(b'{"mo_del":"gpt-4o"}', go_v2_fold_name) == "gpt-4o"
    assert go_fold_name("\u212aelvin") == "KELVIN" and go_fold_name("\u017fun") == "SUN"


def test_only_the_kelvin_sign_and_the_long_s_fold_into_ascii() -> None:
    """The Go-style decoder's one table, against this Python's Unicode database.

    The non-ASCII characters whose lower, upper or case-folded form is one
    ASCII letter: the Kelvin sign, the long s, and the dotless i, which Go's
    SimpleFold leaves alone (it has an upper case but no case folding).
    """
    reach = {
        c
        for c in range(0x80, sys.maxunicode + 1)
        if any(len(x) == 1 and x.isascii() for x in (chr(c).lower(), chr(c).upper(), chr(c).casefold()))
    }
    assert reach == {0x0131, *GO_FOLDS_TO_ASCII}
    assert not set("MODEL") & set(GO_FOLDS_TO_ASCII.values())  # so "model" folds only from ASCII spellings


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'\xef\xbb\xbf{"model":"gpt-4o"}', "byte order mark"),
        (b'{"model":"gpt-4o","x":"\xff"}', "not valid UTF-8 (byte 23)"),
        (b'{"model":"\xc3"}', "not valid UTF-8"),
        (b'{"model":"\\ud800"}', "surrogate"),
        (b"", "empty"),
        (b"  \n", "empty"),
        (b'{"model":"gpt-4o",}', "could not be read as JSON"),
        (b'{"model":"gpt-4o"} {}', "could not be read as JSON"),
        (b'{"model":"gpt-4o"}\x00', "could not be read as JSON"),
        (b'{"model":NaN}', "could not be read as JSON"),
        (b'{"n":1e400,"model":"gpt-4o"}', "infinity"),
        (b'{"n":' + b"9" * 400 + b',"model":"gpt-4o"}', "infinity"),
        (b'{"a":' + b"[" * 2000 + b"]" * 2000 + b',"model":"gpt-4o"}', "depth"),
        (b'["model","gpt-4o"]', "must be a JSON object"),
        (b'"gpt-4o"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
    ],
)
def test_unreadable_bodies_are_refused_with_a_plain_reason(body: bytes, words: str) -> None:
    with pytest.raises(BadBody) as e:
        read_model(body)
    assert words in e.value.message
    assert e.value.message.isprintable() and len(e.value.message) < 200
    assert "gpt-4o" not in e.value.message  # nothing of the body is echoed


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":5}',
        b'{"model":null}',
        b'{"model":["gpt-4o"]}',
        b'{"model":{"name":"gpt-4o"}}',
        b'{"model":true}',
    ],
)
def test_a_model_that_is_not_a_string_is_unknown(body: bytes) -> None:
    field = read_model(body)
    assert field == ModelField(None, -1, -1)
    assert rename(body, field, "qwen-plus") == body


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b" \r\n\t{ \n } \n",
        b'{"messages":[{"model":"gpt-4o"}]}',
        b'{"a":{"model":"gpt-4o"},"b":[{"model":"o1"}]}',
        b'{"model ":"o1","\\"model\\"":"x"," model":1,"modeI":2,"mod\\u0435l":3,"\\u212aodel":4}',
        b'{"messages":[{"MODEL":"gpt-4o","Model":"o1"}],"x":{"mo_del":1}}',
        b'{"x":"MODEL","y":["Model","model"],"z":"\\"MODEL\\": 1"}',
        b'{"x":"\\"model\\":\\"gpt-4o\\""}',
        b'{"x\\"model":"gpt-4o"}',
        b'{"\\\\":"x","model\\\\":"gpt-4o"}',
    ],
)
def test_no_top_level_model(body: bytes) -> None:
    assert read_model(body) == ModelField(None, -1, -1)
    assert go_model(body) is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"\\"model":"a","model":"gpt-4o"}',
        b'{"x\\\\\\"model":"a","model":"gpt-4o"}',
        b'{"a":["\\"model","\\\\"],"model":"gpt-4o","b":{"model":"x"}}',
        b'{"' + b"\\\\" * 40 + b'\\"model":"a","model":"gpt-4o"}',
    ],
)
def test_a_model_key_inside_another_string_after_an_escaped_quote_is_not_a_key(body: bytes) -> None:
    field = read_model(body)
    assert field.model == "gpt-4o"
    assert body[field.start : field.end] == b'"gpt-4o"'


def test_huge_and_odd_numbers_around_the_model() -> None:
    body = b'{"a":123456789012345678901234567890,"b":-0.0e-0,"c":1E+308,"model":"gpt-4o","d":-1.5e-300}'
    field = read_model(body)
    assert field.model == "gpt-4o"
    assert rename(body, field, "m") == body.replace(b'"gpt-4o"', b'"m"')


def test_deep_nesting_within_the_parser_limit() -> None:
    deep = b"[" * 1000 + b'{"model":"inner"}' + b"]" * 1000
    body = b'{"a":' + deep + b',"model":"gpt-4o","z":' + deep + b"}"
    field = read_model(body)
    assert field.model == "gpt-4o"
    assert rename(body, field, "qwen") == body.replace(b'"gpt-4o"', b'"qwen"')


def test_whitespace_around_the_object_is_kept() -> None:
    body = b'\r\n \t{"model":"gpt-4o"}  \n\n'
    out = rename(body, read_model(body), "qwen")
    assert out == b'\r\n \t{"model":"qwen"}  \n\n'


def test_string_values_with_brackets_quotes_and_escapes_do_not_confuse_the_scanner() -> None:
    body = b'{"a":"}]{[\\"\\\\","b":["\\\\",{"c":"\\"}"}],"model":"g\\u0070t-4o\\n","z":"\\\\"}'
    field = read_model(body)
    assert field.model == "gpt-4o\n"
    assert body[field.start : field.end] == b'"g\\u0070t-4o\\n"'


def test_a_new_name_is_json_encoded() -> None:
    body = b'{"model":"gpt-4o"}'
    out = rename(body, read_model(body), 'we"ird\\ \u00e9\U0001f600\n')
    assert orjson.loads(out) == {"model": 'we"ird\\ \u00e9\U0001f600\n'}


def test_a_large_chat_body_with_nested_model_keys_and_the_model_last() -> None:
    """1 MiB: a thousand nested "model" keys, brackets and quotes inside strings, then the real one."""
    messages = [{"role": "user", "content": "x" * 1000 + '"]}{[', "model": "n"} for _ in range(1000)]
    body = orjson.dumps({"messages": messages, "model": "gpt-4o"})
    field = read_model(body)
    assert field.model == "gpt-4o" and body[field.end :] == b"}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"application/json", True),
        (b"Application/JSON; charset=utf-8", True),
        (b" application/json ;charset=UTF-8", True),
        (b"application/vnd.api+json", True),
        (b"application/merge-patch+JSON", True),
        (b"application/+json", False),
        (b"application/jsonl", False),
        (b"application/json-seq", False),
        (b"text/json", False),
        (b"text/plain", False),
        (b"multipart/form-data; boundary=x", False),
        (b"application/x-www-form-urlencoded", False),
        (b"", False),
        (None, False),
    ],
)
def test_is_json(value: bytes | None, expected: bool) -> None:
    assert is_json(value) is expected
