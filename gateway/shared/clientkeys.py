"""Where the gateway's client keys are kept, and how a request's bearer token is checked against them.

Three stores, one interface (:class:`ClientKeys`): none (no ``--redis``, no
``--keys-file``: no key exists and none can be issued), a keys file
(:class:`~.keysfile.FileKeys`, one host) and Redis (:class:`RedisKeys`,
every replica). Either way the request path reads :attr:`ClientKeys.table`,
an immutable :class:`~gateway.policy.clientkeys.KeyTable` swapped whole (one
attribute assignment, atomic under the event loop), so it never waits on
Redis or the disk; :meth:`ClientKeys.hash` gives a token's keyed hash
(HMAC-SHA256), and :func:`authenticate` the caller or OpenAI's 401.

Redis layout, all keys under ``--redis-prefix`` and one hash tag (one slot
in a Redis Cluster): ``<prefix>{clientkeys}:data``, a hash of id -> the key
as JSON (its hash, never a token); ``<prefix>{clientkeys}:revoked``, id ->
when it was revoked (kept apart so a record is written once and never
rewritten); ``<prefix>{clientkeys}:version``, bumped on every change;
``<prefix>{clientkeys}:keycheck``, a fingerprint of the hash secret the
keys were issued under; and the channel ``<prefix>clientkeys:changed``. A
replica applies a change when the channel says so and in any case within
:data:`SYNC_INTERVAL` (:mod:`.follow`), so a revoke reaches every replica
within a second even when the message is lost.

The hash secret in Redis mode is the overrides' key (:attr:`OverrideStore.key
<gateway.shared.store.OverrideStore.key>`: ``REGIONGATE_OVERRIDE_KEY``, else
the random one kept in Redis that every replica shares). One secret for
both means one thing to provision and rotate, and an API-key override and a
client key hash a token the same way. A gateway or ``keys`` command that
holds a different secret (one replica given ``REGIONGATE_OVERRIDE_KEY``, the
others not) would issue keys nobody else can match: the keycheck catches
that, refusing the issue and warning in ``/readyz``.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import ErrorReply
from ..policy.callerkey import bearer_token, hash_key
from ..policy.clientkeys import (
    EMPTY,
    MAX_KEYS,
    ClientKey,
    ClientKeyError,
    KeyTable,
    TokenHasher,
    from_stored,
    looks_like_id,
    mask,
    new_key,
    new_token,
)
from .follow import Follower
from .redisconn import RedisUnavailable

if TYPE_CHECKING:
    from .store import OverrideStore, RedisStore

log = logging.getLogger("regiongate")

SYNC_INTERVAL = 0.5
NO_STORE = "no key store: client keys are kept in Redis (--redis) or in a keys file (--keys-file)"


class KeyConflict(ClientKeyError):
    """A live key already holds the name (or the store is full): 409 on the admin API."""


class NoKeyStore(KeyConflict):
    """Neither ``--redis`` nor ``--keys-file``: no key can be issued (409 on the admin API: a setting, not a fault)."""


class KeysUnavailable(Exception):
    """The store cannot be written now (Redis down, the hash secret unknown, the keys file unreadable)."""


class ClientKeys:
    """No store: the table is empty, so with ``client_keys: required`` every request gets a 401."""

    backend = "off"

    def __init__(self) -> None:
        self.table: KeyTable = EMPTY
        self.loaded = True  # a table was read at least once: until then a request cannot be judged (503)
        self.error: str | None = None  # why the last read failed, while the previous table keeps serving
        # Told of every table swapped in (tests wait on it rather than sleep; a metric could count keys).
        self.on_swap: Callable[[KeyTable], None] = lambda table: None
        self._hasher: TokenHasher | None = None

    def _swap(self, table: KeyTable) -> None:
        self.table = table
        self.on_swap(table)

    def secret(self) -> bytes | None:
        """The hash secret (None while it is not known)."""
        return None

    def hash(self, token: str) -> str | None:
        """The keyed hash a key with this token is stored under; None while the secret is not known."""
        secret = self.secret()
        if secret is None:
            return None
        hasher = self._hasher
        if hasher is None or hasher.secret is not secret:  # made once per secret (they change rarely)
            hasher = self._hasher = TokenHasher(secret)
        return hasher(token)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def add(
        self, name: str, expires: float | None = None, meta: Mapping[str, str] | None = None
    ) -> tuple[ClientKey, str]:
        """Issue a key: the record (as stored) and its token, which nothing keeps and is shown once."""
        raise NoKeyStore(NO_STORE)

    async def list(self) -> list[ClientKey]:
        """Every key (revoked and expired ones too), oldest first."""
        return list(self.table.keys)

    async def revoke(self, ref: str) -> ClientKey | None:
        """Revoke the key with id ``ref``, else the live key named ``ref``; None when there is none."""
        return None  # no store holds no key

    def _issue(
        self, name: str, expires: float | None, meta: Mapping[str, str] | None, secret: bytes | None = None
    ) -> tuple[ClientKey, str]:
        """A new key and its token, hashed under ``secret`` (else this store's)."""
        secret = secret or self.secret()
        if secret is None:
            raise KeysUnavailable("the hash secret is not known yet (Redis has not answered since start)")
        token = new_token()
        return new_key(name, hash_key(secret, token), time.time(), expires, meta), token

    def describe(self) -> dict[str, Any]:
        """What ``/readyz`` says: the backend and how many keys in each state (never a name, token or hash)."""
        return {"backend": self.backend, "keys": self.table.counts(time.time()), "error": self.error}

    def warnings(self) -> builtins.list[str]:
        return [f"client keys: {self.error}; the keys read before keep serving"] if self.error else []


def fingerprint(secret: bytes) -> str:
    """Which secret keys were issued under, without revealing it (so two holders can compare)."""
    return hmac.new(secret, b"regiongate client keys: keycheck", hashlib.sha256).hexdigest()[:16]


# Issue one key: refuse a name a live key holds, a full store or a different secret, all in one step.
# KEYS: data, revoked, version, keycheck. ARGV: id, record, name, now, keycheck, max keys.
_ADD_LUA = """
local check = redis.call('GET', KEYS[4])
if check and check ~= ARGV[5] then return 'KEYCHECK' end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[6]) then return 'FULL' end
local now = tonumber(ARGV[4])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local ok, k = pcall(cjson.decode, all[i + 1])
  if ok and type(k) == 'table' and k.name == ARGV[3] and redis.call('HEXISTS', KEYS[2], all[i]) == 0
     and (type(k.expires) ~= 'number' or k.expires > now) then
    return 'TAKEN'
  end
end
if not check then redis.call('SET', KEYS[4], ARGV[5]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[3])
return 'OK'
"""

# Revoke by id (when ARGV[3] = '1' and there is one) or by the live key's name; a second revoke keeps the first time.
# KEYS: data, revoked, version. ARGV: ref, now, by id. Returns {id, revoked at} or nil.
_REVOKE_LUA = """
local id = nil
local now = tonumber(ARGV[2])
if ARGV[3] == '1' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  id = ARGV[1]
else
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local ok, k = pcall(cjson.decode, all[i + 1])
    if ok and type(k) == 'table' and k.name == ARGV[1] and redis.call('HEXISTS', KEYS[2], all[i]) == 0
       and (type(k.expires) ~= 'number' or k.expires > now) then
      id = all[i]
      break
    end
  end
end
if not id then return nil end
local was = redis.call('HGET', KEYS[2], id)
if was then return {id, was} end
redis.call('HSET', KEYS[2], id, ARGV[2])
redis.call('INCR', KEYS[3])
return {id, ARGV[2]}
"""


class RedisKeys(ClientKeys):
    """The keys in Redis, shared by every replica; each keeps a copy that a change reaches within a second."""

    backend = "redis"

    def __init__(self, overrides: RedisStore) -> None:
        super().__init__()
        self.loaded = False
        # The overrides' Redis: its connection pool, its breaker (one log line and one metric per
        # transition, whoever's call found Redis down) and its key, the hash secret (see the docstring).
        self.overrides = overrides
        self.target = overrides.target
        self.prefix = prefix = overrides.prefix
        tag = f"{prefix}{{clientkeys}}"
        self.k_data, self.k_revoked = f"{tag}:data", f"{tag}:revoked"
        self.k_version, self.k_keycheck = f"{tag}:version", f"{tag}:keycheck"
        self.channel = f"{prefix}clientkeys:changed"
        self.breaker = overrides.breaker
        self.client: Any = None
        self.version: bytes | None = None
        self.synced_at: float | None = None
        self.keycheck_mismatch = False
        self._follower: Follower | None = None

    def __repr__(self) -> str:  # never the password
        return f"RedisKeys({self.target.url!r}, prefix={self.prefix!r})"

    def secret(self) -> bytes | None:
        return self.overrides.key

    async def start(self) -> None:
        """After the overrides' store has started: its client is the one used here."""
        self.client = self.overrides.client
        self._add = self.client.register_script(_ADD_LUA)
        self._revoke = self.client.register_script(_REVOKE_LUA)
        await self.sync()
        # A Cluster has no pub/sub here (as for the overrides): the poll alone keeps it within SYNC_INTERVAL.
        listen = self.target.mode != "cluster"
        self._follower = Follower("client keys", self.client, self.breaker, self.channel, self.sync, SYNC_INTERVAL,
                                  listen=listen)  # fmt: skip
        self._follower.start()

    async def close(self) -> None:
        """Before the overrides' store closes the client."""
        if self._follower is not None:
            await self._follower.close()

    async def _call(self, op: str, fn: Any) -> Any:
        return await self.breaker.call(op, fn)

    async def sync(self, force: bool = False) -> bool:
        """Fetch the keys if they changed; False when Redis could not be asked (the last copy keeps serving)."""
        try:
            if self.secret() is None:
                await self.overrides.ensure_key()
            version = await self._call("keys sync", lambda: self.client.get(self.k_version))
            if force or version != self.version or self.synced_at is None:
                data = await self._call("keys sync", lambda: self.client.hgetall(self.k_data))
                revoked = await self._call("keys sync", lambda: self.client.hgetall(self.k_revoked))
                check = await self._call("keys sync", lambda: self.client.get(self.k_keycheck))
                self._swap(KeyTable.of(self._parse(data, revoked)))
                self.version = version
                self._check_secret(check)
            self.synced_at = time.time()
            self.loaded = True
            self.error = None
            return True
        except RedisUnavailable as e:
            self.error = f"Redis did not answer ({e})" if self.loaded else None
            return False

    def _check_secret(self, check: bytes | None) -> None:
        secret = self.secret()
        mismatch = check is not None and secret is not None and check.decode() != fingerprint(secret)
        if mismatch and not self.keycheck_mismatch:
            log.warning("client keys: %s", _MISMATCH)
        self.keycheck_mismatch = mismatch

    def _parse(self, data: dict[bytes, bytes], revoked: dict[bytes, bytes]) -> list[ClientKey]:
        keys = []
        for field, value in data.items():
            try:
                raw = orjson.loads(value)
                at = revoked.get(field)
                if isinstance(raw, dict) and at is not None:
                    raw["revoked"] = float(at)
                keys.append(from_stored(raw))
            except (ClientKeyError, ValueError, orjson.JSONDecodeError) as e:
                log.warning("ignoring unreadable client key %r in Redis: %s", field[:64], e)
        return keys

    async def _announce(self) -> None:
        with contextlib.suppress(RedisUnavailable):
            await self._call("publish", lambda: self.client.publish(self.channel, b"1"))

    async def add(
        self, name: str, expires: float | None = None, meta: Mapping[str, str] | None = None
    ) -> tuple[ClientKey, str]:
        if self.secret() is None:
            await self.overrides.ensure_key()
        key, token = self._issue(name, expires, meta)
        secret = self.secret()
        assert secret is not None  # _issue hashed with it
        args = [key.id, orjson.dumps(key.stored()), key.name, repr(key.created), fingerprint(secret), MAX_KEYS]
        keys = [self.k_data, self.k_revoked, self.k_version, self.k_keycheck]
        try:
            status = await self._call("keys write", lambda: self._add(keys=keys, args=args))
        except RedisUnavailable as e:
            raise KeysUnavailable(f"Redis {self.target.url}: {e}") from None
        status = status.decode() if isinstance(status, bytes) else str(status)
        if status == "TAKEN":
            raise KeyConflict(f"name: a live key is already named {key.name!r} (revoke it first, or pick another)")
        if status == "FULL":
            raise KeyConflict(f"at most {MAX_KEYS} keys are kept (revoked and expired ones included)")
        if status == "KEYCHECK":
            raise KeysUnavailable(_MISMATCH)
        await self._announce()
        await self.sync(force=True)
        return key, token

    async def list(self) -> list[ClientKey]:
        await self.sync()
        return list(self.table.keys)

    async def revoke(self, ref: str) -> ClientKey | None:
        keys = [self.k_data, self.k_revoked, self.k_version]
        args = [ref, repr(time.time()), "1" if looks_like_id(ref) else "0"]
        try:
            reply = await self._call("keys write", lambda: self._revoke(keys=keys, args=args))
        except RedisUnavailable as e:
            raise KeysUnavailable(f"Redis {self.target.url}: {e}") from None
        if reply is None:
            return None
        await self._announce()
        await self.sync(force=True)
        id = reply[0].decode()
        return self.table.by_id(id)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"last_sync": self.synced_at}

    def warnings(self) -> builtins.list[str]:
        return super().warnings() + ([f"client keys: {_MISMATCH}"] if self.keycheck_mismatch else [])


