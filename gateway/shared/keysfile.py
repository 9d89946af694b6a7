"""Client keys in a file (``--keys-file``), for a gateway without Redis: one host, read again when it changes.

The file is JSON, written only by ``regiongate keys`` and the admin API::

    {"regiongate_client_keys": 1, "secret": "<64 hex digits>", "keys": [{"id": "ck_...", "name": "team-a",
     "hash": "<HMAC-SHA256 of the token, hex>", "created": ..., "expires": null, "revoked": null, "meta": {}}]}

The hash secret lives in the file, made at random when the file is first
written. A file has to carry it: a gateway restarted without it could match
no token, and a secret in the environment would have to be given identically
to the gateway and to every ``keys`` command. It protects nothing the file's
mode does not already: a token holds 256 random bits, so whoever reads the
file (secret and hashes) still cannot find a token from its hash.

Every write takes an exclusive lock (``flock`` on ``<file>.lock``), reads the
file afresh, changes it, and replaces it atomically: a whole new file with
mode 0600 in the same directory, flushed, renamed over the old one. So the
gateway's workers and a ``keys`` command can write at once and no change is
lost, and a reader never sees half a file. A file that cannot be read (a
hand edit gone wrong) stops the gateway at start with the reason and where;
later, it is refused and the keys read before keep serving (``/readyz`` says
why), and nothing writes over it until it is fixed; a file that was read and
then disappears is treated the same way. The gateway looks at the
file's identity (inode, size, modification time) every :data:`POLL` seconds,
so a revoke in the file applies within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from ..policy.clientkeys import ClientKey, ClientKeyError, KeyTable, check_new, from_stored
from .clientkeys import ClientKeys, KeyConflict, KeysUnavailable

log = logging.getLogger("regiongate")

FORMAT = 1
POLL = 0.5
# How long a write waits for another writer's lock before it gives up (a write takes milliseconds).
LOCK_WAIT = 5.0
R = TypeVar("R")
Stamp = tuple[int, int, int]  # inode, size, modification time (ns): a replaced or edited file differs


class KeysFileError(ClientKeyError):
    """The keys file cannot be read: the message names the file and where."""


@dataclass(frozen=True, slots=True)
class Contents:
    secret: bytes | None  # None: no file yet
    keys: tuple[ClientKey, ...]
    stamp: Stamp | None


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def stamp_of(path: str) -> Stamp | None:
    try:
        return _stamp(os.stat(path))
    except FileNotFoundError:
        return None


def read(path: str) -> Contents:
    """The file's secret and keys; no file yet is no keys. Raises :class:`KeysFileError`."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        return Contents(None, (), None)
    except OSError as e:
        raise KeysFileError(f"keys file {path}: {e.strerror or e}") from None
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise KeysFileError(f"keys file {path}:{e.lineno}:{e.colno}: not JSON: {e.msg}") from None
    if not isinstance(doc, dict) or doc.get("regiongate_client_keys") != FORMAT:
        raise KeysFileError(f'keys file {path}: not a keys file (no "regiongate_client_keys": {FORMAT})')
    secret = doc.get("secret")
    try:
        key = bytes.fromhex(secret) if isinstance(secret, str) else b""
    except ValueError:
        key = b""
    if len(key) != 32:
        raise KeysFileError(f"keys file {path}: secret must be 64 hex digits")
    raw = doc.get("keys")
    if not isinstance(raw, list):
        raise KeysFileError(f"keys file {path}: keys must be a list")
    keys: list[ClientKey] = []
    for i, item in enumerate(raw):
        try:
            keys.append(from_stored(item))
        except ClientKeyError as e:
            raise KeysFileError(f"keys file {path}: keys[{i}]: {e}") from None
    _check_unique(path, keys)
    return Contents(key, tuple(keys), _stamp(st))


def _check_unique(path: str, keys: list[ClientKey]) -> None:
    """Ids and hashes once each, and no two live keys sharing a name (what a hand edit could break)."""
    now = time.time()
    ids: set[str] = set()
    hashes: set[str] = set()
    live: set[str] = set()
    for i, k in enumerate(keys):
        if k.id in ids:
            raise KeysFileError(f"keys file {path}: keys[{i}]: id {k.id} appears twice")
        if k.hash in hashes:
            raise KeysFileError(f"keys file {path}: keys[{i}] ({k.id}): its hash appears twice")
        if k.valid(now):
            if k.name in live:
                raise KeysFileError(f"keys file {path}: keys[{i}] ({k.id}): two live keys are named {k.name!r}")
            live.add(k.name)
        ids.add(k.id)
        hashes.add(k.hash)


