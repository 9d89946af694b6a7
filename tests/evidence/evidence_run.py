"""A month of evidence as a gateway writes it (sealed by the chain's own Sealer): two policy versions,
a Redis outage recorded as a gap, a GeoIP database, an override, requests and hourly counts."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from gateway.evidence import exportfile
from gateway.evidence.chain import Sealer, make_key

KEY = make_key("k1", "0123456789abcdef0123456789abcdef")
CHAIN = "gw-a/4242/1793577600000"
V1 = "version: 1\ndefaults: {action: deny}\nrules:\n  - {name: supported, countries: [US, GB, DE], action: allow}\n"
V2 = (
    "version: 2\nprovider: Example AI\nsource: https://example.com/supported-countries\ncaptured: 2026-11-14\n"
    "redis: {on_error: closed}\ndefaults: {action: deny}\n"
    "rules:\n  - {name: supported, countries: [US, GB, DE, FR], action: allow, source: policy}\n"
    "  - {name: watch-br, countries: [BR], action: monitor}\n"
)
SHA1, SHA2 = hashlib.sha256(V1.encode()).hexdigest(), hashlib.sha256(V2.encode()).hexdigest()
# Hourly counts (country, subdivision, decision, rule, n): what the report's per-country figures must say.
HOUR1 = [
    ["US", "", "allow", "supported", 1200],
    ["CN", "", "deny", "defaults.action", 37],
    ["RU", "", "deny", "defaults.action", 11],
]
HOUR2 = [
    ["US", "", "allow", "supported", 800],
    ["FR", "", "allow", "supported", 55],
    ["CN", "", "deny", "defaults.action", 5],
    ["BR", "", "monitor", "watch-br", 9],
    ["unknown", "", "deny", "defaults.unknown", 3],
]


def _envelope(kind: str, time: str, **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "time": time, **fields}


def entries() -> list[dict[str, Any]]:
    start = _envelope(
        "start", "2026-11-02T08:00:00.000+00:00", host="gw-a", pid=4242, worker=0, version="1.0", audit="refusals",
        started_at="2026-11-02T08:00:00.000+00:00",
    )  # fmt: skip
    load1 = _envelope(
        "policy", "2026-11-02T08:00:00.010+00:00", role="policy", sha256=SHA1, version="1",
        path="/etc/regiongate/policy.yaml", loaded_at="2026-11-02T08:00:00.010+00:00", trigger="start",
    )  # fmt: skip
    geo = _envelope(
        "geoip", "2026-11-02T08:00:00.020+00:00", path="/data/GeoLite2-City.mmdb", type="GeoLite2-City",
        build="2026-10-28T00:00:00+00:00", sha256="3" * 64, trigger="start",
    )  # fmt: skip
    counts1 = _envelope("counts", "2026-11-02T09:00:01.000+00:00", hour="2026-11-02T08", rows=HOUR1, sampled=2)
    refusal = _envelope(
        "request", "2026-11-02T08:10:00.000+00:00", request_id="r1", decision="deny", rule="defaults.action",
        country="CN", subdivisions=["CN-BJ"], asn=4134, path="/v1/chat/completions", model="gpt-4o", policy=SHA1,
        client="h:abcd",
    )  # fmt: skip
    override = _envelope(
        "override", "2026-11-10T12:00:00.000+00:00", action="added", id="ov1", override="deny", match="cidr",
        value="198.51.100.0/24", by="alice", reason="abuse ticket 12", ttl=3600, expires_at="2026-11-10T13:00:00+00:00",
    )  # fmt: skip
    load2 = _envelope(
        "policy", "2026-11-15T10:00:00.000+00:00", role="policy", sha256=SHA2, version="2",
        path="/etc/regiongate/policy.yaml", loaded_at="2026-11-15T10:00:00.000+00:00", trigger="watch",
    )  # fmt: skip
    gap = _envelope(
        "gap", "2026-11-20T14:07:30.000+00:00", after=7, **{"from": "2026-11-20T14:02:00.000+00:00"},
        to="2026-11-20T14:07:00.000+00:00", lost=42, reasons={"redis": 42}, lost_seq=None,
    )  # fmt: skip
    counts2 = _envelope("counts", "2026-11-20T15:00:01.000+00:00", hour="2026-11-20T14", rows=HOUR2, sampled=0)
    refusal2 = _envelope(
        "request", "2026-11-20T14:30:00.000+00:00", request_id="r2", decision="deny", rule="defaults.action",
        country="CN", subdivisions=[], asn=4837, path="/v1/chat/completions", model=None, policy=SHA2, client="h:ef01",
    )  # fmt: skip
    stop = _envelope("stop", "2026-11-30T23:00:00.000+00:00", reason="shutdown", written=9, dropped={}, sampled=2)
    return [start, load1, geo, refusal, counts1, override, load2, gap, counts2, refusal2, stop]


def sealed(items: list[dict[str, Any]] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(stream id, entry) as stored: ``items`` (default :func:`entries`) sealed in order; the gap links to
    the entry it follows."""
    sealer = Sealer(CHAIN, KEY)
    out = []
    for i, entry in enumerate(entries() if items is None else items, 1):
        stored = orjson.loads(sealer.seal(dict(entry)))
        out.append((f"{1793577600000 + i}-0", stored))
    return out


def export_lines(items: list[tuple[str, dict[str, Any]]]) -> list[bytes]:
    """The file ``audit export --format chain`` writes, with the chain's own line writers."""
    lines = [exportfile.header_line("2026-12-01T00:00:00+00:00", "regiongate:", None, None)]
    lines += [exportfile.entry_line(sid, e) for sid, e in items]
    lines += [exportfile.policy_line(sha, text) for sha, text in ((SHA1, V1), (SHA2, V2))]
    return lines
