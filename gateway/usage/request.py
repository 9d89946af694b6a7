"""What a request asks for in tokens (its output cap, whether it streams, whether it wants usage),
and the same body asking the upstream for usage, every other byte as the client sent it.

:func:`read_request` reads the fields a token budget needs from a held JSON
body: the output cap (``max_completion_tokens`` / ``max_tokens`` for chat,
``max_tokens`` for completions and Anthropic's messages, ``max_output_tokens``
for the Responses API; all three on a path not known), ``stream``, and the
client's own ``stream_options.include_usage``. A cap that is not a positive
integer raises :class:`BadTokens` naming the field, which the request path
answers with OpenAI's 400 (``null`` is no cap, as OpenAI reads it). A body that
is not a JSON object is ``readable=False``: charged the rule's default, never
waved through.

:func:`with_usage` sets ``stream_options.include_usage`` to ``true`` by splicing
bytes, as :mod:`gateway.modelfield` renames the model: the client's other
``stream_options`` keys, key order, whitespace, escapes and every other field
stay byte for byte (a re-serialised body could change what a first-key-wins
upstream reads in a nested duplicate), and so the model too.

A top-level field read here that appears twice, or in another case or spelling
(``"MAX_TOKENS"``, ``"maxTokens"``: Go's and .NET's decoders match keys without
case, Go's ``encoding/json/v2`` ignoring ``_`` and ``-``), is refused, for the
reason modelfield refuses a second model: the gateway would reserve for one
value and the upstream obey another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from ..modelfield import _depths, _opens_string
from .shapes import CHAT, COMPLETIONS, MESSAGES, RESPONSES, shape_of

_CAPS: dict[str | None, tuple[str, ...]] = {
    CHAT: ("max_completion_tokens", "max_tokens"),
    COMPLETIONS: ("max_tokens",),
    MESSAGES: ("max_tokens",),
    RESPONSES: ("max_output_tokens",),
}
_ALL_CAPS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_READ = frozenset({*_ALL_CAPS, "stream", "stream_options"})
_INCLUDE = "include_usage"

# A key that may be one of those read here: starts like "m" or "s" (or their escapes), letters and
# "_" (or escapes) after; which it is, and whether it is a key at the top level, is checked after.
_CANDIDATE = re.compile(rb'"(?:[a-z_]|\\u00[0-9a-fA-F]{2}){5,40}"')
_COLON = re.compile(rb"[ \t\n\r]*:[ \t\n\r]*")
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]')
_SCALAR = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[^,}\] \t\n\r]+')
_TRUE = b"true"


class BadTokens(ValueError):
    """A token field the gateway cannot read safely; ``message`` is for the client (a 400), ``param``
    names the field, ``code`` is OpenAI's (``integer_below_min_value``, ``invalid_type``, ...)."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class RequestTokens:
    """The token-related fields of one request body."""

    output_cap: int | None  # the largest output the request allows; None when it sets none
    stream: bool
    wants_usage: bool  # the client's own stream_options.include_usage is true
    readable: bool = True  # False: not a JSON object (nothing could be read; charge the default)


Asked = RequestTokens
UNREADABLE = RequestTokens(None, False, False, readable=False)


def read_request(body: bytes, path: str) -> RequestTokens:
    """The token fields of ``body`` sent to ``path``; :class:`BadTokens` for a cap that is not a
    positive integer or a field read here that is written twice or in another spelling."""
    doc = _object(body)
    if doc is None:
        return UNREADABLE
    _check_keys(body, doc)
    caps = [_cap(doc, name) for name in _CAPS.get(shape_of(path), _ALL_CAPS)]
    given = [cap for cap in caps if cap is not None]
    options = doc.get("stream_options")
    return RequestTokens(
        max(given) if given else None,  # two caps: the upstream obeys one of them, reserve the larger
        doc.get("stream") is True,
        isinstance(options, dict) and options.get(_INCLUDE) is True,
    )