_MISMATCH = (
    "the keys in Redis were issued under a different hash secret than this process holds, so their tokens "
    "cannot match here: give every gateway and `regiongate keys` the same REGIONGATE_OVERRIDE_KEY (or none)"
)


def open_keys(keys_file: str | None, overrides: OverrideStore) -> ClientKeys:
    """The store the options ask for: the keys file, else Redis when the overrides are there, else none.
    Raises :class:`ClientKeyError` for a file beside Redis, ``KeysFileError`` for a bad file."""
    from .store import RedisStore

    if keys_file and isinstance(overrides, RedisStore):
        raise ClientKeyError(
            "--keys-file and --redis: with --redis the client keys are kept in Redis, shared by every "
            "replica; drop --keys-file"
        )
    if keys_file:
        from .keysfile import FileKeys

        return FileKeys(keys_file)
    if isinstance(overrides, RedisStore):
        return RedisKeys(overrides)
    return ClientKeys()


# --- the request's side: who is calling ------------------------------------------------------


def caller(headers: Iterable[tuple[bytes, bytes]], keys: ClientKeys, now: float | None = None) -> ClientKey | None:
    """The valid key whose token is the request's bearer token (``Authorization: Bearer rg-...``), or None."""
    token = bearer_token(headers)
    if token is None:
        return None
    hashed = keys.hash(token)
    if hashed is None:
        return None
    return keys.table.find(hashed, time.time() if now is None else now)


