"""The bridge from the control plane's event loop to the proxy's.

The admin app runs on a thread and event loop of its own
(:mod:`gateway.control.listener`); what it reads or changes on the proxy's
side (the override store and its Redis connection, the live reloader, the
geo lookup cache) runs on the proxy's loop through :class:`ProxyLoop`, as
calls as short as the proxy's own work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class ProxyLoop:
    """Runs work on the proxy's event loop from the control plane's, and awaits the result there.

    With no loop given (or when called on that loop), the work runs in place.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self.loop is None or self.loop is asyncio.get_running_loop():
            return await fn()

        async def there() -> T:
            return await fn()

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(there(), self.loop))

    async def call(self, fn: Callable[[], T]) -> T:
        async def now() -> T:
            return fn()

        return await self.run(now)
