"""The gateway's own client keys, the pure half: what a key is, the table a request is checked against, new tokens.

A client key names a caller (``team-a``) to budgets, rate limits,
overrides, the access log and the audit stream, so that a ``by: api_key``
budget behind an upstream that injects the operator's key is a bucket the
operator hands out, not one the caller picks. A key is kept only as the
keyed hash (HMAC-SHA256, :func:`~.callerkey.hash_key`) of its token: the
token itself is shown once, when it is issued, and never stored.

:class:`KeyTable` is immutable and answers :meth:`KeyTable.find` with one
dict lookup by hash; the store (:mod:`gateway.shared.clientkeys`) swaps a
new table in whole when keys change. Looking a hash up in a dict is not a
timing oracle worth closing: the caller cannot choose the HMAC it would
have to guess byte by byte without the secret.

Names are short, one line, from a safe set (letters, digits, ``.``,
``_``, ``@``, ``-``): a name goes into Redis keys (a budget's subject,
inside a ``{...}`` hash tag), log lines and metric labels, so it may hold
no brace, colon, space or control character. At most one live key (not
revoked, not expired) holds a name at a time; a revoked or expired key's
name may be issued again, and the new key then spends the same budgets,
which is what re-issuing a team's key should do. ``keys revoke REF`` takes
an id (``ck_`` and 16 hex digits) or a name; a name spelled like an id is
looked up as an id first. No I/O here.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .overrides import printable

TOKEN_PREFIX = "rg-"
# 32 bytes: 256 random bits, 43 URL-safe base64 characters after the prefix.
TOKEN_BYTES = 32
ID_PREFIX = "ck_"
MAX_NAME = 64
MAX_META = 16  # entries per key
MAX_META_VALUE = 256
# A store refuses to issue more than this: each replica holds every key in memory and a
# file store rewrites all of them on each change (10,000 keys: about 3 MB of JSON).
MAX_KEYS = 10_000

# The same patterns in the admin API's schema (gateway.control.schemas), so its OpenAPI document is exact.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
META_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
META_VALUE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]{0,256}$"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*")
_ID = re.compile(r"ck_[0-9a-f]{16}")
_META_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HASH = re.compile(r"[0-9a-f]{64}")


class ClientKeyError(ValueError):
    """A key that cannot be issued or read as given (the message says which field and why)."""


@dataclass(frozen=True, slots=True)
class ClientKey:
    """One issued key. ``hash`` is the keyed hash of its token; the token is never kept."""

    id: str
    name: str
    hash: str = field(repr=False)
    created: float
    expires: float | None = None
    revoked: float | None = None  # when it was revoked; None: not revoked
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def valid(self, now: float) -> bool:
        """Neither revoked nor expired at ``now``."""
        return self.revoked is None and (self.expires is None or now < self.expires)

    def state(self, now: float) -> str:
        """``active``, ``revoked`` or ``expired``, as ``keys list`` shows it."""
        if self.revoked is not None:
            return "revoked"
        return "expired" if not self.valid(now) else "active"

    def stored(self) -> dict[str, Any]:
        """The record as the stores keep it (the hash, never a token); :func:`from_stored` reads it back."""
        return {
            "id": self.id,
            "name": self.name,
            "hash": self.hash,
            "created": self.created,
            "expires": self.expires,
            "revoked": self.revoked,
            "meta": dict(self.meta),
        }

    def public(self, now: float) -> dict[str, Any]:
        """What ``keys list`` and ``GET /admin/keys`` show: everything but the hash."""
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state(now),
            "created": self.created,
            "expires": self.expires,
            "revoked": self.revoked,
            "meta": dict(self.meta),
        }


class TokenHasher:
    """HMAC-SHA256 under one secret, the same hex digest as :func:`~.callerkey.hash_key`, per token cheaper.

    ``hmac.new`` sets up OpenSSL's HMAC afresh on every call; with OpenSSL 3 that set-up
    costs several times the hashing of a 46-byte token (measured: ``hmac.new`` 6x a plain
    SHA-256, these pads 2x). The request path hashes every bearer token, so the two padded
    states of RFC 2104 are computed once here and copied per token.
    """

    __slots__ = ("_inner", "_outer", "secret")

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        key = hashlib.sha256(secret).digest() if len(secret) > 64 else secret
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def __call__(self, token: str) -> str:
        inner = self._inner.copy()
        inner.update(token.encode("utf-8", "surrogateescape"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


def new_token() -> str:
    """A fresh token: ``rg-`` and 256 random bits, URL-safe (46 characters)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def new_id() -> str:
    """A key's public id (``ck_`` and 64 random bits): what ``keys list`` shows and ``keys revoke`` takes."""
    return ID_PREFIX + secrets.token_hex(8)


