#!/usr/bin/env python3
"""``python bench/decide.py [N ...]``: decide() in-process with N generated rules, beside the ordered walk.

For each N (default 0, 1,000, 10,000), the bench policy behind N one-CIDR deny
rules (bench/rules.py) is compiled from its schema (YAML left out: its own time
is printed apart, where the file is within the loader's bounds), then the four
rotation addresses are decided again and again, by ``decide()`` (the rule index)
and by ``decide_in_order()`` (each rule in turn), in the same run. CPU time
(process_time), so a busy machine moves the figures less than wall time; only
the ratios between rows of one run mean much.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from bench.common import ROTATION
from bench.rules import generated_policy
from gateway.clientip import PUBLIC, ClientAddress
from gateway.geo import GeoFacts
from gateway.policy import PolicySpec, compile_policy, decide
from gateway.policy.decide import decide_in_order
from gateway.yamlfile import Document, FileError
from gateway.yamlfile import _Loader as yaml_loader
from gateway.yamlfile import load as load_yaml

# What the test City and ASN databases say about the rotation (bench/xff.lua's addresses).
FACTS = {
    "2.125.160.216": GeoFacts(country="GB", registered_country="GB", subdivisions=("GB-ENG",)),
    "89.160.20.112": GeoFacts(country="SE", registered_country="SE", subdivisions=("SE-E",), asn=29518),
    "216.160.83.56": GeoFacts(country="US", registered_country="US", subdivisions=("US-WA",), asn=209),
    "175.16.199.1": GeoFacts(country="CN", registered_country="CN", subdivisions=("CN-22",)),
}
PATH = "/v1/chat/completions"


class _FastLoader(yaml.CSafeLoader):
    """libyaml, with the gateway's YAML 1.2 booleans (``NO`` stays Norway)."""


_FastLoader.yaml_implicit_resolvers = yaml_loader.yaml_implicit_resolvers


def per_call_us(fn: object, policy: object, budget_s: float) -> float:
    requests = [(ClientAddress(ipaddress.ip_address(a), PUBLIC, "peer", a), FACTS[a]) for a in ROTATION]
    calls = 0
    started = time.process_time()
    while time.process_time() - started < budget_s:
        for client, facts in requests:
            fn(policy, client, facts, PATH)  # type: ignore[operator]
        calls += len(requests)
    return (time.process_time() - started) / calls * 1e6


def main(argv: list[str]) -> int:
    counts = [int(a) for a in argv] or [0, 1000, 10000]
    print("| generated rules | YAML s | schema + compile s | decide() µs | in order µs | in order ÷ decide() |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in counts:
        text = generated_policy(n)
        started = time.process_time()
        try:
            doc = load_yaml(text, "generated.yaml")
            yaml_s = f"{time.process_time() - started:.2f}"
        except FileError as e:  # past the loader's bounds: compile from plain YAML instead
            yaml_s = f"refused ({str(e).split(': ', 2)[-1][:40]})"
            doc = Document("generated.yaml", yaml.load(text, Loader=_FastLoader), {})
        started = time.process_time()
        policy = compile_policy(PolicySpec.model_validate(doc.data), doc, None)
        compile_s = time.process_time() - started
        fast = per_call_us(decide, policy, 1.0)
        slow = per_call_us(decide_in_order, policy, 1.0)
        print(f"| {n:,} | {yaml_s} | {compile_s:.2f} | {fast:.2f} | {slow:,.2f} | {slow / fast:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
