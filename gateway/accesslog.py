"""One JSON line per request, written without stalling the event loop on each.

Lines are collected and written once per loop iteration, in slices of at
most ``PIPE_BUF`` bytes cut at line ends, so that several workers sharing one
stdout pipe never interleave inside a line.

The client address is personal data, so how it is written is a setting:
``full``, ``truncated`` (the /24 or /48 it is in), or ``hashed`` (keyed
BLAKE2b, stable for one key so one caller's requests can still be grouped).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import secrets
from typing import Any, Literal

import orjson

from .clientip import IPAddress

AddressMode = Literal["full", "truncated", "hashed"]
_PIPE_BUF = 4096


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


class AccessLog:
    def __init__(self, target: str, redactor: AddressRedactor) -> None:
        """``target`` is ``-`` (stdout), ``off``, or a file path (appended to)."""
        self.redact = redactor
        self.enabled = target != "off"
        self._fd = -1
        self._own_fd = False
        if target == "-":
            self._fd = 1
        elif self.enabled:
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._own_fd = True
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._pending.append(orjson.dumps(record) + b"\n")
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        lines, self._pending = self._pending, []
        chunk = b""
        for line in lines:
            if chunk and len(chunk) + len(line) > _PIPE_BUF:
                self._write(chunk)
                chunk = b""
            chunk += line
        if chunk:
            self._write(chunk)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                continue
            except OSError:
                return  # a closed stdout must not take the gateway down
            view = view[n:]

    def close(self) -> None:
        self.flush()
        if self._own_fd:
            os.close(self._fd)
