"""``bench/calls.py`` counts what it says: the request path's calls per request, in this process.

The gateway's own counts are exact, so the test pins what the request path promises per request rather than
how long it takes: one ``handle``, one ``Exchange``, one record written; the body read and
renamed only where the route needs it (three requests in four: the fourth is refused by country
before its body matters).
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

from support.processes import ROOT


def bench_calls() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_calls", ROOT / "bench" / "calls.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("policy", "read"), [("plain", 0.0), ("route", 0.75)])
def test_each_request_is_handled_and_recorded_once(policy: str, read: float) -> None:
    counts = bench_calls().count(ROOT, policy, 40)
    assert counts["gateway/proxy/path.py:handle"] == 1.0
    assert counts["gateway/proxy/exchange.py:__init__"] == 1.0
    assert counts["gateway/proxy/record.py:write"] == 1.0
    assert counts.get("gateway/modelfield.py:read_model", 0.0) == read
    assert counts.get("gateway/modelfield.py:rename", 0.0) == read


def test_the_same_code_gives_the_same_count_of_the_gateways_own_calls() -> None:
    calls = bench_calls()
    first, second = (calls.count(ROOT, "route", 40) for _ in range(2))
    own = sorted(name for name in first.keys() | second.keys() if name.startswith("gateway/"))
    assert len(own) > 50
    assert [first.get(name) for name in own] == [second.get(name) for name in own]
