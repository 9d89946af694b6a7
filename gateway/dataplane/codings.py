"""Transfer codings an upstream applied besides ``chunked``, taken off before the body is relayed.

A transfer coding belongs to one hop, not to the content (RFC 9112 §6.1),
and any recipient may remove it (RFC 9112 §7). The gateway sends no ``TE``
upstream, so an upstream that answers ``Transfer-Encoding: gzip, chunked``
anyway has coded a hop its client (the gateway) never agreed to, and the
gateway's own client never asked for one either: most HTTP clients cannot
read a transfer coding other than ``chunked``. So the gateway decodes
``gzip`` (``x-gzip``) and ``deflate`` as the body streams, and frames what
comes out itself. A coding it cannot decode is a 502 before anything is
passed on: relayed as it came, the body would reach the client changed.

Only responses that carry such a coding pay for this (the check on the
header's value is one comparison with ``b"chunked"``).
"""

from __future__ import annotations

import zlib

# gzip (RFC 9112 §7.2, x-gzip its alias) and deflate (§7.2: the zlib format).
_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


class UnsupportedCoding(ValueError):
    """A transfer coding the gateway cannot take off (or ``chunked`` somewhere but last)."""


class Decoder:
    """The codings of one response body, removed in reverse order of application, as the body streams."""

    __slots__ = ("stages",)

    def __init__(self, codings: list[bytes]) -> None:
        # Applied left to right, so removed right to left.
        self.stages = [zlib.decompressobj(_WBITS[c]) for c in reversed(codings)]

    def feed(self, data: bytes) -> bytes:
        """Decoded bytes for this piece of the body (maybe none yet); raises ``zlib.error`` on a bad body."""
        for stage in self.stages:
            data = stage.decompress(data)
        return data

    def end(self) -> bytes:
        """What was still held back; raises ``zlib.error`` when the coded body was cut short."""
        out = b""
        for stage in self.stages:
            out = stage.decompress(out) + stage.flush()
            if not stage.eof:
                raise zlib.error("coded body ended early")
        return out


def decoder(value: bytes) -> tuple[Decoder | None, bool]:
    """A decoder for a ``Transfer-Encoding`` value (None when it is only ``chunked``), and whether
    ``chunked`` is last (else the body ends when the connection does: RFC 9112 §6.3).

    Raises :class:`UnsupportedCoding` for a coding not known here or ``chunked`` before another.
    """
    codings = [c for c in (t.strip().lower() for t in value.split(b",")) if c]
    chunked = bool(codings) and codings[-1] == b"chunked"
    if chunked:
        codings.pop()
    for c in codings:
        if c not in _WBITS:
            raise UnsupportedCoding(c.decode("latin-1")[:40])
    return (Decoder(codings) if codings else None), chunked
