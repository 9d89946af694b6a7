"""The request path, in the one form that is both judged and forwarded.

A relay behind the gateway may decode percent-escapes, merge slashes and
resolve dot segments (nginx's ``proxy_pass http://host/;`` does all three).
If the gateway judged one spelling of a path and forwarded another, a caller
could get ``/v1/embeddings%2F..%2Fchat%2Fcompletions`` judged as an
embeddings call and served as a chat call. So the path is brought to one
canonical form here, the policy decides on that form, and that same form is
what goes upstream and into the access log.

Spellings that have no honest use in an OpenAI-compatible API and exist only
to mean different things to different parsers are refused outright rather
than normalised: an encoded ``/``, ``\\``, ``.`` or ``%`` (the last covers
double encoding at any depth), encoded control characters, a literal
backslash, and ``.``/``..`` segments in any spelling (``..;x`` included,
which some servers read as ``..``).
"""

from __future__ import annotations

import re

_HEX = frozenset(b"0123456789abcdefABCDEF")
# RFC 3986 §2.3 unreserved characters, minus "." (an encoded dot is refused).
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_~")
_REFUSED_ESCAPES = {
    ord("/"): "an encoded '/' (%2F)",
    ord("\\"): "an encoded '\\' (%5C)",
    ord("."): "an encoded '.' (%2E)",
    ord("%"): "an encoded '%' (%25, double encoding)",
}
_SLASHES = re.compile(rb"//+")
# Bytes that need a closer look; a path without any is already canonical.
_SUSPECT = re.compile(rb"[%.\\;\x00-\x20\x7f-\xff]|//")
_NOT_PRINTABLE_ASCII = re.compile(rb"[\x00-\x20\x7f-\xff]")


class BadPath(ValueError):
    """A request path that is refused with a 400 rather than forwarded."""


def canonical(raw: bytes) -> str:
    """The path as the policy judges it and the upstream receives it, or :class:`BadPath`.

    Percent-escapes of unreserved characters are decoded (``%41`` is ``A``),
    other escapes are kept with upper-case hex, and runs of slashes become
    one. The result is ASCII text, so ``str`` comparison in the policy and the
    bytes on the wire agree.
    """
    if not raw.startswith(b"/"):
        raise BadPath("the request target must be an absolute path")
    if _SUSPECT.search(raw) is None:
        return raw.decode("latin-1")
    if _NOT_PRINTABLE_ASCII.search(raw) is not None:
        raise BadPath("the request path must be printable ASCII; percent-encode other bytes")
    if b"\\" in raw:
        raise BadPath("backslashes are not allowed in the request path")
    if b"%" in raw:
        raw = _unescape(raw)
    raw = _SLASHES.sub(b"/", raw)
    for segment in raw.split(b"/"):
        if segment.split(b";", 1)[0] in (b".", b".."):
            raise BadPath("'.' and '..' path segments are not allowed")
    return raw.decode("latin-1")


def _unescape(raw: bytes) -> bytes:
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c != 0x25:  # '%'
            out.append(c)
            i += 1
            continue
        pair = raw[i + 1 : i + 3]
        if len(pair) < 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise BadPath("a '%' in the request path must start a percent-escape of two hex digits")
        value = int(pair, 16)
        refused = _REFUSED_ESCAPES.get(value)
        if refused is not None:
            raise BadPath(f"the request path contains {refused}")
        if value < 0x20 or value == 0x7F:
            raise BadPath("the request path contains an encoded control character")
        if value in _UNRESERVED:
            out.append(value)
        else:
            out += b"%" + pair.upper()
        i += 3
    return bytes(out)
