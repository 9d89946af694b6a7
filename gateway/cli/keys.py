"""``regiongate keys add|list|revoke``: the gateway's own client keys, through its admin API, Redis or a keys file.

``add`` prints the token once, alone on stdout (so ``TOKEN=$(regiongate keys
add --name team-a)`` captures it), and says on stderr that it is not shown
again: only its keyed hash is kept. ``list`` never shows a hash. ``revoke``
takes a key's id or the name of its live key; every gateway refuses the
key within a second. The admin API (``--admin-url``) is the usual way;
``--redis`` and ``--keys-file`` write the store directly, exactly as a
gateway would (the same records, hash and announcement).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

from .options import add_redis_options, env

T = TypeVar("T")
ONCE = "this token is shown once and never again (Regiongate keeps only its keyed hash): store it now"


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    k = sub.add_parser(
        "keys",
        help="issue, list or revoke the gateway's own client keys (admin API, Redis or a keys file)",
        description="The gateway's own client keys: with `client_keys: required` in the policy a request needs "
        "one, and budgets, rate limits, overrides and logs name the caller by the key's name. Give --admin-url "
        "(token in REGIONGATE_ADMIN_TOKEN), --redis or --keys-file.",
    )
    ksub = k.add_subparsers(dest="keys_command", required=True, help="what to do")
    ka = ksub.add_parser("add", help="issue a key and print its token once")
    ka.add_argument("--name", required=True, help="who holds it (letters, digits, . _ @ -); unique among live keys")
    ka.add_argument("--expires", metavar="DURATION", help="expires after this long (90d, 12h, 2w); default: never")
    ka.add_argument("--meta", metavar="K=V", action="append", default=[], help="a label kept with the key (repeatable)")
    kl = ksub.add_parser("list", help="list the keys (never a token or hash)")
    kr = ksub.add_parser("revoke", help="revoke a key: every gateway refuses it within a second")
    kr.add_argument("ref", metavar="ID|NAME", help="the key's id (ck_...) or the name of its live key")
    for p in (ka, kl, kr):
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument(
            "--admin-url", metavar="URL", help="a running gateway's control plane, e.g. http://127.0.0.1:9090"
        )
        add_redis_options(p)
        p.add_argument(
            "--keys-file",
            metavar="PATH",
            default=env("KEYS_FILE"),
            help="as serve --keys-file (env REGIONGATE_KEYS_FILE)",
        )
    k.set_defaults(func=run)


class KeysCommandError(Exception):
    pass


class AdminKeys:
    """Through a gateway's admin API (it issues, stores and applies the change at once)."""

    def __init__(self, url: str) -> None:
        from ..shared.client import ADMIN_TOKEN_ENV, AdminClient

        self.api = AdminClient(url, os.environ.get(ADMIN_TOKEN_ENV))

    def add(self, name: str, expires_in: float | None, meta: dict[str, str]) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "meta": meta}
        if expires_in is not None:
            body["expires_in"] = expires_in
        out: dict[str, Any] = self.api._call("POST", "/admin/keys", body)
        return out

    def list(self) -> list[dict[str, Any]]:
        return list(self.api._call("GET", "/admin/keys")["keys"])

    def revoke(self, ref: str) -> dict[str, Any]:
        from urllib.parse import quote

        out: dict[str, Any] = self.api._call("DELETE", f"/admin/keys/{quote(ref, safe='')}")["revoked"]
        return out


