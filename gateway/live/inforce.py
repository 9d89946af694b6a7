"""What is in force, written to the audit chain: the policy and GeoIP databases, at start and at every swap.

An auditor asks months later which rules and which data decided a
request. Each worker records, in its own chain: the policy (and shadow
policy) it serves, with sha256, version, path, when it was loaded and what
triggered it (``start``, ``watch``, ``admin``, ``sighup``), the policy's
full text stored once per sha256 beside the stream; and each GeoIP
database, with its type, build date and the sha256 of its file (hashed in
a thread: a City database is 60+ MB). Without ``--redis`` (audit off)
every call here is a no-op.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import TYPE_CHECKING, Any

from ..geo import SourceInfo
from ..shared.audit import now_iso
from .active import PolicyVersion

if TYPE_CHECKING:
    from ..runtime import Runtime

TRIGGERS = ("start", "watch", "admin", "sighup")


def policy_entry(role: str, version: PolicyVersion, path: str, trigger: str) -> dict[str, Any]:
    return {
        "kind": "policy",
        "time": now_iso(),
        "role": role,
        "sha256": version.sha256,
        "version": version.version,
        "path": path,
        "loaded_at": now_iso(version.loaded_at),
        "trigger": trigger,
    }


def geoip_entry(info: SourceInfo, sha256: str, trigger: str) -> dict[str, Any]:
    return {
        "kind": "geoip",
        "time": now_iso(),
        "path": info.path or "",
        "type": info.type,
        "build": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.build_epoch)) if info.build_epoch else None,
        "sha256": sha256,
        "trigger": trigger,
    }


def record_policy(runtime: Runtime, role: str, version: PolicyVersion, path: str, trigger: str) -> None:
    """One policy put in force; the subdivisions its rules name become the hourly counts' subdivisions."""
    audit = runtime.audit
    if not audit.enabled:
        return
    if role == "policy":
        audit.counts.named = frozenset(s for r in version.policy.rules if r.subdivisions for s in r.subdivisions)
    audit.record(policy_entry(role, version, path, trigger), (version.sha256, version.text))


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


async def record_geoip(runtime: Runtime, info: SourceInfo, trigger: str) -> None:
    """One GeoIP database in force (the embedded data has no file, so no sha256)."""
    if not runtime.audit.enabled:
        return
    try:
        sha = await asyncio.to_thread(_sha256_file, info.path) if info.path else ""
    except OSError:  # replaced again meanwhile: the next swap records the newer one
        sha = ""
    runtime.audit.record(geoip_entry(info, sha, trigger))


async def record_start(runtime: Runtime) -> None:
    """Everything in force when this worker's chain begins."""
    active = runtime.active
    record_policy(runtime, "policy", active.current, runtime.policy_path, "start")
    if active.shadow_version is not None and runtime.settings.shadow_policy:
        record_policy(runtime, "shadow", active.shadow_version, runtime.settings.shadow_policy, "start")
    for info in runtime.geo.sources:
        await record_geoip(runtime, info, "start")
