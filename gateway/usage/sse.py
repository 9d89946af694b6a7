"""Server-sent events split out of a byte stream as it arrives: every event whole, in raw bytes and data.

The promise: fed the same bytes in any split, :class:`Splitter` gives the same
events, each with its raw bytes (framing included, so a caller can pass an event
on unchanged or leave it out) and its data (``data:`` lines joined by ``\\n``,
as the WHATWG event-stream parser builds them). Lines end with CRLF, LF or CR
(all three, mixed, as the format allows); a CR that ends one read is held until
the next byte says whether an LF belongs to it, so a CRLF split between reads is
one line end, never a line end and an empty line. Comments (``:``), ``event:``,
``id:`` and ``retry:`` lines are kept in the raw bytes and left out of the data.

Bounded: an event larger than ``limit`` bytes (1 MiB by default: an
OpenAI-shaped chunk is under 1 KiB; a Responses API ``response.completed``
repeats the whole answer, the largest event the bound is sized for) is given
up on: its bytes so far are handed back with :attr:`Event.data` ``None`` (an
"overflow" event), and the rest of it, up to the blank line that ends it,
comes out the same way as it arrives, never held. One that arrived whole in a
single read is given up on too, so that the events do not depend on the reads.
Its usage, if it had any, is then unknown, and the caller estimates.

Hand-written rather than ``httpx-sse`` or ``sseclient-py``: both read from a
client's response object and yield decoded text events, where the tap needs raw
bytes in and raw bytes out, fed from a callback and with a bound; the format is
small enough (the WHATWG spec's "interpreting an event stream" is a dozen lines).
"""

from __future__ import annotations

import re
from typing import NamedTuple

LIMIT = 1 << 20

# A blank line: a line end right after a line end. Atomic groups: "\r\n" then "x" is one line end,
# never "\r" and "\n" as two (which a plain alternation finds by backtracking).
_BLANK = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")
_EOL = re.compile(rb"\r\n|\r|\n")
_DATA = b"data"
_DATA_SP = b"data: "
_CR = 13
_CR_BYTE = b"\r"
_LF = b"\n"
_LFLF = b"\n\n"


class Event(NamedTuple):
    """One event's raw bytes (from the end of the last one to the end of its blank line) and its data.

    ``data`` is None for an event without a ``data:`` line (comments, blank lines) and for the
    pieces of an event given up on (too large: ``overflow``). A named tuple rather than a frozen
    dataclass: one is made per event relayed, and a tuple is built in C, three times faster.
    """

    raw: bytes
    data: bytes | None
    overflow: bool = False


class Splitter:
    """Events out of an event stream's bytes, fed in pieces of any size."""

    __slots__ = ("_held", "_skipping", "limit", "skipped")

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._held = b""  # the start of an event whose blank line has not come yet (at most ``limit`` bytes)
        self._skipping = False  # inside an event given up on: its bytes pass until its blank line
        self.skipped = 0  # events given up on

    def whole(self, chunk: bytes) -> bytes | None:
        """The fast path, for a stream framed with LF only: the bytes of the whole events this piece
        completes, as one run (``b""`` for none yet), the rest held as :meth:`feed` holds it.

        None when the fast path does not apply (a CR in the stream, an event given up on, a held
        event past the bound): then :meth:`feed` takes the same piece, as if this was not called.
        A run starts and ends at event boundaries, so a new :class:`Splitter` fed it gives exactly
        its events. One ``rfind`` per piece, in C: what a relayed event costs when nothing in it
        needs a closer look.
        """
        held = self._held
        if self._skipping or _CR_BYTE in chunk or (held and _CR_BYTE in held):
            return None
        buf = held + chunk if held else chunk
        end = buf.rfind(_LFLF) + 2
        if end == 1:  # no blank line yet
            if len(buf) > self.limit:
                return None
            self._held = buf
            return b""
        if len(buf) - end > self.limit:
            return None
        self._held = buf[end:]
        return buf if end == len(buf) else buf[:end]

    def feed(self, chunk: bytes) -> list[Event]:
        """The events this piece completes (and, for an event given up on, its bytes as they come)."""
        buf = self._held + chunk if self._held else chunk
        events: list[Event] = []
        start = 0
        if self._skipping:
            start = self._skip(buf, events)
            if self._skipping:
                return events
        size = len(buf)
        lf_only = _CR_BYTE not in buf  # most streams: the blank line is "\n\n", found by memchr, not a regex
        while True:
            if lf_only:
                found = buf.find(_LFLF, start)
                if found < 0:
                    break
                end = found + 2
            else:
                m = _BLANK.search(buf, start)
                if m is None:
                    break
                end = m.end()
                if end == size and buf[-1] == _CR:  # maybe the first half of a CRLF: wait for the next byte
                    break
            raw = buf[start:end]
            if end - start > self.limit:  # whole in one read, but too large all the same
                self.skipped += 1
                events.append(Event(raw, None, overflow=True))
            else:
                events.append(Event(raw, _data(raw)))
            start = end
        rest = buf[start:] if start else buf
        if len(rest) > self.limit:
            self.skipped += 1
            self._skipping = True
            self._pass(rest, events)
        else:
            self._held = rest
        return events

    def _skip(self, buf: bytes, events: list[Event]) -> int:
        """Inside an oversized event: pass its bytes up to and including its blank line; where the rest starts."""
        m = _BLANK.search(buf)
        if m is None or (m.end() == len(buf) and buf[-1] == _CR):
            self._pass(buf, events)
            return len(buf)
        self._skipping = False
        events.append(Event(buf[: m.end()], None, overflow=True))
        return m.end()

    def _pass(self, buf: bytes, events: list[Event]) -> None:
        """An oversized event goes on: its bytes pass, but for line ends at the very end, which may be
        half of its blank line (a few bytes, kept so that the next piece can complete it)."""
        tail = _trailing_line_ends(buf)
        if len(buf) > len(tail):
            events.append(Event(buf[: len(buf) - len(tail)], None, overflow=True))
        self._held = tail

    def end(self) -> list[Event]:
        """The stream ended: an event cut short is given as it is (its data, if its lines were whole)."""
        held, self._held = self._held, b""
        if not held:
            return []
        if self._skipping:
            self._skipping = False
            return [Event(held, None, overflow=True)]
        return [Event(held, _data(held))]


def _trailing_line_ends(buf: bytes) -> bytes:
    """The run of CR/LF bytes at the end of ``buf`` (at most 3 bytes matter: a line end, and half of one)."""
    stripped = buf.rstrip(b"\r\n")
    return buf[len(stripped) :][-3:]


def _data(raw: bytes) -> bytes | None:
    """The data of one event's raw bytes: its ``data`` fields joined by LF (None without one)."""
    if raw.startswith(_DATA_SP) and raw.find(_LF) == len(raw) - 2 and raw.endswith(_LFLF):
        return raw[6:-2]  # the usual event: one "data: " line and a blank line
    if _DATA not in raw:
        return None
    data: list[bytes] = []
    for line in _EOL.split(raw):
        if not line.startswith(_DATA):
            continue
        rest = line[4:]
        if not rest:
            data.append(b"")
        elif rest[0] == 58:  # ":"
            data.append(rest[2:] if rest[1:2] == b" " else rest[1:])
        # else a field named like "database": not data
    if not data:
        return None
    return data[0] if len(data) == 1 else b"\n".join(data)
