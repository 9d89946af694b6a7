#!/usr/bin/env python3
"""``python bench/run.py``: benchmark the gateway (the bench package's docstring says what a run does).

Run as a script from anywhere: the repository root goes on sys.path so that ``bench`` imports as
a package, whose modules are the parts of the run.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import yaml  # noqa: F401  (bench/policy.py reads the policy with it)
except ImportError:  # pragma: no cover - depends on the interpreter used
    sys.exit("bench/run.py: PyYAML is missing; run it with the project's Python (pip install -e .)")

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