class StoreKeys:
    """Straight to Redis or the keys file, as a gateway writes them."""

    def __init__(self, redis: str | None, keys_file: str | None, prefix: str) -> None:
        self.redis, self.keys_file, self.prefix = redis, keys_file, prefix

    def _run(self, op: Callable[[Any], Awaitable[T]]) -> T:
        from ..policy.clientkeys import ClientKeyError
        from ..shared.clientkeys import KeysUnavailable, RedisKeys, open_keys
        from ..shared.redisconn import RedisConfigError, RedisUnavailable
        from ..shared.store import OverrideStore, open_store

        environ = dict(os.environ)

        async def go() -> T:
            try:
                overrides = open_store(self.redis, self.prefix, 2.0, environ) if self.redis else OverrideStore({})
                keys = open_keys(self.keys_file, overrides)
            except (RedisConfigError, ClientKeyError) as e:
                raise KeysCommandError(str(e)) from None
            await overrides.start()
            try:
                await keys.start()
                if isinstance(keys, RedisKeys) and not keys.loaded:
                    raise KeysCommandError(f"Redis {keys.target.url}: {keys.breaker.last_error or 'no answer'}")
                return await op(keys)
            except (KeysUnavailable, RedisUnavailable) as e:
                raise KeysCommandError(str(e)) from None
            finally:
                await keys.close()
                await overrides.close()

        return asyncio.run(go())

    def add(self, name: str, expires_in: float | None, meta: dict[str, str]) -> dict[str, Any]:
        from ..shared.clientkeys import ClientKeys

        async def go(keys: ClientKeys) -> dict[str, Any]:
            expires = time.time() + expires_in if expires_in is not None else None
            key, token = await keys.add(name, expires, meta)
            return {"key": key.public(time.time()), "token": token}

        return self._run(go)

    def list(self) -> list[dict[str, Any]]:
        from ..shared.clientkeys import ClientKeys

        async def go(keys: ClientKeys) -> list[dict[str, Any]]:
            now = time.time()
            return [k.public(now) for k in await keys.list()]

        return self._run(go)

    def revoke(self, ref: str) -> dict[str, Any]:
        from ..shared.clientkeys import ClientKeys

        async def go(keys: ClientKeys) -> dict[str, Any]:
            found = await keys.revoke(ref)
            if found is None:
                raise KeysCommandError(f"no key {ref} (an id, or the name of a live key)")
            return found.public(time.time())

        return self._run(go)


def _client(args: argparse.Namespace) -> AdminKeys | StoreKeys:
    # A gateway's admin URL, then a keys file, beat a Redis URL that may only have come from the environment.
    if args.admin_url:
        return AdminKeys(args.admin_url)
    if args.keys_file:
        return StoreKeys(None, args.keys_file, args.redis_prefix)
    if args.redis:
        return StoreKeys(args.redis, None, args.redis_prefix)
    raise KeysCommandError(
        "give --admin-url (a running gateway's control plane, token in REGIONGATE_ADMIN_TOKEN), "
        "--redis (REGIONGATE_REDIS_URL) or --keys-file (REGIONGATE_KEYS_FILE)"
    )


def _when(ts: float | None, never: str = "never") -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts is not None else never


def render(keys: list[dict[str, Any]]) -> list[str]:
    """``keys list``'s table; every cell escaped, so no stored text can draw a row or colour the terminal."""
    from ..policy.overrides import printable

    rows = [["ID", "NAME", "STATE", "CREATED", "EXPIRES", "META"]]
    for k in keys:
        meta = " ".join(f"{m}={v}" for m, v in sorted((k.get("meta") or {}).items()))
        state = k["state"] + (f" {_when(k['revoked'])}" if k.get("revoked") else "")
        rows.append([printable(str(c)) for c in (k["id"], k["name"], state, _when(k["created"]),
                                                 _when(k.get("expires")), meta)])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _print_json(value: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")


def run(args: argparse.Namespace) -> int:
    from ..policy.clientkeys import ClientKeyError, parse_meta
    from ..runtime import parse_duration
    from ..shared.client import ClientError

    try:
        client = _client(args)
        if args.keys_command == "add":
            try:
                expires_in = parse_duration(args.expires) if args.expires else None
            except ValueError as e:
                raise KeysCommandError(f"--expires: {e}") from None
            out = client.add(args.name, expires_in, parse_meta(args.meta))
            if args.json:
                _print_json(out | {"warning": ONCE})
            else:
                key = out["key"]
                print(
                    f"issued client key {key['id']} ({key['name']}), expires {_when(key.get('expires'))}",
                    file=sys.stderr,
                )
                print(out["token"], flush=True)
                print(f"regiongate: warning: {ONCE}", file=sys.stderr)
        elif args.keys_command == "list":
            rows = client.list()
            if args.json:
                _print_json(rows)
            else:
                for line in render(rows):
                    print(line)
        else:
            key = client.revoke(args.ref)
            if args.json:
                _print_json(key)
            else:
                print(f"revoked client key {key['id']} ({key['name']}): every gateway refuses it within a second")
    except (KeysCommandError, ClientError, ClientKeyError) as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 1
    return 0