def looks_like_id(ref: str) -> bool:
    return _ID.fullmatch(ref) is not None


def check_name(name: str) -> str:
    """The name as given, or :class:`ClientKeyError` saying what is wrong with it."""
    if not name:
        raise ClientKeyError("name: must not be empty")
    if len(name) > MAX_NAME:
        raise ClientKeyError(f"name: at most {MAX_NAME} characters (got {len(name)})")
    if _NAME.fullmatch(name) is None:
        raise ClientKeyError(
            f"name: {printable(name)!r} may hold only letters, digits, '.', '_', '@' and '-', "
            "and starts with a letter or digit"
        )
    return name


def check_meta(meta: Mapping[str, str]) -> MappingProxyType[str, str]:
    """Free-form labels (``owner=alice``): bounded, one line each, shown escaped."""
    if len(meta) > MAX_META:
        raise ClientKeyError(f"meta: at most {MAX_META} entries (got {len(meta)})")
    for k, v in meta.items():
        if not isinstance(k, str) or _META_KEY.fullmatch(k) is None:
            raise ClientKeyError(
                f"meta: key {printable(str(k))[:80]!r} may hold only letters, digits, '.', '_' and '-' "
                f"(at most 64, starting with a letter or digit)"
            )
        if not isinstance(v, str):
            raise ClientKeyError(f"meta: {k}: the value must be a string")
        if len(v) > MAX_META_VALUE:
            raise ClientKeyError(f"meta: {k}: at most {MAX_META_VALUE} characters")
        if printable(v) != v:  # as an override's reason: nothing that could forge or colour a terminal line
            raise ClientKeyError(f"meta: {k}: no control or bidirectional formatting characters")
    return MappingProxyType(dict(sorted(meta.items())))


def parse_meta(items: Iterable[str]) -> dict[str, str]:
    """``--meta k=v`` arguments as a dict (checked by :func:`check_meta` when the key is made)."""
    meta: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise ClientKeyError(f"meta: {printable(item)[:80]!r} is not k=v")
        if k in meta:
            raise ClientKeyError(f"meta: {printable(k)[:80]!r} given twice")
        meta[k] = v
    return meta


def new_key(
    name: str, hash: str, now: float, expires: float | None = None, meta: Mapping[str, str] | None = None
) -> ClientKey:
    """A new key record (its token hashed by the caller, who alone holds the secret)."""
    if expires is not None and expires <= now:
        raise ClientKeyError("expires: must be in the future")
    return ClientKey(new_id(), check_name(name), hash, now, expires, None, check_meta(meta or {}))


