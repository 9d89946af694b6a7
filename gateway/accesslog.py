"""One JSON line per request, built and written by a thread so that a slow log never slows a request.

The event loop hands over entries (for a request, the tuple of facts
:class:`gateway.proxy.record.Record` has at hand), collected and passed to
the writer thread once per loop iteration (one queue put and one wake-up per
iteration, however many requests it finished; none while the thread is still
busy, since it takes what waited when it is done). The thread builds each line
(:attr:`AccessLog.line`; for requests :func:`gateway.proxy.logline.request_line`:
the time, the redacted address, the JSON) and writes them in slices of at
most ``PIPE_BUF`` bytes cut at line ends, so that several workers sharing
one stdout pipe never interleave inside a line. A blocked stdout (a full
pipe, Docker's blocking log driver) blocks only that thread. What waits for
it is bounded; past the bound, lines are dropped and counted
(``regiongate_access_log_dropped_total``) rather than held or waited for.

The client address is personal data, so how it is written is a setting:
``full``, ``truncated`` (the /24 or /48 it is in), or ``hashed`` (keyed
BLAKE2b, stable for one key so one caller's requests can still be grouped).
In the last two modes every other field is scrubbed of address-like text as
well, since a malformed header can carry an address into an error message,
and so is every line the process logs (:func:`redact_logs`), from any logger.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import queue
import re
import secrets
import select
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal

import orjson

from .clientip import AddressError, IPAddress, parse_address

log = logging.getLogger("regiongate")

AddressMode = Literal["full", "truncated", "hashed"]
_PIPE_BUF = 4096
# Bytes handed to the writer thread and not yet written; past this, lines are dropped.
MAX_PENDING = 8 * 1024 * 1024
# What an entry not yet made into a line counts for in that bound: about a request's line
# (350-500 bytes with a country, a rule and a target). Once built, a line counts its own length.
ENTRY_ESTIMATE = 512
# How long shutdown waits for a stalled log before giving up on what is left.
CLOSE_TIMEOUT = 2.0
# A run of characters that an address (with port, zone or brackets) is made of,
# and what makes such a run look like one.
_TOKEN = re.compile(r"[0-9A-Za-z.:%\[\]_-]{3,}")
_LOOKS_V4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")


# Addresses whose written form is kept: ``str(ip)`` costs 2 µs (ipaddress's Python), a keyed hash
# about as much, a dict hit 0.1 µs, and a client sends many requests. Past this many the cache is
# emptied and fills again (64 KiB or so at most).
_WRITTEN_CACHE = 1024


class AddressRedactor:
    def __init__(self, mode: AddressMode, key: bytes | None = None) -> None:
        self.mode = mode
        self.key = key or secrets.token_bytes(16)
        # One address, one written form, for as long as this redactor (its mode and key) lives.
        # Used from the loop and the log's writer thread: a dict's get and set are each atomic.
        self._written: dict[IPAddress, str] = {}

    def __call__(self, ip: IPAddress | None) -> str | None:
        if ip is None:
            return None
        written = self._written.get(ip)
        if written is None:
            if len(self._written) >= _WRITTEN_CACHE:
                self._written = {}
            written = self._written[ip] = self._write(ip)
        return written

    def _write(self, ip: IPAddress) -> str:
        if self.mode == "full":
            return str(ip)
        if self.mode == "truncated":
            if ip.version == 4:
                return str(ipaddress.IPv4Network((int(ip) >> 8 << 8, 24)))
            return str(ipaddress.IPv6Network((int(ip) >> 80 << 80, 48)))
        return "h:" + hashlib.blake2b(ip.packed, key=self.key, digest_size=8).hexdigest()

    def text(self, text: str) -> str:
        """``text`` with every address-like run written as this mode writes addresses.

        A run that parses as an address is redacted like one; a run that only
        looks like one (an address with junk attached) becomes ``[redacted]``.
        """
        if self.mode == "full":
            return text
        return _TOKEN.sub(self._token, text)

    def _token(self, m: re.Match[str]) -> str:
        token = m.group(0)
        if token.count(":") < 2 and not _LOOKS_V4.search(token):
            return token
        try:
            return self(parse_address(token.strip("[]_-.:")) if token[0] != "[" else parse_address(token)) or ""
        except AddressError:
            return "[redacted]"


def redact_logs(redactor: AddressRedactor) -> None:
    """From now on, every log record (any logger: ours, uvicorn's, asyncio's, redis-py's) has its
    message, traceback and stack written with addresses as ``redactor`` writes them.

    A record factory rather than a filter: it runs for every record of every
    logger, whichever handlers they have (uvicorn's own included). The call
    sites do not log addresses; this is the backstop for a message that
    carries one (an exception's text, a library's own). In ``full`` mode it
    does nothing.
    """
    global _plain_factory
    if _plain_factory is None:
        _plain_factory = logging.getLogRecordFactory()
    plain = _plain_factory
    if redactor.mode == "full":
        logging.setLogRecordFactory(plain)
        return
    text = redactor.text

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = plain(*args, **kwargs)
        try:
            record.msg, record.args = text(record.getMessage()), ()
            if record.exc_info:
                record.exc_text = text(_FORMATTER.formatException(record.exc_info))
            if record.stack_info:
                record.stack_info = text(record.stack_info)
        except Exception:  # a message that cannot be formatted: shown as it is, redacted all the same
            record.msg, record.args = text(f"{record.msg!s} {record.args!r}"), ()
        return record

    logging.setLogRecordFactory(factory)


_plain_factory: Callable[..., logging.LogRecord] | None = None
_FORMATTER = logging.Formatter()


def json_line(entry: Any, redact: AddressRedactor) -> bytes:
    """An entry that is already the line's JSON object."""
    return orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)


# How many times this process's line of ancestors forked (counted in the child): a process that
# forks after starting its writer thread has a different count in the child than the writer's.
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


class AccessLog:
    def __init__(self, target: str, redactor: AddressRedactor, max_pending: int = MAX_PENDING) -> None:
        """``target`` is ``-`` (stdout), ``off``, or a file path (appended to)."""
        self.redact = redactor
        self.max_pending = max_pending
        self.redact_text = redactor.text
        self.enabled = target != "off"
        self.dropped = 0
        self.on_drop: Callable[[], None] | None = None
        # How the writer thread makes an entry's line (with its newline), given this log's redactor.
        self.line: Callable[[Any, AddressRedactor], bytes] = json_line
        self._fd = -1
        self._own_fd = False
        if target == "-":
            self._fd = 1
        elif self.enabled:
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._own_fd = True
        self._pending: list[Any] = []
        self._scheduled = False
        # The loop's batches, to the writer thread: a C queue, whose put is one call and wakes
        # the thread (a Condition's notify is ten Python-level calls, once per loop iteration).
        # None tells the thread to stop.
        self._queue: queue.SimpleQueue[list[Any] | None] = queue.SimpleQueue()
        # What waits is added - written + settled: entries handed over count ENTRY_ESTIMATE each
        # (added, on the loop), built lines correct that to their length (settled) and written
        # bytes leave (written), both on the writer thread. Each counter has one writing thread,
        # so the bound needs no lock on the hot path.
        self._added = 0
        self._settled = 0
        self._written = 0
        # While the writer is busy (_busy), the loop's batches wait in _backlog and the writer takes
        # them all when it is done, in order: the thread is woken (a queue put, a futex, a switch
        # and a GIL hand-over) once per idle spell, not once per loop iteration, under load.
        self._lock = threading.Lock()
        self._busy = False
        self._backlog: list[Any] = []
        self._writer: threading.Thread | None = None
        self._writer_pid = 0
        self._writer_forks = -1  # the process's fork count when the writer was started (see _forks)

    def put(self, entry: Any) -> None:
        """Queue one entry; its line is made and written on the writer thread."""
        if not self.enabled:
            return
        if self._added + self._settled - self._written + ENTRY_ESTIMATE > self.max_pending:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
            return
        self._added += ENTRY_ESTIMATE
        self._pending.append(entry)
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        """Hand what this loop iteration logged to the writer thread."""
        self._scheduled = False
        entries, self._pending = self._pending, []
        if not entries:
            return
        self._ensure_writer()
        with self._lock:
            if self._busy:
                self._backlog += entries
                return
            self._busy = True
        self._queue.put(entries)

    def _ensure_writer(self) -> None:
        # Threads do not survive fork: each worker starts its own. A fork is told by a count
        # (_forks), not by os.getpid(): this runs once per loop turn, and that is a system call.
        if self._writer is None or self._writer_forks != _forks:
            if self._writer_pid:  # forked: the parent's queue, lock and backlog are not this process's
                self._queue = queue.SimpleQueue()
                self._lock, self._busy, self._backlog = threading.Lock(), False, []
            self._writer_pid = os.getpid()
            self._writer_forks = _forks
            self._writer = threading.Thread(
                target=self._run, args=(self._queue,), name="regiongate-access-log", daemon=True
            )
            self._writer.start()

    def _run(self, batches: queue.SimpleQueue[list[Any] | None]) -> None:
        while (entries := batches.get()) is not None:
            while entries:
                for chunk in self._chunks(entries):
                    self._write(chunk)
                    self._written += len(chunk)
                with self._lock:  # what the loop handed over meanwhile, or idle again
                    entries, self._backlog = self._backlog, []
                    self._busy = bool(entries)

    def _chunks(self, entries: list[Any]) -> Iterator[bytes]:
        """The entries' lines, joined into slices of at most ``PIPE_BUF`` bytes cut at line ends."""
        line_of, redact = self.line, self.redact
        chunk = b""
        for entry in entries:
            try:
                line = line_of(entry, redact)
            except Exception:  # a bug in one line must not stop the log: that line is lost, and said so
                log.exception("an access-log line could not be built; it is left out")
                line = b""
            self._settled += len(line) - ENTRY_ESTIMATE
            if chunk and len(chunk) + len(line) > _PIPE_BUF:
                yield chunk
                chunk = b""
            chunk += line
        if chunk:
            yield chunk

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                select.select([], [self._fd], [], 1.0)
                continue
            except OSError:
                return  # a closed stdout must not take the gateway down
            view = view[n:]

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write what is queued, waiting at most ``timeout`` for a stalled destination."""
        if not self.enabled:
            return
        self.flush()
        writer = self._writer
        if writer is not None and self._writer_pid == os.getpid():
            self._queue.put(None)  # after everything queued: the thread writes it all, then stops
            writer.join(timeout)
            self._writer = None
        if self._own_fd and (writer is None or not writer.is_alive()):
            os.close(self._fd)
            self._own_fd = False
