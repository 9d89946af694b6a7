"""Rate-limit checks sent to Redis in batches: every check asked for while a round trip is out goes in the next one.

Why: under load, a check per request (an ``EVALSHA`` each, through redis-py's
``Pipeline`` and its connection pool, and an asyncio task per request) cost the
gateway almost as much CPU as the rest of a request; the profile put redis-py's
per-command packing, reply reading and pool bookkeeping first. Here a batch is
one ``EVALSHA`` of the GCRA script with one key per check (Redis runs a script
whole, so each check stays atomic, and two checks of one subject in one batch
are judged one after the other), packed by redis-py once per batch and read as
one reply by its hiredis parser (packed here: :func:`pack_evalsha`); a check is a callback, resolved when its
batch's reply is read, so waiting costs no task.

One connection, of the client's own class (so TLS, unix sockets, AUTH and a
Sentinel's master lookup are redis-py's), is held here instead of taken from
the pool for every batch. A batch goes through the circuit breaker as one call
(one latency sample, one error when it fails) under the per-call timeout, so a
check waits at most for the batch out before it and its own; a check whose
batch fails is answered ``None`` (the caller follows ``on_error``). ``NOSCRIPT`` (a restart, a failover, ``SCRIPT
FLUSH``) loads the script on the same connection and sends that batch again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from ..policy.ratelimit import RateCheck
from .ratelimit import outcomes_from_script
from .redisconn import Breaker, RedisUnavailable

log = logging.getLogger("regiongate")

Then = Callable[[RateCheck | None], None]
MAX_KEYS = 200  # checks per EVALSHA: Redis serves nothing else while a script runs


class Batcher:
    def __init__(self, client: Any, breaker: Breaker, script: str, sha: str) -> None:
        self.client = client
        self.breaker = breaker
        self.script = script
        self.sha = sha
        self._keys: list[str] = []
        self._args: list[bytes] = []  # interval and tolerance (ms) of each check, in key order
        self._thens: list[Then] = []
        self._runner: asyncio.Task[None] | None = None
        self._conn = HeldConnection(client)

    def submit(self, key: str, interval: bytes, tolerance: bytes, then: Then) -> None:
        """Ask for one check; ``then`` is called with its outcome, or None when Redis could not answer."""
        if self._runner is None:  # else the runner takes this check with the next batch
            self._runner = asyncio.get_running_loop().create_task(self._run())
        self._keys.append(key)
        self._args += (interval, tolerance)
        self._thens.append(then)

    async def close(self) -> None:
        """Shutting down: every check still waiting is answered None, so nobody waits forever."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._runner, 2)
        thens, self._keys, self._args, self._thens = self._thens, [], [], []
        _answer(thens, None)
        await self._conn.close()

    async def _run(self) -> None:
        thens: list[Then] = []
        try:
            while self._thens:
                keys, args, thens = self._keys, self._args, self._thens
                self._keys, self._args, self._thens = [], [], []
                outcomes: list[RateCheck] | None = None
                try:
                    outcomes = await self.breaker.call("ratelimit", partial(self._round_trip, keys, args))
                except RedisUnavailable:
                    pass
                except Exception:
                    log.exception("rate-limit batch failed")
                _answer(thens, outcomes)
                thens = []
        except asyncio.CancelledError:  # closed while a batch was out
            _answer(thens, None)
            raise
        finally:
            self._runner = None

    async def _round_trip(self, keys: list[str], args: list[bytes]) -> list[RateCheck]:
        from redis.exceptions import NoScriptError

        chunks = [
            pack_evalsha(self.sha, keys[i : i + MAX_KEYS], args[2 * i : 2 * (i + MAX_KEYS)])
            for i in range(0, len(keys), MAX_KEYS)
        ]
        replies = await self._conn.send(chunks)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            await self._conn.load(self.script)
            for i, reply in zip(missing, await self._conn.send([chunks[i] for i in missing]), strict=True):
                replies[i] = reply
        outcomes: list[RateCheck] = []
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
            outcomes += outcomes_from_script(reply)
        if len(outcomes) != len(keys):  # every caller must be answered: not one by another's reply
            raise ValueError(f"{len(outcomes)} outcomes for {len(keys)} checks")
        return outcomes


class HeldConnection:
    """One connection of the client's own class, held for batches (not taken from the pool for each): one
    write of many packed commands, then every reply read in turn. Shared by the rate-limit batches here
    and the token-budget ones (:mod:`.budgets`)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._conn: Any = None

    def _connection(self) -> Any:
        if self._conn is None:
            pool = self.client.connection_pool
            # No per-read timeout: the breaker times the whole batch, and a cut read disconnects.
            self._conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        return self._conn

    async def send(self, packed: list[bytes]) -> list[Any]:
        """One write for all commands, then every reply read (an error reply is returned, not raised)."""
        from redis.exceptions import ResponseError

        conn = self._connection()
        # What the pool does before lending a connection: one closed while idle (a Redis or proxy
        # timeout, CLIENT KILL) is made again rather than failing a batch.
        if conn.is_connected and await (getattr(conn, "can_read", None) or conn.can_read_destructive)():
            await conn.disconnect()
        if not conn.is_connected:
            await conn.connect()  # as the pool does: a Sentinel's connection asks for the master here
        await conn.send_packed_command(b"".join(packed), check_health=False)
        replies: list[Any] = []
        for _ in packed:
            try:
                replies.append(await conn.read_response())
            except ResponseError as e:
                replies.append(e)
        return replies

    async def load(self, script: str) -> None:
        """``SCRIPT LOAD`` on this connection (after ``NOSCRIPT``: a restart, a failover, ``SCRIPT FLUSH``)."""
        conn = self._connection()
        await conn.send_command("SCRIPT", "LOAD", script, check_health=False)
        await conn.read_response()

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.disconnect(), 2)


def pack_evalsha(sha: str, keys: list[str], args: list[bytes]) -> bytes:
    """``EVALSHA sha len(keys) *keys *args`` as redis-py's ``pack_command`` writes it (a test holds the two
    equal) for a fifth of its cost: every argument here is a string or bytes, so this is RESP's array of
    bulk strings and nothing more, where redis-py's packer checks each argument's type on the way."""
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(keys) + len(args)), _bulk(sha.encode()), _bulk(b"%d" % len(keys))]
    parts += [b"$%d\r\n%s\r\n" % (len(k), k) for k in map(str.encode, keys)]  # no call per argument
    parts += [b"$%d\r\n%s\r\n" % (len(a), a) for a in args]
    return b"".join(parts)


def pack_command(*args: bytes) -> bytes:
    """Any command of bytes arguments, as RESP's array of bulk strings (as :func:`pack_evalsha`)."""
    return b"*%d\r\n" % len(args) + b"".join([b"$%d\r\n%s\r\n" % (len(a), a) for a in args])


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _answer(thens: list[Then], outcomes: list[RateCheck] | None) -> None:
    for i, then in enumerate(thens):
        try:
            then(None if outcomes is None else outcomes[i])
        except Exception:  # one caller's bug must not keep the others waiting
            log.exception("rate-limit callback failed")
