"""One JSON line per request, written by a thread so that a slow log never slows a request.

Lines are collected on the event loop and handed over once per loop
iteration, in slices of at most ``PIPE_BUF`` bytes cut at line ends, so that
several workers sharing one stdout pipe never interleave inside a line. The
writes themselves happen on a thread: a blocked stdout (a full pipe, Docker's
blocking log driver) then blocks only that thread. What waits for it is
bounded; past the bound, lines are dropped and counted
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
import collections
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import select
import threading
from collections.abc import Callable
from typing import Any, Literal

import orjson

from .clientip import AddressError, IPAddress, parse_address

AddressMode = Literal["full", "truncated", "hashed"]
_PIPE_BUF = 4096
# Bytes handed to the writer thread and not yet written; past this, lines are dropped.
MAX_PENDING = 8 * 1024 * 1024
# How long shutdown waits for a stalled log before giving up on what is left.
CLOSE_TIMEOUT = 2.0
# A run of characters that an address (with port, zone or brackets) is made of,
# and what makes such a run look like one.
_TOKEN = re.compile(r"[0-9A-Za-z.:%\[\]_-]{3,}")
_LOOKS_V4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")


class AddressRedactor:
    def __init__(self, mode: AddressMode, key: bytes | None = None) -> None:
        self.mode = mode
        self.key = key or secrets.token_bytes(16)

    def __call__(self, ip: IPAddress | None) -> str | None:
        if ip is None:
            return None
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


class AccessLog:
    def __init__(self, target: str, redactor: AddressRedactor, max_pending: int = MAX_PENDING) -> None:
        """``target`` is ``-`` (stdout), ``off``, or a file path (appended to)."""
        self.redact = redactor
        self.max_pending = max_pending
        self.redact_text = redactor.text
        self.enabled = target != "off"
        self.dropped = 0
        self.on_drop: Callable[[], None] | None = None
        self._fd = -1
        self._own_fd = False
        if target == "-":
            self._fd = 1
        elif self.enabled:
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._own_fd = True
        self._pending: list[bytes] = []
        self._scheduled = False
        self._queue: collections.deque[bytes] = collections.deque()
        # Bytes logged and bytes written: each written by one thread only, so
        # their difference (what is waiting) needs no lock on the hot path.
        self._added = 0
        self._written = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._writer: threading.Thread | None = None
        self._writer_pid = 0

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = orjson.dumps(record) + b"\n"
        if self._added - self._written + len(line) > self.max_pending:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
            return
        self._added += len(line)
        self._pending.append(line)
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        """Hand what this loop iteration logged to the writer thread."""
        self._scheduled = False
        lines, self._pending = self._pending, []
        if not lines:
            return
        chunks = []
        chunk = b""
        for line in lines:
            if chunk and len(chunk) + len(line) > _PIPE_BUF:
                chunks.append(chunk)
                chunk = b""
            chunk += line
        if chunk:
            chunks.append(chunk)
        self._ensure_writer()
        with self._wake:
            self._queue.extend(chunks)
            self._wake.notify()

    def _ensure_writer(self) -> None:
        # Threads do not survive fork: each worker starts its own.
        if self._writer is None or self._writer_pid != os.getpid():
            self._writer_pid = os.getpid()
            self._lock = threading.Lock()
            self._wake = threading.Condition(self._lock)
            self._closing = False
            self._writer = threading.Thread(target=self._run, name="regiongate-access-log", daemon=True)
            self._writer.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                chunk = self._queue.popleft()
            self._write(chunk)
            self._written += len(chunk)

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
            with self._wake:
                self._closing = True
                self._wake.notify()
            writer.join(timeout)
            self._writer = None
        if self._own_fd and (writer is None or not writer.is_alive()):
            os.close(self._fd)
            self._own_fd = False
