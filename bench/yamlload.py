#!/usr/bin/env python3
"""``python bench/yamlload.py [N ...]``: a generated policy's load time, YAML's fast path beside the pure one.

For each N (default 1,000, 10,000, 100,000), the bench policy behind N one-CIDR
deny rules (bench/rules.py) is read by ``gateway.yamlfile.load`` (libyaml's
events) and by ``load_pure`` (PyYAML's pure-Python composer, the loader before
the fast path, its bounds lifted so it can finish), then loaded whole by
``load_policy`` (YAML, schema, compile, the rule index), as the gateway does at
start and on reload. CPU time (process_time); only the ratios in one run mean
much on a shared machine. The pure path is skipped above ``--pure-max`` rules
(default 10,000): at 100,000 it needs minutes and about 800 bytes a value.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rules import generated_policy, measure_load
from gateway import yamlfile


def cpu_s(fn: object, *args: object) -> float:
    started = time.process_time()
    fn(*args)  # type: ignore[operator]
    return time.process_time() - started


def main(argv: list[str]) -> int:
    pure_max = 10_000
    if "--pure-max" in argv:
        at = argv.index("--pure-max")
        pure_max = int(argv[at + 1])
        argv = argv[:at] + argv[at + 2 :]
    counts = [int(a) for a in argv] or [1_000, 10_000, 100_000]
    print("| generated rules | bytes | YAML pure s | YAML fast s | pure ÷ fast | whole load (fast) s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in counts:
        text = generated_policy(n)
        fast = cpu_s(yamlfile.load, text, "generated.yaml")
        pure = "not run"
        ratio = ""
        if n <= pure_max:
            with mock.patch.object(yamlfile, "MAX_NODES", 1 << 40), mock.patch.object(yamlfile, "MAX_BYTES", 1 << 40):
                seconds = cpu_s(yamlfile.load_pure, text, "generated.yaml")
            pure, ratio = f"{seconds:.2f}", f"{seconds / fast:.1f}"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "policy.yaml"
            path.write_text(text, encoding="utf-8")
            whole = measure_load(path)["load_cpu_s"]
        print(f"| {n:,} | {len(text.encode()):,} | {pure} | {fast:.2f} | {ratio} | {whole:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
