"""The parsers' fuzz targets (``support.fuzz_targets``), in a short fixed pass.

The long pass is ``python -m tests.support.fuzz``.

Two parts: every committed seed (``tests/fuzz_corpus/``, which is where an input
that once broke an invariant goes) replayed in this process, and a few thousand
coverage-guided inputs per target under atheris, from a fixed seed, in a child
process. Both are bounded by a number of inputs, never by time.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from support.fuzz import NAMES, ROOT, seed_inputs
from support.fuzz_targets import TARGETS


def test_the_runner_knows_every_target() -> None:
    assert sorted(NAMES) == sorted(TARGETS)


@pytest.mark.parametrize("name", NAMES)
def test_every_seed_keeps_its_invariants(name: str) -> None:
    target = TARGETS[name][0]
    seeds = seed_inputs(name)
    assert len(seeds) >= 5
    for data in seeds:
        target(data)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.e2e
def test_a_short_coverage_guided_pass_keeps_every_invariant(name: str, tmp_path: Path) -> None:
    runs = TARGETS[name][1]
    args = ["--target", name, "--runs", str(runs), "--seed", "1"]
    args += ["--corpus-dir", str(tmp_path / "corpus"), "--artifacts", str(tmp_path / "artifacts")]
    r = subprocess.run(
        [sys.executable, "-m", "tests.support.fuzz", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    found = sorted(p.name for p in (tmp_path / "artifacts").glob("*"))
    assert r.returncode == 0 and not found, (found, r.stderr[-3000:])
    if importlib.util.find_spec("atheris") is not None:  # else Hypothesis ran the target instead
        assert f"Done {runs} runs" in r.stderr, r.stderr[-2000:]
