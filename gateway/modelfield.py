"""The ``model`` field of a JSON request body: read to be judged, renamed without reshaping the body.

orjson validates the body and decodes the value, but no JSON library says
where a value sits in the bytes, and a rename must keep every other byte
(key order, whitespace, unknown fields, escapes) as the client sent it. So
a small scanner finds the span of the top-level ``"model"`` value in the
bytes orjson has already accepted. Because the grammar was checked first,
the scanner need not check it again: it looks for keys spelled like
``model`` (a quote that is not escaped opens a string, a string followed by
a colon is a key) and, only when there are several, for how deeply each is
nested, with ``re`` and ``bytes`` doing the passes over the body in C.

A top-level ``model`` key written twice is refused, however it is spelled
(``"mod\\u0065l"`` is the same key): parsers disagree on which copy wins
(orjson and Python's ``json`` take the last, others the first), and a
gateway that judged one model while the upstream reads another would be a
way around every model rule. For the same reason a body orjson cannot read
(invalid UTF-8, a byte order mark, a lone surrogate escape, a number too
large for a double, nesting deeper than 1024) is refused rather than
guessed at: the refusal is an OpenAI-shaped 400, never a different reading.

A top-level key that is ``model`` in another case (``"MODEL"``,
``"Mod\\u0065l"``) is refused too, alone or beside ``"model"``: Go's
``encoding/json`` (Ollama, gin) and ASP.NET's web defaults match object keys
to a struct's fields case-insensitively, so ``{"model":"cheap","MODEL":"gpt-4o"}``
would be judged as ``cheap`` here and served as ``gpt-4o`` there. Go folds
with Unicode simple case folding (``fold.go``): the only non-ASCII runes that
fold to an ASCII letter are the Kelvin sign (to ``k``) and the long s (to
``s``), and ``model`` has neither letter, so its fold set is exactly the 32
ASCII case spellings; .NET's and Java's ignore-case comparisons reach no
further for these letters. Go's ``encoding/json/v2`` also ignores ``_`` and
``-`` when it matches without case (``case:ignore``), so ``"mo_del"`` and
``"MO-DEL"`` are refused as well, and so is a top-level key holding a NUL,
which a decoder of C strings reads only up to it. The check reads the keys
orjson decoded (escapes undone, top level only), joined into one string and
searched in C: the extra work per body is one join, one count and one search
over its top-level keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
# Every spelling of "model" (and a few other five-letter strings), escapes included; _is_model decides.
_MAYBE_MODEL = re.compile(rb'"(?:[model]|\\u00[0-9a-fA-F]{2}){5}"')
_COLON = re.compile(rb"[ \t\n\r]*:[ \t\n\r]*")
_BACKSLASH = b"\\"
_BOM = b"\xef\xbb\xbf"
_MODEL = b'"model"'
# A top-level key, in the keys joined by NUL, that a case-folding decoder reads as "model".
# re.ASCII: the fold set of these five letters is ASCII only (see above). A key holding a
# NUL is refused first (a C-string decoder reads "model\u0000x" as "model"), so the
# NULs in the joined keys are exactly the separators.
_FOLDS_TO_MODEL = re.compile(r"(?<![^\x00])[_-]*m[_-]*o[_-]*d[_-]*e[_-]*l[_-]*(?![^\x00])", re.I | re.A)
_KEY_SEP = "\x00"
_JUST_MODEL = ["model"]


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
    keys = _KEY_SEP.join(doc)
    if doc and keys.count(_KEY_SEP) != len(doc) - 1:
        raise BadBody("The request body has a top-level key with a NUL character (\\u0000) in it.")
    folded = _FOLDS_TO_MODEL.findall(keys)
    if folded and folded != _JUST_MODEL:
        raise BadBody(
            'The request body has a key that is "model" in another case or spelling (such as "MODEL"); '
            'some servers read it as "model": send the model only as "model".'
        )
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
    start, end = spans[0]
    if start < 0:
        raise AssertionError("modelfield: scanner and parser disagree")
    return ModelField(value, start, end)


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
    """Each top-level key that decodes to ``model``: its string value's span, or (-1, -1) for another value.

    Work done in Python grows with the number of keys spelled like ``model``;
    the rest is ``re`` and ``bytes`` in C, so a hostile body made of many tiny
    tokens costs a few passes over its bytes, in the range of parsing it.
    """
    keys = [(m.start(), m.end()) for m in _MAYBE_MODEL.finditer(body) if _is_model_key(body, m)]
    if len(keys) > 1:  # some are nested (or a duplicate): keep those at the top level
        keys = [key for key, depth in zip(keys, _depths(body, [k for k, _ in keys]), strict=True) if depth == 1]
    spans = []
    for _, end in keys:
        value = _COLON.match(body, end)
        assert value is not None
        string = _STRING.match(body, value.end())
        spans.append((string.start(), string.end()) if string is not None else (-1, -1))
    return spans


def _is_model_key(body: bytes, m: re.Match[bytes]) -> bool:
    """A real string (its opening quote not escaped), followed by ":", that decodes to ``model``."""
    return _opens_string(body, m.start()) and _COLON.match(body, m.end()) is not None and _is_model(m.group())


def _opens_string(body: bytes, pos: int) -> bool:
    """The quote at ``pos`` is not escaped: an even run of backslashes before it (a valid body)."""
    size = 16
    while True:
        before = body[max(0, pos - size) : pos]
        run = len(before) - len(before.rstrip(b"\\"))
        if run < len(before) or size >= pos:
            return run % 2 == 0
        size *= 2


def _depths(body: bytes, positions: list[int]) -> list[int]:
    """Nesting depth at each position (ascending, each a string's opening quote; 1: in the top object)."""
    depths, depth, seen = [], 0, 0
    for pos in positions:
        between = _STRING.sub(b"", body[seen:pos])  # both ends are outside strings: what is left is structure
        depth += between.count(b"{") + between.count(b"[") - between.count(b"}") - between.count(b"]")
        depths.append(depth)
        seen = pos
    return depths


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
