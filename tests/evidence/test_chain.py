"""The HMAC chain, pure: any single alteration, deletion, reorder or truncation is detected and located.

Chains are built with :class:`Sealer` as a gateway builds them; Hypothesis picks the chain and the
edit. Verification must name the entry edited (its ``seq``) or, for a truncation, where the chain
now begins or ends; an untouched chain must verify, including one with a gap the gateway declared
itself (a write lost while Redis was away).
"""

from __future__ import annotations

import string
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.evidence.chain import (
    AuditKeyError,
    Sealer,
    Verification,
    canonical,
    key_from_env,
    make_key,
    parse_key_file,
    verify,
)
from gateway.evidence.entries import EntryError, GapEntry, PolicyEntry, RequestEntry, parse_entry
from gateway.evidence.exportfile import ExportError, entry_line, header_line, load_export, policy_line

# No deadline: a test's speed on a shared machine is not what it checks (the rule: no timing thresholds).
EDITS = settings(max_examples=200, deadline=None)
KEY = make_key("k1", "s" * 32)
KEYS = {KEY.kid: KEY.secret}

texts = st.text(string.ascii_letters + "é/-_ ", max_size=12)
bodies = st.fixed_dictionaries(
    {"decision": st.sampled_from(["allow", "deny"]), "country": texts, "asn": st.none() | st.integers(0, 2**32 - 1)}
)


