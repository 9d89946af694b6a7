"""``--rules N``: the bench policy behind N generated one-CIDR deny rules, and how long it takes to load.

Operators write per-customer and per-network rules, not one CIDR set, so the
generated rules come *before* the bench policy's own: every request of the
rotation is asked about all of them before ``supported`` decides, which is
what the rule index (gateway/policy/index.py) makes free. None of them holds a
rotation address: /32 blocks from 198.18.0.0/15 (RFC 2544's benchmarking
range, 131,072 of them), then /128 blocks from 2001:db8::/32 (documentation).
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any

from .common import POLICY, ROTATION, BenchError

_V4_BASE = int(ipaddress.IPv4Address("198.18.0.0"))
_V4_COUNT = 1 << 17
_V6_BASE = int(ipaddress.IPv6Address("2001:db8::"))
_RANGES = (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:db8::/32"))


def block(i: int) -> str:
    """The i-th generated block: never one that holds a rotation address."""
    if i < _V4_COUNT:
        return f"{ipaddress.IPv4Address(_V4_BASE + i)}/32"
    return f"{ipaddress.IPv6Address(_V6_BASE + i)}/128"


def generated_policy(count: int) -> str:
    """bench/policy.yaml with ``count`` one-CIDR deny rules in front of its own rules."""
    text = POLICY.read_text(encoding="utf-8")
    head, marker, rest = text.partition("\nrules:\n")
    if not marker:
        raise BenchError(f"{POLICY}: no 'rules:' list to put the generated rules in front of")
    generated = "".join(f"  - {{name: block-{i}, cidrs: [{block(i)}], action: deny}}\n" for i in range(count))
    return f"{head}{marker}{generated}{rest}"


def write_policy(workdir: Path, count: int) -> Path:
    for address in ROTATION:
        ip = ipaddress.ip_address(address)
        if any(net.version == ip.version and ip in net for net in _RANGES):
            raise BenchError(f"--rules: the generated blocks would hold the rotation address {address}")
    path = workdir / f"policy-{count}-rules.yaml"
    path.write_text(generated_policy(count), encoding="utf-8")
    return path


def measure_load(path: Path) -> dict[str, Any]:
    """Load (read, YAML, schema, compile, the rule index) in this process, the CPU time it took;
    the gateway does the same at start and on every reload."""
    from gateway.policy import load_policy
    from gateway.yamlfile import FileError

    started = time.process_time()
    try:
        policy = load_policy(str(path))
    except FileError as e:
        raise BenchError(f"the generated policy does not load: {str(e).splitlines()[0]}") from None
    return {
        "rules": len(policy.rules),
        "file_bytes": path.stat().st_size,
        "load_cpu_s": round(time.process_time() - started, 3),
    }