def from_stored(raw: object) -> ClientKey:
    """A record as a store keeps it; :class:`ClientKeyError` for anything else (names the field)."""
    if not isinstance(raw, dict):
        raise ClientKeyError("a key record must be a JSON object")
    try:
        id, name, hash = raw["id"], raw["name"], raw["hash"]
        created = raw["created"]
    except KeyError as e:
        raise ClientKeyError(f"missing field {e.args[0]!r}") from None
    if not isinstance(id, str) or _ID.fullmatch(id) is None:
        raise ClientKeyError(f"id: {printable(str(id))[:40]!r} is not a key id ({ID_PREFIX} and 16 hex digits)")
    if not isinstance(name, str):
        raise ClientKeyError(f"{id}: name must be a string")
    check_name(name)
    if not isinstance(hash, str) or _HASH.fullmatch(hash) is None:
        raise ClientKeyError(f"{id}: hash must be 64 hex digits")
    times = {"created": created, "expires": raw.get("expires"), "revoked": raw.get("revoked")}
    for what, value in times.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ClientKeyError(f"{id}: {what} must be a number of seconds since the epoch")
    if created is None:
        raise ClientKeyError(f"{id}: created must be a number of seconds since the epoch")
    meta = raw.get("meta")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise ClientKeyError(f"{id}: meta must be an object")
    try:
        checked = check_meta(meta)
    except ClientKeyError as e:
        raise ClientKeyError(f"{id}: {e}") from None
    return ClientKey(id, name, hash, float(created), _num(times["expires"]), _num(times["revoked"]), checked)


def _num(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class KeyTable:
    """Every key a store holds, indexed for the request path; built whole, never changed."""

    keys: tuple[ClientKey, ...] = ()
    _by_hash: Mapping[str, ClientKey] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, keys: Iterable[ClientKey]) -> KeyTable:
        ordered = tuple(sorted(keys, key=lambda k: (k.created, k.id)))
        # Unrevoked keys only: a revoked key can never answer, and a token's hash is unique (256 random bits).
        by_hash = {k.hash: k for k in ordered if k.revoked is None}
        return cls(ordered, by_hash)

    def find(self, token_hash: str, now: float) -> ClientKey | None:
        """The valid key (not revoked, not expired at ``now``) whose token hashes to ``token_hash``."""
        key = self._by_hash.get(token_hash)
        if key is None or not key.valid(now):
            return None
        return key

    def live(self, name: str, now: float) -> ClientKey | None:
        """The valid key holding ``name``, if any (at most one does)."""
        return next((k for k in self.keys if k.name == name and k.valid(now)), None)

    def by_id(self, id: str) -> ClientKey | None:
        return next((k for k in self.keys if k.id == id), None)

    def resolve(self, ref: str, now: float) -> ClientKey | None:
        """What ``keys revoke REF`` means: the key with that id, else the live key with that name."""
        found = self.by_id(ref) if looks_like_id(ref) else None
        return found or self.live(ref, now)

    def counts(self, now: float) -> dict[str, int]:
        """Keys by state, for ``/readyz`` (numbers only: never a name, token or hash)."""
        out = {"active": 0, "expired": 0, "revoked": 0}
        for k in self.keys:
            out[k.state(now)] += 1
        return out

    def __len__(self) -> int:
        return len(self.keys)


EMPTY = KeyTable()


def check_new(table: KeyTable, key: ClientKey, now: float) -> None:
    """Refuse a new key whose name a live key holds, or one more than :data:`MAX_KEYS`."""
    if table.live(key.name, now) is not None:
        raise ClientKeyError(f"name: a live key is already named {key.name!r} (revoke it first, or pick another)")
    if len(table) >= MAX_KEYS:
        raise ClientKeyError(f"at most {MAX_KEYS} keys are kept (revoked and expired ones included)")


def mask(token: str) -> str:
    """A token as OpenAI shows a wrong one: its first 8 and last 4 characters, the rest as ``*``.

    ``rg-abcde*********************************wxyz``. The stars are capped at 40 (a
    46-character token has 34), so a long made-up token cannot make a long reply; a token of
    12 characters or fewer is shown as stars only, since its ends would be most of it.
    """
    if len(token) <= 12:
        return "*" * len(token)
    return printable(token[:8]) + "*" * min(len(token) - 12, 40) + printable(token[-4:])
