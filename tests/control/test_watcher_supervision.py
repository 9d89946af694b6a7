"""A candidate that raises is a refused reload, and a file watcher that dies is started again.

Whatever judging one candidate raises (``MemoryError``, ``RecursionError``, a
bug) refuses that candidate, is counted, logged and shown in ``/readyz``, and
the next edit is judged as usual. Whatever kills the watcher is logged,
counted, shown in ``/readyz`` while it is down, and the watcher comes back and
catches up. In process, by making the loader and the watcher raise; and for
real, with a policy nested deeper than the interpreter can parse.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.live import reload as live_reload
from gateway.live import watch
from gateway.live.reload import Live
from gateway.metrics import Metrics
from gateway.runtime import Settings, WatcherStatus, load_runtime
from support.live import TRUST, ask, get_json, policy, sha, tag, wait_until, write_by_rename
from support.processes import CITY, GatewayFactory, Stub


def live_for(path: Path) -> Live:
    runtime = load_runtime(Settings(policy=str(path), upstream="http://127.0.0.1:9", access_log="off"))
    return Live(runtime, Metrics(CollectorRegistry()))


def counted(live: Live, name: str, **labels: str) -> float:
    value = live.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def raising(error: BaseException) -> Callable[..., Any]:
    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise error

    return fail


@pytest.mark.parametrize(
    "error",
    [MemoryError(), RecursionError("maximum recursion depth exceeded"), ZeroDivisionError("a bug"), KeyError("k")],
    ids=["MemoryError", "RecursionError", "a-bug", "KeyError"],
)
def test_a_candidate_whose_loader_raises_is_refused_and_the_next_edit_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: BaseException
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy("allow", "good"))
    live = live_for(path)
    first = live.runtime.active.current.sha256

    async def scenario() -> None:
        path.write_text(policy("deny", "raises"))
        with monkeypatch.context() as m:
            m.setattr(live_reload, "compile_policy_text", raising(error))
            [result] = await live.reload(explicit=False)
        assert (result.ok, result.changed) == (False, False)
        assert type(error).__name__ in (result.error or "")
        assert live.runtime.active.current.sha256 == first  # the old policy serves
        status = live.runtime.describe()
        assert type(error).__name__ in status["policy"]["reload"]["error"]
        assert any(w.startswith("policy reload refused, still serving") for w in status["warnings"])
        assert counted(live, "regiongate_policy_reloads_total", result="error", role="policy") == 1

        path.write_text(policy("deny", "fixed"))
        [result] = await live.reload(explicit=False)
        assert (result.ok, result.changed) == (True, True), result
        assert live.runtime.describe()["policy"]["reload"]["error"] is None

    with caplog.at_level(logging.ERROR, logger="regiongate"):
        asyncio.run(scenario())
    assert any("judging the candidate failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert any("reload refused" in r.getMessage() for r in caplog.records)


def test_a_geoip_candidate_whose_opening_raises_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    db = tmp_path / "City.mmdb"
    shutil.copy(CITY, db)
    path = tmp_path / "policy.yaml"
    path.write_text(policy("allow", "good"))
    runtime = load_runtime(
        Settings(policy=str(path), geoip=(str(db),), upstream="http://127.0.0.1:9", access_log="off")
    )
    live = Live(runtime, Metrics(CollectorRegistry()))
    replacement = tmp_path / "new.mmdb"
    shutil.copy(CITY, replacement)
    replacement.replace(db)  # a new inode: a candidate
    monkeypatch.setattr(runtime.geo, "open_replacement", raising(MemoryError()))
    asyncio.run(live.reload(explicit=False))
    assert "MemoryError" in runtime.geo_errors[str(db)]
    assert any(w.startswith("GeoIP reload refused") for w in runtime.describe()["warnings"])


class Flaky:
    """Makes one of Live's methods raise ``error`` the first ``times`` calls, then behave."""

    def __init__(self, live: Live, name: str, error: BaseException, times: int = 1) -> None:
        self.original = getattr(live, name)
        self.error = error
        self.left = times
        setattr(live, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.left:
            self.left -= 1
            raise self.error
        return self.original(*args, **kwargs)


@pytest.mark.parametrize(
    "where, error",
    [
        ("watched_paths", MemoryError()),  # before the watch is set up
        ("watched_paths", ZeroDivisionError("a bug")),
        ("reload", RecursionError("maximum recursion depth exceeded")),  # inside the watch loop
        ("reload", OSError(24, "Too many open files")),
    ],
    ids=["setup-MemoryError", "setup-bug", "loop-RecursionError", "loop-OSError"],
)
def test_a_watcher_that_dies_is_restarted_counted_logged_and_catches_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str, error: BaseException
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy("allow", "good"))
    live = live_for(path)
    status = live.runtime.watcher
    flaky = Flaky(live, where, error, times=1)
    edited = policy("deny", "edited")

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(watch.supervise(live, stop, first_delay=0))
        if where == "reload":  # the first check raises; the edit is made after it
            while flaky.left:
                await asyncio.sleep(0.01)
        write_by_rename(path, edited)
        deadline = time.monotonic() + 30  # bounds a broken watcher only
        while live.runtime.active.current.policy.spec.revision != "edited":
            assert time.monotonic() < deadline, "the restarted watcher never loaded the edit"
            await asyncio.sleep(0.02)
        stop.set()
        await task

    with caplog.at_level(logging.ERROR, logger="regiongate"):
        asyncio.run(scenario())
    assert status.restarts == 1
    assert status.last_error is not None and status.last_error.startswith(type(error).__name__)
    assert counted(live, "regiongate_file_watcher_restarts_total") == 1
    failures = [r for r in caplog.records if "the file watcher failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert not any("cannot watch files with inotify" in r.getMessage() for r in caplog.records)
    assert live.runtime.describe()["watcher"]["restarts"] == 1


def test_readyz_says_the_watcher_is_down_while_it_is() -> None:
    down = WatcherStatus(enabled=True, running=False, restarts=3, last_error="MemoryError", failed_at=1.0)
    assert down.warning() is not None and "MemoryError" in down.warning()  # type: ignore[operator]
    assert WatcherStatus(enabled=True, running=True, restarts=3, last_error="MemoryError").warning() is None
    assert WatcherStatus(enabled=False).warning() is None
    assert WatcherStatus(enabled=True, running=False).warning() is None  # not started yet is not a failure


def test_readyz_of_a_running_gateway_describes_its_watcher(gateway: GatewayFactory, stub: Stub) -> None:
    watched = gateway("--upstream", stub.url)
    _, ready = get_json(watched.admin + "/readyz")
    assert ready["watcher"] == {
        "enabled": True,
        "running": True,
        "restarts": 0,
        "last_error": None,
        "failed_at": None,
    }
    unwatched = gateway("--upstream", stub.url, "--no-watch")
    _, ready = get_json(unwatched.admin + "/readyz")
    assert ready["watcher"]["enabled"] is False


def test_a_policy_nested_too_deep_to_parse_is_refused_and_the_next_edit_loads(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path
) -> None:
    """Real files, a real watcher: 20,000 nested lists raise RecursionError in the parser (or, with the
    loader's own depth cap, a file:line problem); either way a refused reload, not a dead watcher."""
    good, fixed = policy("allow", "good"), policy("deny", "fixed")
    deep = good.replace("version: 1\n", "metadata: " + "[" * 20000 + "]" * 20000 + "\nversion: 1\n")
    path = tmp_path / "policy.yaml"
    path.write_text(good)
    gw = gateway("--policy", str(path), "--geoip", CITY, "--upstream", stub.url, *TRUST)

    write_by_rename(path, deep)
    _, ready = wait_until(
        lambda: (r := get_json(gw.admin + "/readyz"))[1]["policy"]["reload"]["error"] and r, "the refusal reported"
    )
    assert ready["policy"]["sha256"] == sha(good)
    assert ready["watcher"]["running"] is True and ready["watcher"]["restarts"] == 0
    assert ask(gw.url) == (200, tag(good))

    write_by_rename(path, fixed)
    wait_until(lambda: ask(gw.url) == (403, tag(fixed)), "the next edit serving")
    assert "cannot watch files with inotify" not in gw.stderr()
