"""The Redis connection: URL forms, the password, timeouts and a circuit breaker.

URL forms (``--redis`` / ``REGIONGATE_REDIS_URL``):

- ``redis://host:6379/0``, ``rediss://host:6380/0`` (TLS), ``unix:///run/redis.sock?db=0``
- ``redis+sentinel://host1:26379,host2:26379/mymaster[/db]``: ask the Sentinels for the master of a service
- ``redis+cluster://host1:7000,host2:7001``: a Redis Cluster, any reachable nodes as seeds

The password comes only from ``REGIONGATE_REDIS_PASSWORD``: a URL with one is
refused (the command line shows in the process list), whether as
``user:password@`` or as a query parameter (``?password=``, ``?auth=``, any
name with ``pass``, ``auth``, ``secret``, ``token`` or ``key`` in it, in any
case or escape). Every URL shown in logs, errors and ``/readyz`` goes through
:func:`redact`, which hides the password and every query value but ``db``,
so not even the refusal repeats one. A user name in the URL is allowed
(Redis ACL).

Every call has a short timeout. After a few failures in a row the breaker
opens and calls fail at once, without touching the network, until a probe
after a back-off finds Redis again: a dead Redis costs nothing per call.
The breaker logs each transition once: when it opens (Redis down) and when
it closes again (Redis back, after how long), never per failed call.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

PASSWORD_ENV = "REGIONGATE_REDIS_PASSWORD"
Mode = Literal["redis", "unix", "sentinel", "cluster"]
_SCHEMES: dict[str, Mode] = {
    "redis": "redis",
    "rediss": "redis",
    "unix": "unix",
    "redis+sentinel": "sentinel",
    "rediss+sentinel": "sentinel",
    "redis+cluster": "cluster",
    "rediss+cluster": "cluster",
}
T = TypeVar("T")
log = logging.getLogger("regiongate")


class RedisConfigError(ValueError):
    pass


class RedisUnavailable(Exception):
    """Redis did not answer (or the breaker is open): serve from what is already known."""


_SECRET_PARAM = re.compile(r"pass|auth|secret|token|key|cred", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL with any password, every query value but ``db`` and any fragment replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hosts}" if ":" in userinfo else f"{user}@{hosts}"
    query = "&".join(
        f"{name}={value if unquote(name).lower() == 'db' else '***'}" if sep else name
        for name, sep, value in (p.partition("=") for p in parts.query.split("&") if p)
    )
    if (netloc, query, parts.fragment) == (parts.netloc, parts.query, ""):
        return url
    shown = f"{parts.scheme}://{netloc}{parts.path}"  # not urlunsplit: it writes unix:///x as unix:/x
    return shown + (f"?{query}" if query else "") + ("#***" if parts.fragment else "")


def _secret_params(query: str) -> list[str]:
    """The query parameters that would carry a credential (names as given, decoded)."""
    return [name for name in parse_qs(query, keep_blank_values=True) if _SECRET_PARAM.search(name)]


@dataclass(frozen=True)
class RedisTarget:
    url: str  # redacted: the only form ever shown
    mode: Mode
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    path: str | None  # unix socket
    db: int
    service: str | None  # Sentinel's master name
    username: str | None


def parse_url(url: str) -> RedisTarget:
    shown = redact(url)
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError as e:
        raise RedisConfigError(f"--redis {shown}: {e}") from None
    scheme = parts.scheme.lower()
    mode = _SCHEMES.get(scheme)
    if mode is None:
        raise RedisConfigError(
            f"--redis {shown}: scheme must be one of redis://, rediss://, unix://, redis+sentinel://, redis+cluster://"
        )
    if password or parts.password is not None:
        raise RedisConfigError(
            f"--redis {shown}: a password in the URL would show in the process list and logs; "
            f"put it in {PASSWORD_ENV} instead (a user name may stay: redis://user@host:6379/0)"
        )
    secret = _secret_params(parts.query)
    if secret:
        raise RedisConfigError(
            f"--redis {shown}: query parameter {', '.join(secret)} would put a credential in the process list "
            f"and logs; put the password in {PASSWORD_ENV} instead (a user name goes before the host: "
            "redis://user@host:6379/0)"
        )
    username = unquote(parts.username) if parts.username else None
    query = parse_qs(parts.query)
    tls = scheme.startswith("rediss")
    if mode == "unix":
        if not parts.path:
            raise RedisConfigError(f"--redis {shown}: unix:// needs a socket path (unix:///run/redis.sock)")
        return RedisTarget(shown, mode, False, (), parts.path, _db(query.get("db", ["0"])[0], shown), None, username)
    hosts = tuple(_host(h, shown) for h in parts.netloc.rpartition("@")[2].split(",") if h)
    if not hosts:
        raise RedisConfigError(f"--redis {shown}: no host")
    segments = [s for s in parts.path.split("/") if s]
    service = None
    if mode == "sentinel":
        if not segments:
            raise RedisConfigError(f"--redis {shown}: name the service: redis+sentinel://host:26379/mymaster")
        service = segments.pop(0)
    if mode == "cluster" and segments and segments != ["0"]:
        raise RedisConfigError(f"--redis {shown}: a Redis Cluster has only database 0")
    db = _db(segments[0] if segments else query.get("db", ["0"])[0], shown)
    if len(hosts) > 1 and mode == "redis":
        raise RedisConfigError(f"--redis {shown}: several hosts need redis+sentinel:// or redis+cluster://")
    return RedisTarget(shown, mode, tls, hosts, None, db, service, username)


def _host(text: str, shown: str) -> tuple[str, int]:
    default = 26379 if "sentinel" in shown.split(":", 1)[0] else 6379
    host, sep, port = text.rpartition(":") if not text.endswith("]") else (text, "", "")
    if not sep:
        host, port = text, str(default)
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise RedisConfigError(f"--redis {shown}: {port!r} is not a port") from None
    if not host or not 0 < number < 65536:
        raise RedisConfigError(f"--redis {shown}: bad host:port {text!r}")
    return host, number


def _db(text: str, shown: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise RedisConfigError(f"--redis {shown}: database {text!r} is not a number") from None


def connect(target: RedisTarget, password: str | None, timeout: float) -> Any:
    """An asyncio client (hiredis parser when installed) for the target; connects lazily."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    common: dict[str, Any] = {
        "password": password,
        "username": target.username,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # No retries inside redis-py: a failed call fails now, and the breaker decides when to try again.
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if target.mode == "unix":
        from redis.asyncio import Redis

        return Redis(unix_socket_path=target.path, db=target.db, **common)
    if target.mode == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.hosts),
            sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout, "ssl": target.tls},
            ssl=target.tls,
            db=target.db,
            **common,
        )
        return sentinel.master_for(target.service or "mymaster")
    if target.mode == "cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in target.hosts],
            ssl=target.tls,
            **common,
        )
    from redis.asyncio import Redis

    host, port = target.hosts[0]
    return Redis(host=host, port=port, db=target.db, ssl=target.tls, **common)


