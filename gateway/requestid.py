"""Request ids that say nothing about traffic.

A counter (even behind a random prefix) lets anyone who sees two ids count
the requests in between. Each id here is 64 bits from the kernel's CSPRNG; a
Mersenne Twister would be cheaper but its output can be predicted after a
few hundred samples. The cost of ``os.urandom`` is paid once per 512 ids by
drawing a block at a time, which keeps an id at about the price of a
counter. After ``fork`` the block is thrown away, or workers would hand out
the same ids.
"""

from __future__ import annotations

import os

_BLOCK = 4096  # bytes: 512 ids per getrandom() call


class RequestIds:
    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = _BLOCK
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._buf, self._pos = b"", _BLOCK

    def __next__(self) -> str:
        pos = self._pos
        if pos >= _BLOCK:
            self._buf = os.urandom(_BLOCK)
            pos = 0
        self._pos = pos + 8
        return "rg-" + self._buf[pos : pos + 8].hex()

    def __iter__(self) -> RequestIds:
        return self