def build(n_bodies: list[dict[str, Any]], stop: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """A chain as a gateway writes it: start, the entries, stop; decoded as a reader gets them."""
    sealer = Sealer("host/1/1700000000000", KEY)
    out = [sealer.seal({"kind": "start", "time": "2026-12-01T00:00:00.000+00:00"})]
    for i, body in enumerate(n_bodies):
        out.append(sealer.seal({"kind": "request", "time": f"2026-12-01T00:00:{i % 60:02}.000+00:00", **body}))
    if stop:
        out.append(sealer.seal({"kind": "stop", "time": "2026-12-01T01:00:00.000+00:00"}))
    return [(f"{i}-0", orjson.loads(data)) for i, data in enumerate(out)]


def only_chain(result: Verification) -> Any:
    assert len(result.chains) == 1
    return result.chains[0]


@EDITS
@given(st.lists(bodies, min_size=0, max_size=8))
def test_an_untouched_chain_verifies(b: list[dict[str, Any]]) -> None:
    c = only_chain(verify(build(b), KEYS))
    assert c.ok and c.stopped and c.first_seq == 1 and c.last_seq == len(b) + 2 and not c.notices()


@EDITS
@given(st.lists(bodies, min_size=1, max_size=8), st.data())
def test_any_altered_field_is_named(b: list[dict[str, Any]], data: st.DataObject) -> None:
    items = build(b)
    i = data.draw(st.integers(0, len(items) - 1))
    sid, entry = items[i]
    field = data.draw(st.sampled_from(sorted(entry)))
    value = data.draw(st.one_of(texts, st.integers(), st.none()).filter(lambda v: v != entry[field]))
    items[i] = (sid, {**entry, field: value})
    result = verify(items, KEYS)
    problems = [p for c in result.chains for p in c.problems]
    if result.malformed:  # no chain id or sequence number left: not an entry of any chain
        assert result.malformed == (sid,) and field in ("chain", "seq")
        return
    if field == "chain":  # moved to another chain: both chains say so
        assert not result.ok
        return
    assert problems, (field, value)
    first = problems[0]
    if field == "seq" and isinstance(value, int):
        assert first.stream_id == sid or first.seq == entry["seq"]  # its MAC, or the hole where it was
    elif field == "kid" and value is None:
        assert first.what == "unsigned" and first.stream_id == sid
    else:
        assert first.stream_id == sid or (field == "seq" and not isinstance(value, int))


@EDITS
@given(st.lists(bodies, min_size=2, max_size=8), st.data())
def test_any_deleted_entry_is_named(b: list[dict[str, Any]], data: st.DataObject) -> None:
    items = build(b)
    i = data.draw(st.integers(1, len(items) - 2))  # inside: the ends are truncations (below)
    seq = items[i][1]["seq"]
    del items[i]
    (first, *_) = only_chain(verify(items, KEYS)).problems
    assert first.what == "removed" and first.seq == seq


@EDITS
@given(st.lists(bodies, min_size=2, max_size=8), st.data())
def test_any_reorder_is_named(b: list[dict[str, Any]], data: st.DataObject) -> None:
    items = build(b)
    i = data.draw(st.integers(0, len(items) - 2))
    j = data.draw(st.integers(i + 1, len(items) - 1))
    items[i], items[j] = items[j], items[i]
    (first, *_) = only_chain(verify(items, KEYS)).problems
    assert first.what in ("reordered", "altered")  # seq 1 moved away: a non-start entry is first
    assert first.seq in (items[i][1]["seq"], items[j][1]["seq"], 1)


@EDITS
@given(st.lists(bodies, min_size=1, max_size=8), st.data())
def test_any_truncation_is_said_where(b: list[dict[str, Any]], data: st.DataObject) -> None:
    items = build(b)
    k = data.draw(st.integers(1, len(items) - 1))
    head = only_chain(verify(items[k:], KEYS))  # the oldest k gone (as MAXLEN trims them)
    assert head.first_seq == k + 1 and any(f"begins at seq {k + 1}" in n for n in head.notices())
    tail = only_chain(verify(items[:k], KEYS))  # the newest gone: no stop entry
    assert not tail.stopped and any(f"after seq {k}" in n for n in tail.notices())


def test_a_declared_gap_verifies_and_an_undeclared_hole_does_not() -> None:
    sealer = Sealer("h/2/3", KEY)
    kept = [sealer.seal({"kind": "start", "time": "t0"}), sealer.seal({"kind": "request", "time": "t1"})]
    confirmed = sealer.prev
    sealer.seal({"kind": "request", "time": "t2"})  # written to a Redis that was away: lost
    sealer.seal({"kind": "request", "time": "t3"})
    gap = {"kind": "gap", "time": "t5", "after": 2, "from": "t2", "to": "t3", "lost": 2, "reasons": {"redis": 2}}
    gap["lost_seq"] = [3, 4]
    kept.append(sealer.seal_after(gap, confirmed))
    kept.append(sealer.seal({"kind": "stop", "time": "t6"}))
    items = [(str(i), orjson.loads(d)) for i, d in enumerate(kept)]
    c = only_chain(verify(items, KEYS))
    assert c.ok and len(c.gaps) == 1 and c.gaps[0].lost == 2 and c.gaps[0].start == "t2"
    # The same hole with the gap entry taken out is tampering.
    c = only_chain(verify(items[:2] + items[3:], KEYS))
    assert c.problems[0].what == "removed" and c.problems[0].seq == 3


def test_unsigned_and_unknown_keys_fail_and_old_entries_are_counted_apart() -> None:
    unsigned = Sealer("h/1/1", None)
    items = [("1-0", orjson.loads(unsigned.seal({"kind": "start", "time": "t"})))]
    assert only_chain(verify(items, KEYS)).problems[0].what == "unsigned"
    other = Sealer("h/1/2", make_key("k0", "o" * 32))
    items = [("1-0", orjson.loads(other.seal({"kind": "start", "time": "t"})))]
    assert only_chain(verify(items, KEYS)).problems[0].what == "unknown_key"
    old = {"time": "t", "request_id": "rg-1", "decision": "deny"}  # written before the chain
    result = verify([("0-1", old), ("0-2", "not an object")], KEYS)
    assert result.unchained == 1 and result.malformed == ("0-2",) and not result.ok


def test_canonical_form_is_independent_of_key_order_and_excludes_the_mac() -> None:
    a = {"b": 1, "a": "é", "mac": "x"}
    assert canonical(a) == canonical({"a": "é", "b": 1}) == '{"a":"é","b":1}'.encode()


def test_keys_from_env_and_files_and_their_errors() -> None:
    assert key_from_env({}) is None
    k = key_from_env({"REGIONGATE_AUDIT_KEY": "z" * 16})
    assert k is not None and k.kid == "default" and "z" * 16 not in repr(k)
    with pytest.raises(AuditKeyError, match="16"):
        key_from_env({"REGIONGATE_AUDIT_KEY": "short-secret"})
    with pytest.raises(AuditKeyError, match="key id"):
        key_from_env({"REGIONGATE_AUDIT_KEY": "z" * 16, "REGIONGATE_AUDIT_KEY_ID": "bad id"})
    assert parse_key_file("# old\n\nk1:" + "a" * 16 + "\nk2 : " + "b" * 16 + "\n") == {
        "k1": b"a" * 16,
        "k2": b"b" * 16,
    }
    with pytest.raises(AuditKeyError, match=r"keys:2: expected kid:secret"):
        parse_key_file("k1:" + "a" * 16 + "\nnocolon\n", "keys")
    with pytest.raises(AuditKeyError) as e:
        parse_key_file("k1:tooshort\n", "keys")
    assert "tooshort" not in str(e.value)


def test_entries_parse_to_their_kind_and_refuse_wrong_types() -> None:
    ((_, start), (_, req), *_) = build([{"decision": "deny", "country": "CN", "asn": None}])
    full = {**req, "request_id": "rg-1", "rule": "r", "subdivisions": [], "path": "/", "model": None}
    parsed = parse_entry(full | {"policy": "p", "client": None})
    assert isinstance(parsed, RequestEntry) and parsed.country == "CN" and parsed.seq == 2
    pre_chain: dict[str, Any] = {"time": "t", "request_id": "rg-1", "decision": "deny", "rule": "r", "country": None}
    pre_chain |= {"subdivisions": [], "asn": None, "path": None, "model": None, "policy": "p", "client": None}
    old = parse_entry(pre_chain)
    assert isinstance(old, RequestEntry) and old.chain is None and old.kind == "request"
    gap = {"kind": "gap", "time": "t", "chain": "c", "seq": 3, "kid": None, "prev": None, "mac": None, "after": 1}
    gap |= {"from": "a", "to": "b", "lost": 2, "reasons": {"redis": 2}, "lost_seq": None}
    g = parse_entry(gap)
    assert isinstance(g, GapEntry) and g.from_ == "a"
    with pytest.raises(EntryError, match="'lost' is str"):
        parse_entry(gap | {"lost": "2"})
    with pytest.raises(EntryError, match="unknown entry kind"):
        parse_entry({"kind": "nope"})
    with pytest.raises(EntryError, match="'seq' is bool"):
        parse_entry(gap | {"seq": True})
    assert start["kind"] == "start"


def test_an_export_reads_back_and_refuses_what_is_not_one() -> None:
    import hashlib

    text = "version: 1\n"
    sha = hashlib.sha256(text.encode()).hexdigest()
    items = build([])
    lines = [header_line("now", "rg:", None, None), *(entry_line(s, e) for s, e in items), policy_line(sha, text)]
    exp = load_export(lines, "x.jsonl")
    assert exp.items == items and exp.policy_texts == {sha: text} and verify(exp.items, KEYS).ok
    with pytest.raises(ExportError, match=r"x.jsonl:1: not a regiongate audit export"):
        load_export([b"{}"], "x.jsonl")
    with pytest.raises(ExportError, match=r"x.jsonl:3: policy text does not match"):
        load_export([lines[0], lines[1], policy_line(sha, text + " ")], "x.jsonl")
    with pytest.raises(ExportError, match=r"x.jsonl:2: not JSON"):
        load_export([lines[0], b"{"], "x.jsonl")
    assert PolicyEntry.KIND == "policy"


def test_a_gateway_without_a_key_warns_and_one_with_a_bad_key_does_not_start(tmp_path: Any) -> None:
    from gateway.runtime import ConfigError, Settings, load_runtime

    settings = Settings(upstream="http://127.0.0.1:9", access_log="off", redis="redis://127.0.0.1:9/0")
    unsigned = load_runtime(settings, {})
    assert unsigned.audit.key is None and any("no REGIONGATE_AUDIT_KEY" in w for w in unsigned.warnings)
    signed = load_runtime(settings, {"REGIONGATE_AUDIT_KEY": "q" * 32, "REGIONGATE_AUDIT_KEY_ID": "k1"})
    assert signed.audit.key is not None and signed.audit.key.kid == "k1"
    assert not any("AUDIT_KEY" in w for w in signed.warnings) and "q" * 32 not in repr(signed.audit.key)
    with pytest.raises(ConfigError, match="at least 16") as e:
        load_runtime(settings, {"REGIONGATE_AUDIT_KEY": "tiny-secret"})
    assert "tiny-secret" not in str(e.value)
    off = load_runtime(Settings(upstream="http://127.0.0.1:9", access_log="off"), {})  # no Redis: no audit
    assert not any("AUDIT_KEY" in w for w in off.warnings)
