"""The chained audit stream end to end: a real redis-server, a real gateway, `audit verify` and exports.

One gateway run carries every check that needs one (the e2e budget): what was in force (policy at start
and after an admin reload, the GeoIP database at start and after a SIGHUP swap, an override added and
removed), requests allowed and refused, a Redis outage in the middle (redis-server stopped, traffic
sent, started again: the chain says which entries it lost and when), and a clean stop. Then the
chain is verified in Redis and in an export, untouched and after one entry is altered, deleted or
moved, and the hourly counts are compared with what was sent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from support.overrides import AUTH, CN, GB, add, remove, wait_for
from support.processes import CITY, GatewayFactory, Stub
from support.redis_server import RedisServer

pytestmark = pytest.mark.e2e  # redis-server, gateways and the CLI as processes

KEY = {"REGIONGATE_AUDIT_KEY": "k" * 40, "REGIONGATE_AUDIT_KEY_ID": "k2026"}
POLICY = """\
version: 1
revision: {revision}
defaults: {{action: deny}}
rules:
  - {{name: england, subdivisions: [GB-ENG], action: allow}}
"""
OTHER = "81.2.69.160"  # GB too (London): refused by an override while it stands


def audit_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("REGIONGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "audit", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def entries(redis: RedisServer, key: str) -> list[tuple[str, dict[str, Any]]]:
    out = redis.command("XRANGE", key, "-", "+").splitlines()
    rows = []
    for i, line in enumerate(out):  # redis-cli prints id, field name, value on lines of their own
        if line.startswith("{"):
            rows.append((out[i - 2], json.loads(line)))
    return rows


def verify_json(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    r = audit_cli("verify", "--format", "json", *args, env=KEY if env is None else env)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def get(gw: Any, ip: str) -> int:
    return httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": ip}, timeout=10).status_code


@pytest.fixture
def redis(tmp_path: Path) -> Any:
    # Its own server, with an append-only file: stopped and started again mid-test, it keeps the stream.
    server = RedisServer(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always").start()
    try:
        yield server
    finally:
        server.stop()


def test_the_chain_holds_what_was_in_force_and_verify_finds_every_edit(
    gateway: GatewayFactory, stub: Stub, redis: RedisServer, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(revision="r1"))
    city = tmp_path / "city.mmdb"
    shutil.copy(CITY, city)
    pfx = "chain:"
    redis_args = ["--redis", redis.url, "--redis-prefix", pfx]
    gw = gateway(
        "--upstream", stub.url, "--policy", str(policy), "--geoip", str(city), "--trusted-proxy", "127.0.0.1/32",
        "--no-watch", "--audit", "all", "--redis-timeout", "0.2", *redis_args,
        env={"REGIONGATE_ADMIN_TOKEN": AUTH["Authorization"].split()[1], **KEY},
    )  # fmt: skip
    key = f"{pfx}audit"
    sent = {"GB": 0, "CN": 0, "override": 0}

    def send(ip: str, n: int, expect: int, what: str) -> None:
        for _ in range(n):
            assert get(gw, ip) == expect
        sent[what] += n

    send(GB, 3, 200, "GB")
    send(CN, 2, 403, "CN")
    o = add(gw, {"action": "deny", "cidr": "81.2.69.0/24", "reason": "ticket 42", "by": "alice"})
    send(OTHER, 1, 403, "override")
    remove(gw, o["id"])
    add(gw, {"action": "allow", "country": "CN", "reason": "pilot", "by": "bob", "ttl": 1})
    wait_for(lambda: any(e.get("action") == "expired" for _, e in entries(redis, key)), 10, "the override expired")
    policy.write_text(POLICY.format(revision="r2"))
    assert httpx.post(gw.admin + "/admin/reload", headers=AUTH, timeout=10).status_code == 200
    os.replace(shutil.copy(CITY, tmp_path / "city.new"), city)  # a new file (new inode), same data
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(e.get("trigger") == "sighup" for _, e in entries(redis, key)), 10, "the GeoIP swap recorded")

    # Redis away: what the gateway could not write is a gap in its chain once Redis is back.
    redis.stop()
    send(CN, 5, 403, "CN")
    send(GB, 2, 200, "GB")
    redis.start()
    wait_for(lambda: any(e["kind"] == "gap" for _, e in entries(redis, key)), 15, "a gap entry after the outage")
    send(GB, 1, 200, "GB")
    gw.proc.send_signal(signal.SIGTERM)
    gw.proc.wait(timeout=15)

    stream = entries(redis, key)
    kinds = [e["kind"] for _, e in stream]
    assert kinds[0] == "start" and kinds[-1] == "stop" and {e["chain"] for _, e in stream} == {stream[0][1]["chain"]}
    policies = [e for _, e in stream if e["kind"] == "policy"]
    assert [(p["trigger"], p["version"]) for p in policies] == [("start", "r1"), ("admin", "r2")]
    for p in policies:  # each text stored once, by its hash
        text = redis.command("HGET", f"{pfx}{{evidence}}:policies", p["sha256"])
        assert text.strip() == POLICY.format(revision=p["version"]).strip() and p["path"] == str(policy)
    geo = [e for _, e in stream if e["kind"] == "geoip"]
    assert [g["trigger"] for g in geo] == ["start", "sighup"]
    assert geo[0]["sha256"] == geo[1]["sha256"] == _sha256(CITY) and geo[0]["type"] == "GeoIP2-City"
    assert geo[0]["build"] and geo[0]["build"].startswith("20")
    overrides = [(e["action"], e["by"], e["reason"], e["value"]) for _, e in stream if e["kind"] == "override"]
    assert overrides == [
        ("added", "alice", "ticket 42", "81.2.69.0/24"),
        ("removed", "alice", "ticket 42", "81.2.69.0/24"),
        ("added", "bob", "pilot", "CN"),
        ("expired", "bob", "pilot", "CN"),
    ]
    assert [e["ttl"] for _, e in stream if e["kind"] == "override"] == [None, None, 1, 1]
    (gap,) = [e for _, e in stream if e["kind"] == "gap"]
    assert gap["lost"] >= 7 and set(gap["reasons"]) == {"redis"} and gap["from"] <= gap["to"]
    stop = stream[-1][1]
    assert stop["written"] == sum(1 for k in kinds if k == "request")

    # Hourly counts: what was sent, outage included (the counts wait in the gateway while Redis is away).
    counts: dict[tuple[str, str, str, str], int] = {}
    for hour in {e["hour"] for _, e in stream if e["kind"] == "counts"}:
        raw = redis.command("HGETALL", f"{pfx}{{evidence}}:counts:{hour}").splitlines()
        for field, n in zip(raw[::2], raw[1::2], strict=True):
            row = tuple(json.loads(field))
            counts[row] = counts.get(row, 0) + int(n)
        assert int(redis.command("TTL", f"{pfx}{{evidence}}:counts:{hour}")) > 0
    # A subdivision is counted where a rule names it (GB-ENG), not otherwise (CN's).
    assert counts[("GB", "GB-ENG", "allow", "england")] == sent["GB"]
    assert counts[("CN", "", "deny", "defaults.action")] == sent["CN"]
    assert sum(n for (_, _, _, r), n in counts.items() if r.startswith("override:")) == sent["override"]
    chained = sum(row[4] for _, e in stream if e["kind"] == "counts" for row in e["rows"])
    assert chained == sum(counts.values())  # the same counts are in the chain

    # Verify: Redis, untouched.
    code, report = verify_json(*redis_args)
    assert code == 0 and report["ok"], report
    (chain,) = report["chains"]
    assert chain["stopped"] and chain["first_seq"] == 1 and len(chain["gaps"]) == 1
    plain = audit_cli("verify", *redis_args, env=KEY)
    assert plain.returncode == 0 and plain.stdout.startswith("OK ") and "gap (seq" in plain.stdout
    # ... with a wrong key or none.
    wrong = audit_cli("verify", *redis_args, env={**KEY, "REGIONGATE_AUDIT_KEY": "x" * 40})
    assert wrong.returncode == 1 and "ALTERED" in wrong.stdout
    assert audit_cli("verify", *redis_args).returncode == 2
    # ... rotated: the key now in force is another one; the old one comes from a key file.
    keys = tmp_path / "old.keys"
    keys.write_text(f"# retired 2026-12\nk2026:{'k' * 40}\n")
    new = {"REGIONGATE_AUDIT_KEY": "n" * 40, "REGIONGATE_AUDIT_KEY_ID": "k2027"}
    assert audit_cli("verify", *redis_args, "--key-file", str(keys), env=new).returncode == 0
    assert audit_cli("verify", *redis_args, env=new).returncode == 1  # unknown key id

    # An export verifies offline, and names what was edited in it.
    export = tmp_path / "audit.jsonl"
    r = audit_cli("export", "--format", "chain", "--since", "1h", "--out", str(export), *redis_args)
    assert r.returncode == 0, r.stderr
    redis.stop()
    assert verify_json("--file", str(export))[0] == 0
    lines = export.read_bytes().splitlines(keepends=True)
    assert {orjson.loads(line).get("policy_text", {}).get("sha256") for line in lines} >= {
        p["sha256"] for p in policies
    }
    at = next(i for i, line in enumerate(lines) if b'"kind":"request"' in line and b'"country":"CN"' in line)
    seq = orjson.loads(lines[at])["e"]["seq"]

    def first_problem(edited: list[bytes]) -> dict[str, Any]:
        path = tmp_path / "edited.jsonl"
        path.write_bytes(b"".join(edited))
        code, report = verify_json("--file", str(path))
        assert code == 1 and not report["ok"]
        return report["chains"][0]["problems"][0]  # type: ignore[no-any-return]

    altered = lines.copy()
    altered[at] = altered[at].replace(b'"country":"CN"', b'"country":"GB"')
    p = first_problem(altered)
    assert p["what"] == "altered" and p["seq"] == seq
    p = first_problem(lines[:at] + lines[at + 1 :])
    assert p["what"] == "removed" and p["seq"] == seq
    moved = lines.copy()
    moved[at], moved[at + 1] = moved[at + 1], moved[at]
    p = first_problem(moved)
    assert p["what"] == "reordered" and p["seq"] in (seq, seq + 1)

    # The same edits in Redis: the stream copied under another prefix with one entry changed or left out.
    redis.start()
    for what, edit in (("altered", "alter"), ("removed", "delete")):
        copy = f"copy-{edit}:"
        for sid, e in stream:
            if e["seq"] == seq and edit == "delete":
                continue
            if e["seq"] == seq:
                e = {**e, "country": "GB"}
            redis.command("XADD", f"{copy}audit", sid, "e", orjson.dumps(e).decode())
        code, report = verify_json("--redis", redis.url, "--redis-prefix", copy)
        assert code == 1 and report["chains"][0]["problems"][0]["what"] == what
        assert report["chains"][0]["problems"][0]["seq"] == seq
    # Deleted in place (XDEL), as someone with Redis access would.
    victim = next(sid for sid, e in stream if e["seq"] == seq)
    redis.command("XDEL", key, victim)
    code, report = verify_json(*redis_args)
    assert code == 1 and report["chains"][0]["problems"][0]["what"] == "removed"


def _sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_verify_without_a_key_or_a_source_cannot_check(tmp_path: Path) -> None:
    assert audit_cli("verify", "--file", str(tmp_path / "none.jsonl")).returncode == 2  # no key
    r = audit_cli("verify", "--file", str(tmp_path / "none.jsonl"), env=KEY)
    assert r.returncode == 2 and "none.jsonl" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"not": "an export"}\n')
    r = audit_cli("verify", "--file", str(bad), env=KEY)
    assert r.returncode == 2 and "bad.jsonl:1" in r.stderr
    short = audit_cli("verify", "--file", str(bad), env={"REGIONGATE_AUDIT_KEY": "short"})
    assert short.returncode == 2 and "5 bytes" in short.stderr and "short" not in short.stderr  # never the key
