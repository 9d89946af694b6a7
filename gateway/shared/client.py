"""``regiongate override add|list|remove``: through a gateway's admin API, or straight to Redis.

The admin API is the usual way (the gateway checks and hashes, and applies
it at once); ``--redis`` serves when no gateway is reachable, and writes
exactly what a gateway would (same keys, same hash, same announcement).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from ..policy.overrides import Compiled, Override, OverrideError, compile_overrides, new_override, printable
from .redisconn import RedisConfigError, RedisUnavailable
from .store import OverrideStore, open_store

ADMIN_TOKEN_ENV = "REGIONGATE_ADMIN_TOKEN"


class ClientError(Exception):
    pass


def _out(o: Override) -> dict[str, Any]:
    return o.public()


class AdminClient:
    def __init__(self, url: str, token: str | None) -> None:
        if not token:
            raise ClientError(f"--admin-url needs the admin token in {ADMIN_TOKEN_ENV}")
        self.base = url.rstrip("/")
        self.token = token

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read()).get("detail")
            except ValueError:
                detail = None
            if isinstance(detail, list):  # a 422: pydantic's problems
                detail = "; ".join(str(d.get("msg", d)) for d in detail)
            raise ClientError(f"{self.base}: {e.code}: {detail or e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ClientError(f"cannot reach the admin API at {self.base}: {reason}") from None

    def add(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/admin/overrides", body)
        return result

    def list(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/admin/overrides")["overrides"])

    def remove(self, id: str) -> None:
        self._call("DELETE", f"/admin/overrides/{id}")


class RedisClient:
    def __init__(self, url: str, prefix: str, env: dict[str, str]) -> None:
        try:
            self.store: OverrideStore = open_store(url, prefix, 2.0, env)
        except RedisConfigError as e:
            raise ClientError(str(e)) from None

    def _run(self, fn: Any) -> Any:
        async def go() -> Any:
            await self.store.start()
            try:
                if getattr(self.store, "synced_at", 1) is None:  # the first sync failed
                    raise ClientError(f"Redis {self.store.describe().get('url')}: {self.store.describe().get('error')}")
                return await fn()
            except RedisUnavailable as e:
                raise ClientError(f"Redis {self.store.describe().get('url')}: {e}") from None
            finally:
                await self.store.close()

        return asyncio.run(go())

    def add(self, body: dict[str, Any]) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            kind = next(k for k in ("cidr", "api_key", "country", "subdivision") if body.get(k) is not None)
            key = await self.store.ensure_key() if kind == "api_key" else None
            try:
                o = new_override(
                    body["action"],
                    kind,
                    body[kind],
                    body["reason"],
                    body["by"],
                    id=body.get("id"),
                    ttl=body.get("ttl"),
                    key=key,
                )
            except OverrideError as e:
                raise ClientError(str(e)) from None
            return _out(await self.store.add(o))

        result: dict[str, Any] = self._run(go)
        return result

    def list(self) -> list[dict[str, Any]]:
        async def go() -> list[dict[str, Any]]:
            return [_out(o) for o in await self.store.list()]

        result: list[dict[str, Any]] = self._run(go)
        return result

    def compiled(self) -> Compiled:
        """The overrides in force, compiled as a gateway compiles them."""

        async def go() -> list[Override]:
            return await self.store.list()

        return compile_overrides(self._run(go), time.time())

    def remove(self, id: str) -> None:
        async def go() -> None:
            if not await self.store.remove(id):
                raise ClientError(f"no override {id}")

        self._run(go)


def client_for(admin_url: str | None, redis_url: str | None, prefix: str) -> AdminClient | RedisClient:
    if admin_url and redis_url:
        raise ClientError("give --admin-url or --redis, not both")
    if admin_url:
        return AdminClient(admin_url, os.environ.get(ADMIN_TOKEN_ENV))
    if redis_url:
        return RedisClient(redis_url, prefix, dict(os.environ))
    raise ClientError(
        "give --admin-url (a running gateway's control plane, token in REGIONGATE_ADMIN_TOKEN) "
        "or --redis (REGIONGATE_REDIS_URL)"
    )


def render(overrides: list[dict[str, Any]]) -> list[str]:
    """``override list``'s table; every cell escaped, so no stored text can draw a row or colour the terminal."""
    rows = [["ID", "ACTION", "KIND", "VALUE", "EXPIRES", "BY", "REASON"]]
    for o in overrides:
        expires = o.get("expires_at")
        when = datetime.fromtimestamp(expires, UTC).isoformat(timespec="seconds") if expires else "never"
        cells = [o["id"], o["action"], o["kind"], o["value"], when, o.get("by") or "-", o.get("reason") or ""]
        rows.append([printable(str(c)) for c in cells])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
