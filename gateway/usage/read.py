"""Token usage out of what a provider answered: a ``usage`` object in every known shape, whole or streamed.

Shapes read (key names decide, so a provider that answers one path in another's
shape is still read):

* OpenAI chat completions, completions, embeddings: ``prompt_tokens``,
  ``completion_tokens`` (none for embeddings), ``prompt_tokens_details.cached_tokens``,
  ``completion_tokens_details.reasoning_tokens``;
* OpenAI Responses API: ``input_tokens``, ``output_tokens``,
  ``input_tokens_details.cached_tokens``, ``output_tokens_details.reasoning_tokens``;
  streamed, in the ``response`` of ``response.completed`` (or ``.incomplete``, ``.failed``);
* Anthropic messages: ``input_tokens`` (the uncached part), ``cache_creation_input_tokens``,
  ``cache_read_input_tokens``, ``output_tokens``; input is their sum and ``cached`` the cache
  reads, so that ``cached`` is part of ``input`` as OpenAI reports it. Streamed, ``message_start``
  carries the input side and ``message_delta`` the final output count (its own input fields,
  when it has them, win): usage is known once ``message_delta`` came.

A count that is not a non-negative integer is read as absent; an object without
any count is no usage at all (``None``), never a zero.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import orjson

from . import Usage

_COMPLETED = frozenset({"response.completed", "response.incomplete", "response.failed"})
_ANTHROPIC = frozenset({"cache_creation_input_tokens", "cache_read_input_tokens"})
_LAST_USAGE = re.compile(rb'"usage"\s*:\s*\{')


def _count(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if type(value) is int and value >= 0:
        return value
    return None


def _detail(obj: Mapping[str, Any], key: str, inner: str) -> int:
    details = obj.get(key)
    if isinstance(details, dict):
        return _count(details, inner) or 0
    return 0


def from_usage(obj: object, anthropic: bool = False) -> Usage | None:
    """A provider's ``usage`` object in any known shape (``anthropic``: read ``input_tokens`` as
    Anthropic's uncached part even without a cache field); None when it holds no count."""
    if not isinstance(obj, dict):
        return None
    prompt = _count(obj, "prompt_tokens")
    if prompt is not None or "completion_tokens" in obj:
        return Usage(
            prompt or 0,
            _count(obj, "completion_tokens") or 0,
            _detail(obj, "prompt_tokens_details", "cached_tokens"),
            _detail(obj, "completion_tokens_details", "reasoning_tokens"),
        )
    given, output = _count(obj, "input_tokens"), _count(obj, "output_tokens")
    if given is None and output is None:
        return None
    if anthropic or not _ANTHROPIC.isdisjoint(obj):
        read = _count(obj, "cache_read_input_tokens") or 0
        created = _count(obj, "cache_creation_input_tokens") or 0
        return Usage((given or 0) + read + created, output or 0, read, 0)
    return Usage(
        given or 0,
        output or 0,
        _detail(obj, "input_tokens_details", "cached_tokens"),
        _detail(obj, "output_tokens_details", "reasoning_tokens"),
    )


def from_body(body: bytes, anthropic: bool = False) -> Usage | None:
    """The top-level ``usage`` of a whole JSON answer; None when it is not JSON or has none."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    return from_usage(doc.get("usage"), anthropic or doc.get("type") == "message")


def from_tail(tail: bytes, anthropic: bool = False) -> Usage | None:
    """The last ``"usage": {...}`` object in the end of an answer too large to keep whole.

    OpenAI, the Responses API and Anthropic all write ``usage`` after the content, so the end of
    the body holds it. A key inside a JSON string is escaped (``\\"usage\\"``) and cannot match,
    so what is read is a real ``usage`` member; which object it belongs to is not checked (the
    shapes known here nest no other ``usage``).
    """
    matches = list(_LAST_USAGE.finditer(tail))
    if not matches:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(tail[matches[-1].end() - 1 :].decode("utf-8", "replace"))
    except ValueError:
        return None
    return from_usage(obj, anthropic)


class StreamUsage:
    """Usage read from a stream's events, one decoded JSON event at a time; the last report wins."""

    __slots__ = ("_start", "found")

    def __init__(self) -> None:
        self.found: Usage | None = None
        self._start: dict[str, Any] | None = None  # Anthropic's message_start usage, until message_delta

    def event(self, doc: object) -> None:
        if not isinstance(doc, dict):
            return
        kind = doc.get("type")
        if kind in _COMPLETED:
            response = doc.get("response")
            if isinstance(response, dict):
                self._found(from_usage(response.get("usage")))
            return
        if kind == "message_start":
            message = doc.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._start = usage
            return
        if kind == "message_delta":
            usage = doc.get("usage")
            if isinstance(usage, dict):
                merged = {**(self._start or {}), **usage}
                self._found(from_usage(merged, anthropic=True))
            return
        self._found(from_usage(doc.get("usage")))

    def _found(self, usage: Usage | None) -> None:
        if usage is not None:
            self.found = usage

    def known_input(self) -> int | None:
        """Input tokens the stream told before its final usage (Anthropic's ``message_start``)."""
        if self.found is not None:
            return self.found.input
        if self._start is not None:
            start = from_usage({**self._start, "output_tokens": 0}, anthropic=True)
            return start.input if start is not None else None
        return None
