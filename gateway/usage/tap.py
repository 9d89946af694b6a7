"""A response body's bytes, read for usage as they pass, never delaying them (but for a stripped stream).

The relay feeds a :class:`UsageTap` each decoded piece of a 2xx response body and
sends on what it gives back. Without ``sse_strip`` that is the same object, always:
the tap reads on the side. What kind of body it is, the tap tells from its first
byte that is not white space (the relay's tap sees no headers): ``{`` or ``[`` is
JSON, gzip's or zlib's magic a content-coded body, anything else an event stream.

* An event stream is split into events (:mod:`.sse`, bounded) and each event that
  carries a usage object is decoded (one ``in`` test finds them: about one event per
  stream); the answer text of the others is counted (one regex in C), for an estimate.
* A JSON body is copied on the side up to :data:`BODY_LIMIT` (8 MiB) and read whole at
  the end; past it only its last :data:`TAIL` bytes are kept, where every known shape
  writes ``usage`` (:func:`.read.from_tail`).
* A ``gzip`` or ``deflate`` content-coded body (a client that asked for one) is
  decoded on the side, at most :data:`INFLATE_LIMIT` bytes of it, and read as above;
  the bytes sent on are the coded ones, unchanged, and a coded stream is never
  stripped. Another coding (``br``, ``zstd``) reads as no usage: the caller estimates.

``sse_strip``: the gateway set ``stream_options.include_usage`` on a client that had
not asked for it, so each event is looked at before it is passed on: the usage-only
chunk (``"choices": []`` with a usage object) is left out, and the ``"usage": null``
member OpenAI adds to every other chunk is taken out of it (as its last member, or
its first), so the client gets the bytes the upstream would have sent without the
injection. An event is held until its blank line (a client's parser waits for it
too); one larger than the splitter's bound passes as it comes, unchanged.

:meth:`UsageTap.observing`: a request no budget limits is read for the metrics
alone, as cheaply as can be. It never changes a byte (``strips`` is false, so the
relay keeps the upstream's content-length and passes the same bytes objects on),
and it counts no answer text (no estimate is ever made from it). A JSON body keeps
references to its pieces (bounded as above) and is read once, at its end. A stream
costs one ``in`` test per read (a scan in C, and one over the seam with the read
before) and a reference to it (its last :data:`WATCH_LIMIT` bytes' reads are kept,
where a usage event may have begun) until a ``"usage"`` shows: only then is it
split into events and read as above. OpenAI's ``include_usage`` writes one into
every chunk, the first included; Anthropic's ``message_start`` and the Responses
API's ``response.created`` carry one at the start; a stream whose client did not ask
for usage never shows one, and costs nothing more.
"""

from __future__ import annotations

import re
import zlib

import orjson

from . import Usage
from .estimate import output_from_bytes, output_from_text
from .read import StreamUsage, from_body, from_tail
from .shapes import CHAT, COMPLETIONS, MESSAGES, RESPONSES
from .sse import LIMIT, Event, Splitter

BODY_LIMIT = 8 << 20
TAIL = 64 << 10
INFLATE_LIMIT = 64 << 20  # decoded bytes read from a coded body at most (a small body may inflate 1000 times)
WATCH_LIMIT = 64 << 10  # an observed stream's last reads kept (by reference) until it shows a usage: more than an event
LEAD_LIMIT = 64 << 10  # white space before the first telling byte, held at most (then: not read)

_UNDECIDED, _SSE, _JSON, _CODED, _OPAQUE, _WATCH = range(6)
_SPACE = b" \t\r\n"
_GZIP = b"\x1f\x8b"
_USAGE = b'"usage"'
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_DONE = b"[DONE]"
_LFLF = b"\n\n"
_NULLS = (b'"usage":null', b'"usage": null')
# How OpenAI's (compact) and Python's json.dumps end a chunk that carries "usage": null: cut by slicing.
_NULL_TAILS = (b',"usage":null}\n\n', b', "usage": null}\n\n')
_NULL_ENDS = (*_NULL_TAILS, b'"usage":null}\n\n', b'"usage": null}\n\n')
# The text of an answer, per shape, in the fields its stream carries it in (escapes counted as written).
_STRING = rb'"\s*:\s*"((?:[^"\\]|\\.)*)"'
_TEXT = {
    CHAT: re.compile(rb'"(?:content|reasoning_content|reasoning|refusal|arguments)' + _STRING),
    COMPLETIONS: re.compile(rb'"text' + _STRING),
    RESPONSES: re.compile(rb'"delta' + _STRING),
    MESSAGES: re.compile(rb'"(?:text|partial_json|thinking)' + _STRING),
    None: re.compile(rb'"(?:content|reasoning_content|text|delta|arguments|partial_json|thinking)' + _STRING),
}
_NULL = re.compile(rb"[ \t]*:[ \t]*null")
_BLANKS = b" \t"
_LINE_ENDS = (b"\n", b"\r", b"")


