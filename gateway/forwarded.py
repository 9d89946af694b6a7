"""RFC 7239 ``Forwarded``, parsed by its grammar and nothing looser.

A trusted proxy appends its element to whatever the client sent, so the
client writes the start of the field and the proxy the end. A lenient
parser lets the client's part reach into the proxy's: an unterminated
quoted-string or a trailing backslash would swallow the appended
``, for=<real address>`` and leave the client's own ``for=`` as the last
word. So the field is read exactly by its grammar::

    Forwarded         = 1#forwarded-element              (RFC 7230 list: OWS "," OWS)
    forwarded-element = [ forwarded-pair ] *( ";" [ forwarded-pair ] )
    forwarded-pair    = token "=" value
    value             = token / quoted-string           (quoted-pair: "\\" HTAB/SP/VCHAR/obs-text)

and anything that does not fit (an unterminated or broken quoted-string, a
parameter given twice in one element, a ``for``/``by`` that is not a node
name, a control character) makes the whole field unreadable: the caller
then judges the request as ``invalid``, never as some shorter or shifted
reading of it. Empty list elements are skipped as RFC 7230 §7 asks
(``", for=x"`` is what a proxy that appends to an absent field writes).
Whitespace is allowed around ``,`` and ``;`` only.

Every header line is parsed on its own and the elements are joined, which
is what the lines mean when combined (RFC 7230 §3.2.2); a quote can never
run from one line into the next.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QDTEXT = re.compile(r"[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]+")
_QUOTABLE = frozenset("\t " + "".join(map(chr, range(0x21, 0x7F))) + "".join(map(chr, range(0x80, 0x100))))
_OWS = " \t"

# RFC 7239 §6: node = nodename [ ":" node-port ]
_OBF = r"_[A-Za-z0-9._-]+"
_NODE = re.compile(rf"(?P<name>[0-9.]+|\[[0-9A-Fa-f:.]+\]|(?i:unknown)|{_OBF})(?::(?P<port>[0-9]{{1,5}}|{_OBF}))?")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]+)(?::[0-9]*)?")


class ForwardedError(ValueError):
    """The field does not follow RFC 7239's grammar."""


@dataclass(frozen=True, slots=True)
class Node:
    """A ``for``/``by`` value: an address (``ip`` is its text, brackets removed), or not."""

    text: str
    ip: str | None  # None for "unknown" and obfuscated identifiers


def elements(values: Sequence[str]) -> list[dict[str, str]]:
    """The elements of all header lines, left to right, as ``{name: value}``.

    Names are lower-case (they are case-insensitive); quoted values are
    unquoted. Syntax only: values are not checked against their parameter.
    Raises :class:`ForwardedError`.
    """
    out: list[dict[str, str]] = []
    for line, value in enumerate(values):
        try:
            out += _parse_line(value)
        except ForwardedError as e:
            where = f"line {line + 1}, " if len(values) > 1 else ""
            raise ForwardedError(f"{where}{e}") from None
    return out


def _parse_line(text: str) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    element: dict[str, str] = {}
    substance = False  # this element has a pair or a ';', so it is not an empty list element
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _OWS:
            i += 1
        if i < n and text[i] not in ",;":
            m = _TOKEN.match(text, i)
            if m is None:
                raise ForwardedError(f"expected a parameter name at offset {i}, found {text[i]!r}")
            name = m.group().lower()
            i = m.end()
            if i >= n or text[i] != "=":
                raise ForwardedError(f"parameter {name!r} has no '=' right after its name")
            value, i = _value(text, i + 1)
            if name in element:
                raise ForwardedError(f"parameter {name!r} given twice in one element")
            element[name] = value
            substance = True
            while i < n and text[i] in _OWS:
                i += 1
        if i >= n:
            if substance:
                out.append(element)
            return out
        ch = text[i]
        i += 1
        if ch == ";":
            substance = True
        elif ch == ",":
            if substance:
                out.append(element)
            element, substance = {}, False
        else:
            raise ForwardedError(f"unexpected {ch!r} at offset {i - 1} (expected ';', ',' or the end)")


def _value(text: str, i: int) -> tuple[str, int]:
    n = len(text)
    if i < n and text[i] == '"':
        i += 1
        parts: list[str] = []
        while True:
            m = _QDTEXT.match(text, i)
            if m is not None:
                parts.append(m.group())
                i = m.end()
            if i >= n:
                raise ForwardedError("unterminated quoted-string")
            ch = text[i]
            if ch == '"':
                return "".join(parts), i + 1
            if ch == "\\":
                if i + 1 >= n:
                    raise ForwardedError("quoted-string ends with a lone backslash")
                if text[i + 1] not in _QUOTABLE:
                    raise ForwardedError(f"{text[i + 1]!r} cannot be escaped in a quoted-string")
                parts.append(text[i + 1])
                i += 2
            else:
                raise ForwardedError(f"{ch!r} is not allowed in a quoted-string")
    m = _TOKEN.match(text, i)
    if m is None:
        found = repr(text[i]) if i < n else "the end"
        raise ForwardedError(f"expected a token or a quoted-string at offset {i}, found {found}")
    return m.group(), m.end()


def node(value: str) -> Node:
    """A ``for``/``by`` value as an RFC 7239 §6 node name. Raises :class:`ForwardedError`."""
    m = _NODE.fullmatch(value)
    if m is None:
        raise ForwardedError(f'{value[:64]!r} is not a node name (IPv4, "[IPv6]", unknown or _obfuscated)')
    name = m.group("name")
    try:
        if name[0] == "[":
            ipaddress.IPv6Address(name[1:-1])
            return Node(value, name)
        if name[0].isdigit():
            ipaddress.IPv4Address(name)
            return Node(value, name)
    except ValueError:
        raise ForwardedError(f"{value[:64]!r} is not a node name: bad address") from None
    return Node(value, None)


def check(element: dict[str, str]) -> None:
    """Check the values of the parameters RFC 7239 defines. Raises :class:`ForwardedError`."""
    for name in ("for", "by"):
        if name in element:
            node(element[name])
    proto = element.get("proto")
    if proto is not None and not _SCHEME.fullmatch(proto):
        raise ForwardedError(f"proto={proto[:64]!r} is not a URI scheme")
    host = element.get("host")
    if host is not None and not _HOST.fullmatch(host):
        raise ForwardedError(f"host={host[:64]!r} is not a host")


def for_nodes(values: Sequence[str]) -> list[Node | None]:
    """The ``for`` node of each element, left to right (``None`` where an element has none).

    The whole field is checked first: one bad element anywhere makes all of
    it unreadable. Raises :class:`ForwardedError`.
    """
    parsed = elements(values)
    for element in parsed:
        check(element)
    return [node(e["for"]) if "for" in e else None for e in parsed]
