"""The suite's tiers, and how it runs in parallel; the fixtures live in ``support.processes``.

A test is ``e2e`` when it runs a real process or an external server: it lives in ``tests/e2e/`` or
``tests/deploy/``, or uses a fixture that starts one (``E2E_FIXTURES``), or its module says
``pytestmark = pytest.mark.e2e``. Everything else is the fast tier (``scripts/test-fast``, that is
``pytest -m "not e2e"``): in-process, and a fast-tier test that starts a process fails, so the tier
stays what it says.

Under pytest-xdist (``scripts/test`` runs ``-n 2 --dist loadgroup``) the tests of a module that
shares a module-scoped fixture (a built image, a Redis server, GeoIP files) run on one worker, so the
fixture is built once; every worker has its own block of loopback ports (``support.processes``).

Hypothesis runs without its per-example deadline and its too-slow health check everywhere: both are
timing thresholds, which belong in benchmarks, and on a loaded 2-core machine they failed property
tests whose properties held (a 284 ms example against the 200 ms default deadline).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Generator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("regiongate", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("regiongate")

pytest_plugins = ["support.processes"]

E2E_DIRS = ("e2e", "deploy")
# Fixtures that start a process or an external server (the closure of a test's fixtures is looked at,
# so a fixture built on one of these counts too).
E2E_FIXTURES = frozenset(
    {
        "stub",
        "gateway",
        "redis_server",
        "own_redis",
        "redis_cluster",
        "sentinel",
        "failover",
        "image",
        "runtime",
        "prometheus_for",
        "gateway_behind_nginx",
    }
)
TESTS = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: runs a real process or an external server (not in the fast tier)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        top = item.path.relative_to(TESTS).parts[0] if item.path.is_relative_to(TESTS) else ""
        if top in E2E_DIRS or E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("xdist_group") is None and _uses_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.path.relative_to(TESTS).as_posix()))


def _uses_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs)


def _refuse(what: str, nodeid: str) -> Callable[..., object]:
    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError(f"{nodeid}: a fast-tier test {what}; mark it e2e (tests/conftest.py)")

    return refuse


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    with _processes_refused(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    with _processes_refused(item):
        return (yield)


class _processes_refused:
    """Outside ``e2e``, starting a process (``subprocess``, asyncio's subprocesses, ``os.fork``) fails."""

    def __init__(self, item: pytest.Item) -> None:
        self.active = item.get_closest_marker("e2e") is None
        self.patch = pytest.MonkeyPatch()
        self.nodeid = item.nodeid

    def __enter__(self) -> None:
        if self.active:
            self.patch.setattr(subprocess.Popen, "_execute_child", _refuse("started a subprocess", self.nodeid))
            self.patch.setattr(os, "fork", _refuse("forked", self.nodeid))

    def __exit__(self, *exc: object) -> None:
        self.patch.undo()
