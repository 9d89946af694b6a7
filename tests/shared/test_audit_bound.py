"""The audit stream cannot be filled by a client: bounded fields, a byte budget, a budget per network.

A scanner once wrote about 1 GiB to Redis through refusals with 8 KiB paths.
These tests send that traffic to a real ``redis-server`` (through the writer,
and through a real gateway) and measure what the stream holds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.evidence.chain import Sealer, make_key
from gateway.shared import auditbound
from gateway.shared.audit import Audit, entry
from gateway.shared.auditbound import (
    MAX_ENTRY_BYTES,
    PATH_BYTES,
    SOURCE_BURST,
    SOURCE_RATE,
    SourceBuckets,
    clip,
    source_of,
    stream_budget,
)
from gateway.shared.redisconn import parse_url
from gateway.shared.store import RedisStore
from gateway.usage import Usage
from support.overrides import CN, overrides_gateway, wait_for
from support.processes import GatewayFactory, Stub
from support.redis_server import RedisServer, running

LONG_PATH = "/v1/" + "a" * (8000 - 4)  # about 8 KiB, the scanner's: the most a request target may be
MARK = re.compile(r"\.\.\.\[truncated: (\d+) bytes\]$")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running(tmp_path_factory.mktemp("redis")) as server:
        yield server


# --- one field, one entry ---------------------------------------------------------------


@given(st.text(max_size=3000), st.sampled_from([40, 64, 128, 256, 512]))
def test_clip_fits_its_bound_and_says_so(text: str, limit: int) -> None:
    out = clip(text, limit)
    assert len(orjson.dumps(out)) - 2 <= limit
    try:
        size = len(orjson.dumps(text)) - 2
    except orjson.JSONEncodeError:  # a lone surrogate: shown escaped
        return
    if size <= limit:
        assert out == text
    else:
        m = MARK.search(out)
        assert m is not None and int(m.group(1)) == size
        assert text.startswith(out[: m.start()])


@pytest.mark.parametrize(
    "text",
    [
        "a" * 9000,  # one byte each
        "é" * 9000,  # two
        "€" * 9000,  # three
        "😀" * 9000,  # four
        "\x01" * 9000,  # six as JSON (\u0001)
        '"\\' * 4500,  # two as JSON (\" and \\)
        "a\ud800" * 3000,  # a lone surrogate
    ],
)
def test_clip_counts_bytes_of_json_not_characters(text: str) -> None:
    out = clip(text, PATH_BYTES)
    assert len(orjson.dumps(out)) - 2 <= PATH_BYTES
    assert MARK.search(out)


def test_the_worst_entry_fits_the_entry_bound() -> None:
    """Every field at its longest, in the costliest characters: the entry is still under MAX_ENTRY_BYTES."""
    worst = entry(
        "rg-" + "f" * 16, "rate_limited", "\x01" * 5000, "\x01" * 100, ["\x01" * 100] * 50, 2**32 - 1,
        "\x01" * 9000, "\x01" * 64, "\x01" * 5000, "\x01" * 9000, ("\x01" * 100, "\x01" * 5000),
        Usage(2**63 - 1, 2**63 - 1, 2**63 - 1, 2**63 - 1, "estimate"), "\x01" * 5000,
    )  # fmt: skip
    assert len(orjson.dumps(worst)) <= MAX_ENTRY_BYTES
    # As stored: with the chain's envelope, the longest chain id (a 64-byte host name) and key id.
    sealer = Sealer("h" * 64 + f"/{2**22}/{2**45}", make_key("k" * 32, "s" * 64))
    sealer.seq = 10**12
    sealer.seal({"kind": "start", "time": "t"})
    assert len(sealer.seal(worst)) <= MAX_ENTRY_BYTES
    assert len(worst["subdivisions"]) == 2
    big_asn = entry("rg-1", "deny", "r", "CN", [], 10**30, "/", "p", None)
    assert big_asn["asn"] is None  # a database's number too big for an ASN is not written


def test_an_ordinary_entry_is_written_whole() -> None:
    e = entry(
        "rg-1", "deny", "defaults.action", "CN", ["CN-22"], 4134, "/v1/chat/completions", "a" * 64, "h:1", "gpt-4o"
    )
    assert e["path"] == "/v1/chat/completions" and e["model"] == "gpt-4o" and e["subdivisions"] == ["CN-22"]


# --- a budget per network ---------------------------------------------------------------


def test_a_source_gets_its_burst_then_the_steady_rate() -> None:
    b = SourceBuckets(burst=3, rate=2.0)
    one = source_of(ipaddress.ip_address("175.16.199.1"))
    assert [b.take(one, 100.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(one, 100.4) is False  # 0.8 of a token
    assert b.take(one, 100.5) is True  # one token after half a second at 2/s
    assert b.take(one, 100.5) is False
    # Another /24 has its own budget; the same /24 shares it.
    assert b.take(source_of(ipaddress.ip_address("175.16.200.1")), 100.5) is True
    assert b.take(source_of(ipaddress.ip_address("175.16.199.200")), 100.5) is False
    assert b.take(None, 100.5) is True  # no address: one shared bucket of its own


def test_ipv6_sources_are_their_48_and_never_an_ipv4_network() -> None:
    a = source_of(ipaddress.ip_address("2001:db8:1:2::1"))
    assert a == source_of(ipaddress.ip_address("2001:db8:1:ffff::9"))  # rotating inside a /48 does not help
    assert a != source_of(ipaddress.ip_address("2001:db8:2::1"))
    v4 = {source_of(ipaddress.ip_address(f"{n}.0.0.1")) for n in range(256)}
    v6 = {source_of(ipaddress.ip_address(f"::{n:x}:0:0:0:0:1")) for n in range(256)}
    assert not v4 & v6


def test_sources_remembered_stay_bounded() -> None:
    b = SourceBuckets(burst=2, rate=1.0, max_sources=100)
    for n in range(10_000):
        assert b.take(n, 5.0) is True  # every new source has its burst
        assert len(b._buckets) <= 100
    for n in range(100):  # a flood of sources forgets the old ones: they get their burst again, never less
        b.take(n, 5.0)
    assert len(b._buckets) <= 100


# --- the stream in a real Redis ------------------------------------------------------------


async def _write(url: str, prefix: str, entries: list[tuple[dict[str, object], int | None]], maxlen: int) -> Audit:
    store = RedisStore(parse_url(url), None, prefix, 2.0, {})
    await store.start()
    audit = Audit("refusals", maxlen)
    audit.start(store)
    try:
        for e, source in entries:
            audit.put(e, source)
        while audit.written + audit.dropped < len(entries):  # what the writer has done with each
            await asyncio.sleep(0.01)
    finally:
        await audit.close()
        await store.close()
    return audit


def _refusal(n: int, path: str = LONG_PATH) -> dict[str, object]:
    return entry(f"rg-{n:016x}", "deny", "defaults.action", "CN", ["CN-22"], 4837, path, "p" * 64, "h:" + "0" * 16)


async def test_many_long_refusals_stay_under_the_byte_budget(redis_server: RedisServer) -> None:
    maxlen = 1000
    prefix = f"bound-{time.monotonic_ns()}:"
    # 5,000 refusals with 8 KiB paths from 5,000 networks (a botnet: no per-network budget runs out).
    audit = await _write(redis_server.url, prefix, [(_refusal(n), n) for n in range(5000)], maxlen)
    assert audit.dropped == 0 and audit.written == 5000
    key = f"{prefix}audit"
    length = int(redis_server.command("XLEN", key))
    assert maxlen <= length <= maxlen + auditbound.TRIM_SLACK
    used = int(redis_server.command("MEMORY", "USAGE", key, "SAMPLES", "0"))
    assert used <= stream_budget(maxlen), (used, stream_budget(maxlen))
    assert used < length * len(LONG_PATH)  # the long paths are not in it
    # The newest request entry (the chain's stop entry comes after it).
    newest = next(r for r in _rows(redis_server, key, reverse=True) if r["kind"] == "request")
    m = MARK.search(newest["path"])
    assert m is not None and int(m.group(1)) == len(LONG_PATH) and newest["path"].startswith("/v1/aaa")
    assert len(newest["path"]) <= PATH_BYTES


def _rows(redis_server: RedisServer, key: str, reverse: bool = False) -> list[dict[str, Any]]:
    """The stream's entries, decoded (redis-cli prints each entry's id, field name and value on lines)."""
    out = redis_server.command("XREVRANGE" if reverse else "XRANGE", key, *(("+", "-") if reverse else ("-", "+")))
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


async def test_one_network_gets_a_burst_and_the_rest_is_counted(redis_server: RedisServer) -> None:
    prefix = f"bound-{time.monotonic_ns()}:"
    scanner = source_of(ipaddress.ip_address(CN))
    entries = [(_refusal(n, "/v1/x"), scanner) for n in range(SOURCE_BURST * 4)]
    allowed = entry("rg-a", "allow", "gb", "GB", [], None, "/v1/models", "p" * 64, "h:1")
    entries += [(allowed, scanner)] * 10  # --audit all: an allowed request is never sampled
    started = time.monotonic()
    audit = await _write(redis_server.url, prefix, entries, 1000)
    elapsed = time.monotonic() - started
    written = sum(1 for r in _rows(redis_server, f"{prefix}audit") if r["kind"] == "request")
    # The burst and the allowed ones, plus at most what the bucket refilled meanwhile (5 a second): the bound
    # itself, whatever the machine's speed.
    assert SOURCE_BURST + 10 <= written <= SOURCE_BURST + 10 + SOURCE_RATE * elapsed + 1
    assert audit.dropped == len(entries) - written and audit.written == written


# --- a real gateway, refused with 8 KiB paths ---------------------------------------------


def test_gateway_writes_bounded_refusals_and_counts_the_sampled(
    gateway: GatewayFactory, stub: Stub, redis_server: RedisServer
) -> None:
    prefix = f"gw-{time.monotonic_ns()}:"
    # Writes may take 2 s: on a busy machine none is dropped as "redis", so every refusal is written or sampled.
    gw = overrides_gateway(gateway, stub, "--redis", redis_server.url, "--redis-prefix", prefix, "--redis-timeout", "2")
    sent = SOURCE_BURST * 3
    started = time.monotonic()
    with httpx.Client(timeout=10) as c:
        for n in itertools.islice(itertools.count(), sent):
            r = c.get(gw.url + LONG_PATH + f"{n}", headers={"X-Forwarded-For": CN})
            assert r.status_code == 403
    key = f"{prefix}audit"

    def dropped() -> float:
        line = next(
            (x for x in gw.metrics().splitlines() if 'regiongate_audit_dropped_total{reason="sampled"}' in x), ""
        )
        return float(line.split()[-1]) if line else 0.0

    def requests() -> int:  # the stream also holds the chain's start, policy and GeoIP entries
        return sum(1 for r in _rows(redis_server, key) if r["kind"] == "request")

    wait_for(lambda: requests() + dropped() == sent, 10, "every refusal written or counted")
    elapsed = time.monotonic() - started  # every refusal was judged by the bucket before this
    written = requests()
    # The burst, plus at most what the bucket refilled while they were sent (5 a second); the rest counted.
    assert SOURCE_BURST <= written <= min(sent, SOURCE_BURST + SOURCE_RATE * elapsed + 1)
    assert dropped() == sent - written
    rows = [r for r in _rows(redis_server, key) if r["kind"] == "request"]
    assert len(rows) == written
    for row in rows:
        m = MARK.search(str(row["path"]))
        assert m is not None and str(row["path"]).startswith("/v1/aaaa")
        assert len(orjson.dumps(row)) <= MAX_ENTRY_BYTES


def test_budget_is_documented() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "replicas-and-audit.md").read_text()
    assert f"{MAX_ENTRY_BYTES:,} bytes" in page and f"{PATH_BYTES} bytes" in page
    assert "maxmemory" in page and "volatile-ttl" in page


# --- the shipped maxmemory policy ------------------------------------------------------------


def _fill_with_rate_limit_subjects(server: RedisServer, subjects: int) -> tuple[int, int]:
    """Overrides and an audit stream, then rate-limit checks for ``subjects`` callers through the real script.

    Returns how many checks Redis refused (OOM) and how many keys it evicted."""
    import redis

    from gateway.policy.ratelimit import RateLimit, key_start, redis_key
    from gateway.shared.ratelimit import GCRA_LUA, script_args

    client = redis.Redis(port=server.port)
    client.hset("p:{overrides}:data", mapping={f"o{n}": "x" * 200 for n in range(50)})
    client.set("p:{overrides}:key", "k" * 64)
    for n in range(300):
        client.xadd("p:audit", {"e": orjson.dumps(_refusal(n, "/v1/x"))}, maxlen=1000, approximate=True)
    limit = RateLimit("limited", "ip", 100, 3600.0, 100)
    start, (interval, tolerance) = key_start("p:", limit), script_args(limit)
    gcra = client.register_script(GCRA_LUA)
    refused = 0
    for first in range(0, subjects, 1000):
        pipe = client.pipeline(transaction=False)
        for n in range(first, first + 1000):
            gcra(keys=[redis_key(start, f"h:{n:032x}")], args=[interval, tolerance], client=pipe)
        refused += sum(isinstance(r, redis.exceptions.ResponseError) for r in pipe.execute(raise_on_error=False))
    evicted = int(client.info("stats")["evicted_keys"])
    assert client.hlen("p:{overrides}:data") == 50 and client.exists("p:{overrides}:key")
    assert client.xlen("p:audit") == 300
    client.close()
    return refused, evicted


@pytest.mark.parametrize(("policy", "writes_refused"), [("volatile-ttl", False), ("noeviction", True)])
@pytest.mark.e2e
def test_a_full_redis_evicts_only_rate_limit_keys(tmp_path: Path, policy: str, writes_refused: bool) -> None:
    """With the shipped policy a full Redis drops rate-limit subjects (nearest their expiry), never an override or
    the stream, and every check still gets an answer; with noeviction the checks are refused (OOM) instead."""
    server = RedisServer(tmp_path / "redis", "--maxmemory", "4mb", "--maxmemory-policy", policy).start()
    try:
        refused, evicted = _fill_with_rate_limit_subjects(server, 60_000)  # about 6 MB of subjects
    finally:
        server.stop()
    if writes_refused:
        assert refused > 0 and evicted == 0
    else:
        assert refused == 0 and evicted > 0
