"""The benchmark still runs: a short pass of bench/run.py (figures are not judged here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.processes import ROOT


@pytest.mark.skipif(not (shutil.which("nginx") and shutil.which("wrk")), reason="nginx and wrk come from scripts/test")
def test_benchmark_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["sanity_ok"] is True and not data["problems"]
    for target in data["targets"].values():
        assert target["throughput"]["rps"] > 0 and target["latency"]["latency_ms"]["p50"] > 0