class UsageTap:
    """Reads one response body for usage as the relay passes it; see the module's docstring."""

    __slots__ = (
        "_copied",
        "_copy",
        "_inflate",
        "_inflated",
        "_inner",
        "_lead",
        "_mode",
        "_reader",
        "_run_bytes",
        "_runs",
        "_splitter",
        "_text",
        "_text_bytes",
        "chars",
        "model",
        "observe",
        "relayed",
        "shape",
        "strip",
        "strips",
    )

    def __init__(self, shape: str | None, sse_strip: bool, model: str | None) -> None:
        self.shape = shape
        self.strip = sse_strip
        self.strips = sse_strip  # the relay's BodyTap: whether the bytes sent on may differ from those read
        self.observe = False  # read for the metrics alone (see observing): no text counted, streams watched
        self.model = model
        self.relayed = 0  # body bytes passed on
        # Answer text, for an estimate: counted in some of the bytes (all of them in a JSON body; in a
        # stream, the first runs and one in 8 after: a regex over every event would cost more than
        # the rest of the tap), and scaled to all of them.
        self.chars = 0  # text bytes counted (escapes as written)
        self._runs = 0
        self._run_bytes = 0  # bytes of whole events read
        self._text_bytes = 0  # of which counted for text
        self._mode = _UNDECIDED
        self._lead: list[bytes] = []  # white space before the first telling byte
        self._splitter: Splitter | None = None
        self._reader = StreamUsage()
        self._text = _TEXT.get(shape, _TEXT[None])
        self._copy: list[bytes] = []  # a JSON body's side copy (or, past BODY_LIMIT, its tail)
        self._copied = 0
        self._inflate: zlib._Decompress | None = None
        self._inflated = 0
        self._inner: UsageTap | None = None  # reads what a coded body decodes to

    @classmethod
    def observing(cls, shape: str | None) -> UsageTap:
        """A tap that reads the provider's usage and nothing else, never changing a byte (see the module's
        docstring): for a request no budget limits, recorded in the metrics alone."""
        tap = cls(shape, False, None)
        tap.observe = True
        return tap

    # --- the relay's side ------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """``data`` read for usage; what to send on (``data`` itself unless events are stripped)."""
        mode = self._mode
        if mode == _WATCH:  # an observed stream that has shown no usage yet: the common case, one scan
            copy = self._copy
            if _USAGE in data or (copy and _USAGE in copy[-1][-6:] + data[:6]):  # (or cut between two reads)
                self._watched(data)
            else:  # the reads a usage event may have begun in, kept by reference (WATCH_LIMIT bytes at most)
                copy.append(data)
                self._copied += len(data)
                while self._copied - len(copy[0]) >= WATCH_LIMIT:
                    self._copied -= len(copy.pop(0))
            return data
        self.relayed += len(data)
        if mode == _SSE:
            assert self._splitter is not None
            run = self._splitter.whole(data)
            if run is None:  # not the fast path: event by event
                return self._events(data)
            if self.strip:
                return self._strip_run(run) if run else b""
            if run:
                self._read_run(run)
            return data
        if mode == _JSON:
            self._keep(data)
        elif mode == _CODED:
            self._decode(data)
        elif mode == _UNDECIDED:
            return self._decide(data)
        return data

    def end(self) -> bytes:
        """The body is whole: what was held back (a stripped stream's last event, white space)."""
        mode = self._mode
        if mode == _WATCH:
            self._copy = []
        elif mode == _SSE:
            assert self._splitter is not None
            events = self._splitter.end()
            if self.strip:
                return b"".join(self._pass(events))
            for event in events:
                if event.data is not None:
                    self._event(event.data)
        elif mode == _JSON:
            self._read_copy()
        elif mode == _CODED:
            self._finish_decoding()
        elif mode == _UNDECIDED:
            lead, self._lead = self._lead, []
            return b"".join(lead) if self.strip else b""
        return b""

    def usage(self) -> Usage | None:
        """The provider's usage, when the body told it (a JSON body's, once it was whole: :meth:`end`)."""
        if self._mode == _CODED and self._inner is not None:
            return self._inner.usage()
        return self._reader.found

    def estimate(self, input: int) -> Usage:
        """An estimate from what was relayed (``input``: the caller's estimate of the request's input,
        used unless the stream told its input before it ended)."""
        if self._mode == _CODED and self._inner is not None:
            return self._inner.estimate(input)
        known = self._reader.known_input()
        if self._mode == _JSON and self._copy and not self.chars:
            self._count_copy()  # a body cut short: its text so far
        if self.chars:
            output = output_from_text(self.chars * self._run_bytes // max(self._text_bytes, 1), self.model)
        else:  # a body whose text could not be read (an unknown coding, a stream of unknown events)
            output = output_from_bytes(self.relayed, self._mode == _SSE, self.model)
        return Usage(known if known is not None else input, output, source="estimate")

    # --- what the body is ------------------------------------------------------------------

    def _decide(self, data: bytes) -> bytes:
        if not self._lead and (data[:2] == _GZIP or _is_zlib(data[:2])):
            self._mode = _CODED
            self._inner = UsageTap.observing(self.shape) if self.observe else UsageTap(self.shape, False, self.model)
            wbits = 16 + zlib.MAX_WBITS if data[:2] == _GZIP else zlib.MAX_WBITS
            self._inflate = zlib.decompressobj(wbits)
            self._decode(data)
            return data
        body = data.lstrip(_SPACE)
        if not body:
            size = sum(map(len, self._lead)) + len(data)
            if size > LEAD_LIMIT:
                self._mode = _OPAQUE
                lead, self._lead = self._lead, []
                return b"".join([*lead, data]) if self.strip else data
            self._lead.append(data)
            return b"" if self.strip else data
        lead, self._lead = self._lead, []
        if not 32 <= body[0] < 127:  # neither JSON nor an event stream: another coding (br, zstd), or binary
            self._mode = _OPAQUE
            return b"".join([*lead, data]) if self.strip and lead else data
        if body[0] in b"{[":
            self._mode = _JSON
            self._keep(b"".join([*lead, data]))
            return b"".join([*lead, data]) if self.strip and lead else data
        if self.observe:
            self._mode = _WATCH
            self.feed(b"".join([*lead, data]) if lead else data)
            return data
        self._mode = _SSE
        self._splitter = Splitter()
        whole = b"".join([*lead, data]) if lead else data
        out = self._events(whole)
        return out if self.strip else data

    # --- an event stream -------------------------------------------------------------------

    def _watched(self, data: bytes) -> None:
        """An observed stream's first ``"usage"``: from here on it is split into events and read. The last
        reads before this one go first (the event may have begun in them); where they begin mid-event,
        that part is a line without a ``data:`` field, or JSON cut short: read as nothing."""
        before, self._copy, self._copied = self._copy, [], 0
        self._mode = _SSE
        self._splitter = Splitter()
        self._events(b"".join([*before, data]) if before else data)

    def _event(self, data: bytes) -> bool:
        """Read one event's data; True when it is a usage-only chunk (choices empty, usage given)."""
        if _USAGE in data and _USAGE_OBJECT.search(data) is not None:
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError:
                return False
            self._reader.event(doc)
            return isinstance(doc, dict) and doc.get("choices") == [] and isinstance(doc.get("usage"), dict)
        if data != _DONE and not self.observe:
            self._run_bytes += len(data)
            self._text_bytes += len(data)
            for text in self._text.findall(data):
                self.chars += len(text)
        return False

    def _read_run(self, run: bytes) -> None:
        """Whole events, not to be changed: decoded only if one has a usage that is not null."""
        if _has_usage(run):
            for event in Splitter(LIMIT).feed(run):
                if event.data is not None:
                    self._event(event.data)
            return
        if self.observe:
            return  # no estimate is made for an observed answer: its text is not counted
        self._runs += 1
        self._run_bytes += len(run)
        if self._runs <= 8 or not self._runs % 8:
            self._text_bytes += len(run)
            for text in self._text.findall(run):
                self.chars += len(text)

    def _strip_run(self, run: bytes) -> bytes:
        """Whole events, for a client that did not ask for usage: the usual one (a single event whose
        only usage is null) is rewritten at once, anything else event by event."""
        count = run.count(_USAGE)
        if not count:
            self._read_run(run)
            return run
        if count == 1 and run.endswith(_NULL_TAILS):  # one event, the usual chunk
            self._read_run(run)
            return run[: run.rindex(b",")] + b"}\n\n"
        return b"".join(self._pass(Splitter(LIMIT).feed(run)))

    def _events(self, data: bytes) -> bytes:
        """The slow path: every event split out and looked at (CR framing, an event past the bound)."""
        assert self._splitter is not None
        events = self._splitter.feed(data)
        if self.strip:
            return b"".join(self._pass(events))
        for event in events:
            if event.data is not None:
                self._event(event.data)
        return data

    def _pass(self, events: list[Event]) -> list[bytes]:
        out = []
        for event in events:
            raw, data = event.raw, event.data
            if data is None:
                out.append(raw)
                continue
            if self._event(data):
                continue  # the usage-only chunk the client did not ask for
            if _USAGE in raw:
                raw = _without_null_usage(raw)
            out.append(raw)
        return out

    # --- a JSON body ---------------------------------------------------------------------

    def _keep(self, data: bytes) -> None:
        self._copied += len(data)
        self._copy.append(data)
        if self._copied > BODY_LIMIT:  # too large to keep whole: keep its end, where usage is written
            tail = b"".join(self._copy)[-TAIL:]
            self._copy = [tail]

    def _read_copy(self) -> None:
        """The whole body's usage; its text counted, for an estimate, when it has none."""
        body = b"".join(self._copy)
        self._copy = [body]
        anthropic = self.shape == MESSAGES
        usage = from_body(body, anthropic) if self._copied <= BODY_LIMIT else from_tail(body, anthropic)
        if usage is not None:
            self._reader.found = usage
            self._copy = []
        elif not self.observe:
            self._count_copy()
        else:
            self._copy = []

    def _count_copy(self) -> None:
        body = b"".join(self._copy)
        self._copy = []
        if self._copied <= BODY_LIMIT:  # (past it, only the tail is left: estimated from the bytes)
            self._run_bytes += len(body)
            self._text_bytes += len(body)
            for text in _TEXT[None].findall(body):  # a whole answer's text: the fields of every shape
                self.chars += len(text)

    # --- a content-coded body ------------------------------------------------------------

    def _decode(self, data: bytes) -> None:
        inflate, inner = self._inflate, self._inner
        if inflate is None or inner is None:
            return
        try:
            out = inflate.decompress(data, INFLATE_LIMIT - self._inflated)
        except zlib.error:
            self._inflate = None
            return
        self._inflated += len(out)
        if self._inflated >= INFLATE_LIMIT:
            self._inflate = None  # no more: what came so far is read, the rest estimated
        if out:
            inner.feed(out)

    def _finish_decoding(self) -> None:
        if self._inflate is not None and self._inner is not None:
            try:
                rest = self._inflate.flush()
            except zlib.error:
                rest = b""
            if rest:
                self._inner.feed(rest)
        if self._inner is not None:
            self._inner.end()


def _has_usage(run: bytes) -> bool:
    """Some ``"usage"`` in these bytes is not OpenAI's ``null`` (scans in C, no regex)."""
    count = run.count(_USAGE)
    if not count or (count == 1 and run.endswith(_NULL_ENDS)):
        return False
    return count > run.count(_NULLS[0]) + run.count(_NULLS[1])


def _without_null_usage(raw: bytes) -> bytes:
    """An event's raw bytes without the ``"usage": null`` member OpenAI adds to each chunk when usage is
    asked for: as the object's last member (OpenAI's place for it) or its first, with the comma and the
    blanks around it; anywhere else (or not null) the bytes are left as they are.

    A ``"usage"`` inside a JSON string is escaped (``\\"usage\\"``), so the last ``"usage"`` in the bytes
    is a key; that it is the top-level object's is checked by what surrounds it: the closing brace
    that ends the ``data:`` line after it, or the ``data:`` line's opening brace before it.
    """
    i = raw.rfind(_USAGE)
    m = _NULL.match(raw, i + 7)
    if i < 0 or m is None:
        return raw
    before, after = raw[:i].rstrip(_BLANKS), raw[m.end() :]
    rest = after.lstrip(_BLANKS)
    if before.endswith(b",") and rest[:1] == b"}" and rest[1:].lstrip(_BLANKS)[:1] in _LINE_ENDS:
        return before[:-1].rstrip(_BLANKS) + after
    if before.endswith(b"{") and before[:-1].rstrip(_BLANKS).endswith(b"data:") and rest[:1] == b",":
        return raw[:i] + rest[1:].lstrip(_BLANKS)
    return raw


def _is_zlib(head: bytes) -> bool:
    """A zlib stream's header (RFC 1950: deflate, and a header checksum): never the start of JSON or SSE."""
    return len(head) == 2 and head[0] == 0x78 and (head[0] << 8 | head[1]) % 31 == 0