# OpenAI's 401 for a request without a key; its last sentence points at this gateway's
# operator rather than OpenAI's key page, since these keys are the gateway's own.
NO_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY). You can obtain an API key from this gateway's operator."
)


def invalid_api_key(token: str | None) -> ErrorReply:
    """OpenAI's 401 ``invalid_api_key`` (the SDKs raise ``AuthenticationError``), the token masked as OpenAI does."""
    if token is None:
        return ErrorReply(401, "invalid_request_error", "invalid_api_key", NO_KEY_MESSAGE)
    return ErrorReply(
        401,
        "invalid_request_error",
        "invalid_api_key",
        f"Incorrect API key provided: {mask(token)}. You can obtain an API key from this gateway's operator.",
    )


KEYS_UNAVAILABLE = ErrorReply(
    503,
    "server_error",
    "client_keys_unavailable",
    "The gateway cannot check API keys yet (its key store has not answered since it started). Try again shortly.",
    retry=True,
)


def authenticate(
    headers: Iterable[tuple[bytes, bytes]], keys: ClientKeys, now: float | None = None
) -> ClientKey | ErrorReply:
    """The caller's valid key, or the reply that refuses the request: 401 for a missing, unknown, revoked
    or expired key, 503 while the store has never been read (a gateway that started with Redis down)."""
    headers = tuple(headers)
    found = caller(headers, keys, now)
    if found is not None:
        return found
    if not keys.loaded:
        return KEYS_UNAVAILABLE
    return invalid_api_key(bearer_token(headers))


__all__ = [
    "KEYS_UNAVAILABLE",
    "ClientKeys",
    "KeyConflict",
    "KeysUnavailable",
    "NoKeyStore",
    "RedisKeys",
    "authenticate",
    "caller",
    "invalid_api_key",
    "open_keys",
]
