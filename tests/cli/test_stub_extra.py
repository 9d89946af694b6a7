"""``regiongate stub`` without aiohttp (the optional ``stub`` extra): one line naming the extra, exit 2."""

from __future__ import annotations

import sys

import pytest

from gateway.cli import main


def test_stub_without_aiohttp_names_the_extra_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # None in sys.modules makes every import of aiohttp fail as a missing module does.
    for name in [m for m in sys.modules if m == "aiohttp" or m.startswith("aiohttp.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "aiohttp", None)
    monkeypatch.delitem(sys.modules, "gateway.stub", raising=False)
    assert main(["stub", "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "regiongate: the stub needs aiohttp, which is not installed: pip install 'regiongate[stub]'\n"