def with_usage(body: bytes) -> bytes:
    """``body`` with ``stream_options.include_usage`` set to ``true`` (the same object if it already is).

    For a streamed request only (``stream: true``): OpenAI refuses ``stream_options`` on one that
    is not. Written twice inside ``stream_options``, every ``include_usage`` is set."""
    doc = _object(body)
    if doc is None:
        raise BadTokens("The request body must be a JSON object.", None)
    _check_keys(body, doc)
    if "stream_options" not in doc:
        start = body.index(b"{") + 1
        member = b'"stream_options":{"include_usage":true}' + (b"," if doc else b"")
        return body[:start] + member + body[start:]
    start, end = _value_span(body, _top_level(body, "stream_options")[0])
    options = doc["stream_options"]
    if options is None:
        return body[:start] + b'{"include_usage":true}' + body[end:]
    if not isinstance(options, dict):
        raise BadTokens(_type_message("stream_options", options, "an object"), "stream_options", "invalid_type")
    _check_spelling(options, frozenset({_INCLUDE}), "stream_options.")
    value = body[start:end]
    keys = _top_level(value, _INCLUDE)
    if not keys:
        member = b'"include_usage":true' + (b"," if options else b"")
        return body[: start + 1] + member + body[start + 1 :]
    if options[_INCLUDE] is True and len(keys) == 1:
        return body
    parts, last = [], 0
    for key_end in keys:
        vstart, vend = _value_span(value, key_end)
        parts += [value[last:vstart], _TRUE]
        last = vend
    parts.append(value[last:])
    return body[:start] + b"".join(parts) + body[end:]


def _object(body: bytes) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _cap(doc: dict[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise BadTokens(_type_message(name, value, "an integer"), name, "invalid_type")
    if value < 1:
        raise BadTokens(
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
            name,
            "integer_below_min_value",
        )
    return value


def _type_message(name: str, value: object, expected: str) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a decimal", str: "a string", list: "an array"}
    got = kinds.get(type(value), "an object")
    return f"Invalid type for '{name}': expected {expected}, but got {got} instead."


def _fold(key: str) -> str:
    return key.lower().replace("_", "").replace("-", "")


def _check_spelling(doc: dict[str, Any], names: frozenset[str], prefix: str = "") -> None:
    for key in doc:
        folded = _fold(key)
        if key not in names and any(_fold(name) == folded for name in names):
            name = prefix + next(n for n in names if _fold(n) == folded)
            raise BadTokens(
                f"The request body has a key that is '{name}' in another case or spelling ('{prefix}{key}'); "
                f"some servers read it as '{name}': send it only as '{name}'.",
                name,
            )


def _check_keys(body: bytes, doc: dict[str, Any]) -> None:
    """Refuse a field read here written in another spelling, or twice at the top level."""
    _check_spelling(doc, _READ)
    for name in _READ.intersection(doc):
        if len(_top_level(body, name)) > 1:
            raise BadTokens(f"The request body has more than one '{name}' field.", name)


def _top_level(body: bytes, name: str) -> list[int]:
    """Where each top-level key that decodes to ``name`` ends (just past its closing quote)."""
    found = []
    for m in _CANDIDATE.finditer(body):
        key = m.group()
        if (key[1:-1] == name.encode() or (b"\\" in key and orjson.loads(key) == name)) and _is_key(body, m):
            found.append(m)
    if len(found) > 1 or (found and body[: found[0].start()].count(b"{") > 1):
        depths = _depths(body, [m.start() for m in found])
        found = [m for m, depth in zip(found, depths, strict=True) if depth == 1]
    return [m.end() for m in found]


def _is_key(body: bytes, m: re.Match[bytes]) -> bool:
    return _opens_string(body, m.start()) and _COLON.match(body, m.end()) is not None


def _value_span(body: bytes, key_end: int) -> tuple[int, int]:
    """The span of the JSON value after the key that ends at ``key_end`` (a grammar orjson accepted)."""
    colon = _COLON.match(body, key_end)
    assert colon is not None
    start = colon.end()
    if body[start] not in b"{[":
        scalar = _SCALAR.match(body, start)
        assert scalar is not None
        return start, scalar.end()
    depth = 0
    for m in _TOKEN.finditer(body, start):
        token = m.group()
        if token[0] == 34:  # a string: no structure
            continue
        depth += 1 if token in (b"{", b"[") else -1
        if depth == 0:
            return start, m.end()
    raise AssertionError("usage.request: an unbalanced value in a body orjson accepted")
