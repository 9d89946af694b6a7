"""Judging a candidate file and swapping it in, or refusing it and saying why.

A policy candidate goes through what startup does (parse, schema, compile
against the loaded databases, upstreams and their keys) plus its own
``tests:``; only then does one assignment of ``runtime.active`` put it in
force. A GeoIP candidate is opened in a thread (the verification decode
takes a while), checked against the file it replaces, and swapped between
requests. Whatever is refused leaves the running state untouched and is
reported once per distinct bad file: log, ``/readyz``, metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..geo import GeoDataError, file_identity
from ..policy import run_tests
from ..proxy.upstreams import UpstreamGroup
from ..reports import PolicyFileResult
from ..runtime import (
    ConfigError,
    ReloadStatus,
    Runtime,
    compile_policy_text,
    read_policy_text,
    resolve_upstreams,
)
from . import inforce
from .active import Active, PolicyVersion

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger("regiongate")


class RetiresUpstreams(Protocol):
    """What a reload asks of the proxy's request path (``gateway.proxy.Gateway``): close pools no longer configured."""

    def retire_upstreams(self, old: Mapping[str, UpstreamGroup], new: Mapping[str, UpstreamGroup]) -> None: ...


Role = Literal["policy", "shadow"]
# The old reader may still be referenced by code outside the request path
# (explain, the admin API); lookups on the request path are synchronous and
# done with it by the time the swap returns.
_CLOSE_OLD_READER_AFTER = 10.0


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The outcome of one attempt for one file; what ``POST /admin/reload`` returns."""

    role: Role
    path: str
    ok: bool
    changed: bool
    sha256: str  # the one in force after the attempt
    version: str
    error: str | None = None
    candidate_sha256: str | None = None

    def report(self) -> PolicyFileResult:
        """What ``POST /admin/reload`` says of this file."""
        return PolicyFileResult(
            ok=self.ok,
            changed=self.changed,
            path=self.path,
            sha256=self.sha256,
            version=self.version,
            error=self.error,
            candidate_sha256=self.candidate_sha256,
        )


def _read(path: str) -> tuple[str, str]:
    text = read_policy_text(path)
    return text, hashlib.sha256(text.encode()).hexdigest()


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class Live:
    """One worker's reloader. Every worker has its own; they converge because they read the same files."""

    def __init__(
        self,
        runtime: Runtime,
        metrics: Metrics,
        gateway: RetiresUpstreams | None = None,
        *,
        report: bool = True,
        supervisor: int | None = None,
    ) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.gateway = gateway
        self.report = report  # with several workers, one of them logs, so a bad file is logged once
        self.supervisor = supervisor
        self._lock = asyncio.Lock()
        self._refused_geo: dict[str, tuple[int, ...]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._trigger = "start"

    # --- what is watched ----------------------------------------------------------

    def policy_paths(self) -> dict[Role, str]:
        out: dict[Role, str] = {"policy": self.runtime.policy_path}
        if self.runtime.settings.shadow_policy:
            out["shadow"] = self.runtime.settings.shadow_policy
        return out

    def watched_paths(self) -> list[str]:
        return [*self.policy_paths().values(), *self.runtime.geo.paths]

    # --- entry points -------------------------------------------------------------

    async def reload(self, *, explicit: bool = True, trigger: str = "watch") -> list[ReloadResult]:
        """Check every watched file and load what changed. Used by the watcher, SIGHUP and the admin API.

        ``explicit`` (SIGHUP, admin) re-judges a file even if it was refused
        before; the watcher does not, so one bad file is reported once.
        """
        async with self._lock:
            self._trigger = trigger  # what the audit chain says put a swapped file in force
            results = [await self._policy(role, path, explicit) for role, path in self.policy_paths().items()]
            for path in self.runtime.geo.paths:
                await self._geo(path, explicit)
        return results

    async def admin_reload(self) -> list[ReloadResult]:
        """``POST /admin/reload``: this worker now, the others through the supervisor's SIGHUP."""
        results = await self.reload(explicit=True, trigger="admin")
        if self.supervisor is not None and os.getppid() == self.supervisor:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.supervisor, signal.SIGHUP)
        return results

    def on_sighup(self) -> None:
        self.spawn(self.reload(explicit=True, trigger="sighup"))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- policies -----------------------------------------------------------------

    async def _policy(self, role: Role, path: str, explicit: bool) -> ReloadResult:
        rt = self.runtime
        status = rt.policy_status if role == "policy" else rt.shadow_status
        running = rt.active.current if role == "policy" else rt.active.shadow_version
        assert running is not None

        def result(ok: bool, changed: bool, error: str | None = None, candidate: str | None = None) -> ReloadResult:
            now = rt.active.current if role == "policy" else rt.active.shadow_version
            assert now is not None
            return ReloadResult(role, path, ok, changed, now.sha256, now.version, error, candidate)

        sha: str | None = None
        try:
            # Read and hashed off the loop too: a candidate may be large.
            text, sha = await asyncio.to_thread(_read, path)
            if sha == running.sha256:
                status.error = status.refused_sha256 = None  # back to what is serving
                return result(True, False)
            if sha == status.refused_sha256 and not explicit:
                return result(False, False, status.error, sha)
            candidate, upstreams = await self._judge(role, text, path)
        except ConfigError as e:
            return self._refuse(role, status, sha, str(e), result)
        except Exception as e:  # MemoryError, RecursionError, a bug: this candidate is refused, the next one judged
            log.error("%s %s: judging the candidate failed", role, path, exc_info=e)
            return self._refuse(role, status, sha, f"{path}: cannot load this candidate: {_describe(e)}", result)
        self._swap(role, candidate, upstreams)
        inforce.record_policy(rt, role, candidate, path, self._trigger)
        status.attempted_at = time.time()
        status.error = status.refused_sha256 = None
        self.metrics.policy_reload(role, "ok")
        log.info("%s %s reloaded: sha256:%s version %s", role, path, candidate.tag, candidate.version)
        for w in candidate.policy.warnings:  # loaded, but likely not meant: as `regiongate check` says it
            log.warning("%s: %s", f"{path}:{w.line}" if w.line is not None else path, w.message)
        return result(True, True, None, sha)

    async def _judge(
        self, role: Role, text: str, path: str
    ) -> tuple[PolicyVersion, Mapping[str, UpstreamGroup] | None]:
        rt = self.runtime
        # Compiling a long policy takes milliseconds and touches nothing shared: off the loop.
        # The tests look addresses up in the shared geo cache: on it.
        candidate = await asyncio.to_thread(compile_policy_text, text, path, rt.geo)
        failed = [r for r in run_tests(candidate.policy, rt.geo) if not r.passed]
        if failed:
            where = [f"{path}:{r.line}" if r.line else path for r in failed]
            raise ConfigError(
                "\n".join(
                    f"{w}: test {r.test.ip} {r.test.path}: {r.problem}" for w, r in zip(where, failed, strict=True)
                )
            )
        upstreams = resolve_upstreams(candidate.policy, rt.settings, rt.env) if role == "policy" else None
        return candidate, upstreams

    def _swap(self, role: Role, candidate: PolicyVersion, upstreams: Mapping[str, UpstreamGroup] | None) -> None:
        rt = self.runtime
        old = rt.active
        if role == "policy":
            assert upstreams is not None
            rt.active = Active(candidate, upstreams, old.shadow_version)  # the one assignment requests see
            self.metrics.policy_swapped(old.current, candidate)
            self._retire_removed_upstreams(old.upstreams, upstreams)
        else:
            rt.active = Active(old.current, old.upstreams, candidate)
            self.metrics.shadow_swapped(old.shadow_version, candidate)

    def _refuse(
        self,
        role: Role,
        status: ReloadStatus,
        sha: str | None,
        error: str,
        result: Callable[..., ReloadResult],
    ) -> ReloadResult:
        already = sha == status.refused_sha256 and error == status.error
        status.attempted_at = time.time()
        status.error, status.refused_sha256 = error, sha
        self.metrics.policy_reload(role, "error")
        if self.report and not already:
            serving = self.runtime.active.current if role == "policy" else self.runtime.active.shadow_version
            tag = serving.tag if serving else "-"
            log.error("%s reload refused, still serving sha256:%s:\n%s", role, tag, error)
        return result(False, False, error, sha)

    def _retire_removed_upstreams(self, old: Mapping[str, UpstreamGroup], new: Mapping[str, UpstreamGroup]) -> None:
        """Connections to upstreams no longer configured close once their requests end (the data plane's job)."""
        if self.gateway is not None:
            self.gateway.retire_upstreams(old, new)

    # --- GeoIP files ----------------------------------------------------------------

    async def _geo(self, path: str, explicit: bool) -> None:
        geo = self.runtime.geo
        if not geo.replaced(path):
            return
        identity = file_identity(path)
        if not identity:
            return  # gone for the moment (between unlink and rename): the next event brings it
        if self._refused_geo.get(path) == identity and not explicit:
            return
        try:
            new = await asyncio.to_thread(geo.open_replacement, path)
        except Exception as e:  # GeoDataError, or anything unexpected: refused all the same
            if not isinstance(e, GeoDataError):
                log.error("GeoIP %s: opening the candidate failed", path, exc_info=e)
                e = GeoDataError(f"{path}: cannot load this candidate: {_describe(e)}")
            again = self._refused_geo.get(path) == identity
            self._refused_geo[path] = identity
            self.runtime.geo_errors[path] = str(e)
            self.metrics.geoip_reload(next(s.type for s in geo.sources if s.path == path), "error")
            if self.report and not again:
                log.error("GeoIP reload refused, old data still serving: %s", e)
            return
        old = geo.swap(new)
        self._refused_geo.pop(path, None)
        self.runtime.geo_errors.pop(path, None)
        self.metrics.geoip_swapped(old.info, new.info)
        self.metrics.geoip_reload(new.info.type, "ok")
        self.spawn(inforce.record_geoip(self.runtime, new.info, self._trigger))
        asyncio.get_running_loop().call_later(_CLOSE_OLD_READER_AFTER, old.reader.close)
        log.info("GeoIP %s reloaded: %s build_epoch %d", path, new.info.type, new.info.build_epoch)