class Observer(Protocol):
    """Where the breaker reports: the metrics."""

    def up(self, value: bool) -> None: ...

    def error(self, op: str) -> None: ...

    def latency(self, seconds: float) -> None: ...


class NullObserver:
    def up(self, value: bool) -> None:
        pass

    def error(self, op: str) -> None:
        pass

    def latency(self, seconds: float) -> None:
        pass

    def overrides(self, counts: dict[str, int]) -> None:
        pass

    def rate_limited(self, rule: str, by: str) -> None:
        pass

    def audit_dropped(self, reason: str, n: int) -> None:
        pass

    def budget_fallback(self, rule: str, what: str) -> None:
        pass

    def budget_refused(self, rule: str, kind: str) -> None:
        pass


class Breaker:
    """Closed: calls go through. Open after ``threshold`` failures in a row: calls fail at once
    until ``retry_at``, when one call is let through as a probe; back-off doubles to ``max_backoff``."""

    def __init__(
        self,
        timeout: float,
        observer: Observer | None = None,
        threshold: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 5.0,
        name: str = "Redis",
    ) -> None:
        self.name = name  # how the log names it: "Redis <redacted URL>"
        self.timeout = timeout
        self.observer: Observer = observer or NullObserver()
        self.threshold = threshold
        self.base_backoff = backoff
        self.max_backoff = max_backoff
        self.failures = 0
        self.backoff = backoff
        self.retry_at = 0.0
        self.up: bool | None = None  # unknown until the first call
        self.last_error: str | None = None
        self.opened_at: float | None = None  # monotonic; None while closed
        self._probing = False

    @property
    def open(self) -> bool:
        return self.failures >= self.threshold

    async def call(self, op: str, fn: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        now = time.monotonic()
        if self.open and (now < self.retry_at or self._probing):
            raise RedisUnavailable(f"Redis unavailable ({self.last_error}); next probe in {self.retry_at - now:.1f}s")
        probing = self.open
        self._probing = probing
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout or self.timeout):
                result = await fn()
        except Exception as e:
            self._failed(op, e)
            raise RedisUnavailable(self.last_error) from None
        finally:
            if probing:
                self._probing = False
        self.observer.latency(time.perf_counter() - started)
        if self.failures or self.up is not True:
            if self.opened_at is not None:
                log.warning(
                    "%s answers again after %.1fs unavailable: shared overrides, rate limits and the audit "
                    "stream are back", self.name, time.monotonic() - self.opened_at,
                )  # fmt: skip
                self.opened_at = None
            self.failures, self.backoff, self.up = 0, self.base_backoff, True
            self.last_error = None
            self.observer.up(True)
        return result

    def _failed(self, op: str, e: BaseException) -> None:
        self.failures += 1
        self.last_error = describe_error(e)
        self.observer.error(op)
        if self.up is not False:
            self.up = False
            self.observer.up(False)
        if self.open:
            if self.opened_at is None:  # this failure opened it: said once, not per failed call or probe
                self.opened_at = time.monotonic()
                log.warning(
                    "%s unavailable after %d failed calls (%s): requests are decided by the last copy of the "
                    "overrides and the policy; rate limits follow redis.on_error; audit entries are dropped; "
                    "retrying in the background", self.name, self.failures, self.last_error,
                )  # fmt: skip
            self.retry_at = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, self.max_backoff)


def describe_error(e: BaseException) -> str:
    """What went wrong, without anything the exception might carry from the URL."""
    text = str(e) or type(e).__name__
    name = type(e).__name__
    if isinstance(e, TimeoutError):
        return "timed out"
    if "AUTH" in text.upper() or "password" in text.lower() or "NOAUTH" in text or "WRONGPASS" in text:
        return f"{name}: authentication failed (check {PASSWORD_ENV})"
    return f"{name}: {redact(text)[:200]}"
