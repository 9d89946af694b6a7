"""The ``model`` field of a JSON request body: read to be judged, renamed without reshaping the body.

orjson validates the body and decodes the value, but no JSON library says
where a value sits in the bytes, and a rename must keep every other byte
(key order, whitespace, unknown fields, escapes) as the client sent it. So
a small scanner walks the top level of the bytes orjson has already
accepted and finds the span of the ``"model"`` value. Because the grammar
was checked first, the scanner need not check it again; it jumps over
strings and nested values with regular expressions, so its cost grows with
the number of tokens, not bytes.

A top-level ``model`` key written twice is refused, however it is spelled
(``"mod\\u0065l"`` is the same key): parsers disagree on which copy wins
(orjson and Python's ``json`` take the last, others the first), and a
gateway that judged one model while the upstream reads another would be a
way around every model rule. For the same reason a body orjson cannot read
(invalid UTF-8, a byte order mark, a lone surrogate escape, a number too
large for a double, nesting deeper than 1024) is refused rather than
guessed at: the refusal is an OpenAI-shaped 400, never a different reading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

_WS = re.compile(rb"[ \t\n\r]*")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_SCALAR = re.compile(rb"[^,\]} \t\n\r]*")
# Inside a nested value only brackets count; strings are matched whole so a bracket in one is skipped.
_NESTED = re.compile(rb'[\[\]{}]|"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_OPEN, _CLOSE, _QUOTE, _BACKSLASH = b"{[", b"}]", ord('"'), b"\\"
_BOM = b"\xef\xbb\xbf"
_MODEL = b'"model"'


class BadBody(ValueError):
    """A body whose model cannot be read safely; ``message`` is meant for the client (a 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class ModelField:
    model: str | None  # the top-level "model" string; None when absent or not a string
    start: int  # byte span of its JSON string value, quotes included; -1 when model is None
    end: int


NO_MODEL = ModelField(None, -1, -1)


def read_model(body: bytes) -> ModelField:
    """The top-level ``model`` of a JSON object body; :class:`BadBody` when it cannot be told for sure."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadBody(_unreadable(body, e)) from None
    if not isinstance(doc, dict):
        raise BadBody("The request body must be a JSON object.")
    if "model" not in doc:
        return NO_MODEL
    spans = _model_spans(body)
    if len(spans) > 1:
        raise BadBody('The request body has more than one "model" field.')
    if len(spans) != 1:  # the parser saw a model the scanner did not: a bug here, never a guess
        raise AssertionError("modelfield: scanner and parser disagree")
    value = doc["model"]
    if not isinstance(value, str):
        return NO_MODEL
    return ModelField(value, *spans[0])


def rename(body: bytes, field: ModelField, new: str) -> bytes:
    """``body`` with only the model's value replaced (JSON-encoded); without a model string, unchanged."""
    if field.start < 0:
        return body
    view = memoryview(body)
    return b"".join((view[: field.start], orjson.dumps(new), view[field.end :]))


def is_json(content_type: bytes | None) -> bool:
    """``application/json`` or ``application/*+json``, any case, any parameters."""
    if not content_type:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    if media == b"application/json":
        return True
    return media.startswith(b"application/") and media.endswith(b"+json") and len(media) > 17


def _model_spans(body: bytes) -> list[tuple[int, int]]:
    """The value span of every top-level key that decodes to ``model`` (the body is valid JSON)."""
    spans: list[tuple[int, int]] = []
    pos = _skip_ws(body, _skip_ws(body, 0) + 1)  # past the object's "{"
    if body[pos] != _QUOTE:  # "{}"
        return spans
    while True:
        key = _STRING.match(body, pos)
        assert key is not None
        start = _skip_ws(body, _skip_ws(body, key.end()) + 1)  # past the ":"
        end = _skip_value(body, start)
        if _is_model(key.group()):
            spans.append((start, end))
        pos = _skip_ws(body, end)
        if body[pos] != ord(","):
            return spans
        pos = _skip_ws(body, pos + 1)


def _skip_ws(body: bytes, pos: int) -> int:
    m = _WS.match(body, pos)
    assert m is not None
    return m.end()


def _skip_value(body: bytes, pos: int) -> int:
    first = body[pos : pos + 1]
    if first == b'"':
        m = _STRING.match(body, pos)
    elif first in (b"{", b"["):
        depth = 0
        for token in _NESTED.finditer(body, pos):
            c = body[token.start() : token.start() + 1]
            if c in _OPEN:
                depth += 1
            elif c in _CLOSE:
                depth -= 1
                if depth == 0:
                    return token.end()
        raise AssertionError("modelfield: unbalanced value in a validated body")
    else:
        m = _SCALAR.match(body, pos)
    assert m is not None
    return m.end()


def _is_model(key: bytes) -> bool:
    return key == _MODEL or (_BACKSLASH in key and orjson.loads(key) == "model")


def _unreadable(body: bytes, e: orjson.JSONDecodeError) -> str:
    """Why the body is refused, in words a client can act on (no part of the body is echoed)."""
    if not body.strip(b" \t\n\r"):
        return "The request body is empty; a JSON object was expected."
    if body.startswith(_BOM):
        return "The request body starts with a byte order mark; send JSON as UTF-8 without one."
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as u:
        return f"The request body is not valid UTF-8 (byte {u.start})."
    return f"The request body could not be read as JSON: {e.msg} (line {e.lineno}, column {e.colno})."