def write(path: str, secret: bytes, keys: tuple[ClientKey, ...]) -> Stamp:
    """Replace the file atomically with mode 0600: a new file beside it, flushed, renamed over it."""
    doc = {"regiongate_client_keys": FORMAT, "secret": secret.hex(), "keys": [k.stored() for k in keys]}
    data = orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".regiongate-keys-", suffix=".tmp", dir=directory)  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            st = os.fstat(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    return _stamp(st)


@contextlib.contextmanager
def locked(path: str, wait: float = LOCK_WAIT) -> Iterator[None]:
    """An exclusive lock on ``<path>.lock`` among every process writing the file (bounded wait)."""
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    raise KeysUnavailable(f"keys file {path}: another writer holds {path}.lock") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # and with it the lock


Edit = Callable[[KeyTable, bytes], tuple[tuple[ClientKey, ...], R]]


def change(path: str, edit: Edit[R]) -> tuple[Contents, R]:
    """Under the lock: read the file afresh, apply ``edit`` (given the keys and the file's secret: the new
    keys, and what to return), write it. A new file gets a new random secret."""
    with locked(path):
        current = read(path)  # a file that cannot be read is never written over
        secret = current.secret or secrets.token_bytes(32)
        table = KeyTable.of(current.keys)
        keys, result = edit(table, secret)
        if keys == table.keys:  # nothing to change: no file is written (nor made, nor its secret kept)
            return current, result
        return Contents(secret, keys, write(path, secret, keys)), result


class FileKeys(ClientKeys):
    backend = "file"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise KeysFileError(f"keys file {path}: the directory {directory} does not exist")
        self._apply(read(path))  # a bad file stops the start, with the reason
        self._io = asyncio.Lock()  # one read or write at a time in this process: a stale read never wins
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def _apply(self, contents: Contents) -> None:
        self._secret = contents.secret
        self._stamp = contents.stamp
        self.error = None
        self._swap(KeyTable.of(contents.keys))

    def secret(self) -> bytes | None:
        return self._secret

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2)

    async def _watch(self) -> None:
        while not self._closing:
            await asyncio.sleep(POLL)
            try:
                await self.reload()
            except Exception:  # a bug here must not end watching
                log.exception("keys file watch failed")

    async def reload(self) -> bool:
        """Read the file again if it changed; False when it changed and cannot be read (the old table stays)."""
        async with self._io:
            stamp = stamp_of(self.path)
            if stamp == self._stamp:
                return True
            try:
                self._check_present(stamp)
                contents = await asyncio.to_thread(read, self.path)
            except KeysFileError as e:
                if str(e) != self.error:
                    log.warning("%s; the keys read before keep serving", e)
                self.error = str(e)
                return False
            self._apply(contents)
            return True

    def _check_present(self, stamp: Stamp | None) -> None:
        """A file that was read and is gone is a mistake to report, not a store with no keys (or a new secret)."""
        if stamp is None and self._stamp is not None:
            raise KeysFileError(
                f"keys file {self.path} is gone: restore it (every key was hashed under the secret it held)"
            )

    async def _change(self, edit: Edit[R]) -> R:
        async with self._io:
            try:
                self._check_present(stamp_of(self.path))
                contents, result = await asyncio.to_thread(change, self.path, edit)
            except KeysFileError as e:
                raise KeysUnavailable(f"{e}; fix the file first") from None
            except OSError as e:
                raise KeysUnavailable(f"keys file {self.path}: {e.strerror or e}") from None
            self._apply(contents)
            return result

    async def add(
        self, name: str, expires: float | None = None, meta: Mapping[str, str] | None = None
    ) -> tuple[ClientKey, str]:
        def edit(table: KeyTable, secret: bytes) -> tuple[tuple[ClientKey, ...], tuple[ClientKey, str]]:
            key, token = self._issue(name, expires, meta, secret)  # the secret of the file it goes into
            try:
                check_new(table, key, key.created)
            except ClientKeyError as e:
                raise KeyConflict(str(e)) from None
            return (*table.keys, key), (key, token)

        return await self._change(edit)

    async def list(self) -> list[ClientKey]:
        await self.reload()
        return list(self.table.keys)

    async def revoke(self, ref: str) -> ClientKey | None:
        def edit(table: KeyTable, secret: bytes) -> tuple[tuple[ClientKey, ...], ClientKey | None]:
            now = time.time()
            found = table.resolve(ref, now)
            if found is None or found.revoked is not None:
                return table.keys, found
            done = ClientKey(found.id, found.name, found.hash, found.created, found.expires, now, found.meta)
            return tuple(done if k.id == found.id else k for k in table.keys), done

        return await self._change(edit)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"path": self.path}
