"""The policy loader's bounds: YAML bombs, deep nesting and huge files are refused with file:line.

Each refusal is also measured: tracemalloc's peak while the gateway reads and
refuses the file must stay within a generous bound (a few times what the
bounded input itself takes), never the gigabyte an expanded bomb costs. No
timing is asserted.
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import httpx
import pytest

from gateway import yamlfile
from gateway.policy import load_policy, parse_policy
from gateway.yamlfile import MAX_BYTES, MAX_DEPTH, MAX_NODES, Document, FileError, load, load_pure
from support.live import get_json, wait_until, write_by_rename
from support.processes import CITY, POLICIES, GatewayFactory, Stub, write

# Far above what refusing any of these small inputs needs, far below what accepting a bomb costs.
PEAK_BOUND = 64 << 20  # 64 MiB
# A file over the byte bound is held as text, and its head encoded to count bytes: 48 MiB measured
# at 16 MiB, a few times the bounded input itself, as the 64 MiB above was for 1 MiB.
PEAK_BOUND_BYTES = 4 * MAX_BYTES


def test_the_bounds_are_the_documented_ones() -> None:
    """Sized for policies of 100,000 rules (gateway/yamlfile.py says what the worst file costs)."""
    assert (MAX_BYTES, MAX_NODES, MAX_DEPTH) == (16 << 20, 1_000_000, 32)


def bomb(levels: int = 9, width: int = 9) -> str:
    """The report's shape: nested alias lists in ``metadata:``, each level ``width`` times the last."""
    lines = ["version: 1", "metadata:", "  a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def refused(load_it: Callable[[], object]) -> tuple[str, int]:
    """``load_it``'s FileError text and the peak bytes allocated while it ran."""
    tracemalloc.start()
    try:
        with pytest.raises(FileError) as e:
            load_it()
        return str(e.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_reported_alias_bomb_is_refused_at_its_first_anchor(tmp_path: Path) -> None:
    text = bomb()
    assert len(text) < 600  # about the report's 522 bytes: nine levels of nine
    path = write(tmp_path, "bomb.yaml", text)
    msg, peak = refused(lambda: load_policy(path))
    assert msg == f"{path}:3: YAML anchors and aliases (&name, *name) are not allowed in a policy; write the values out"
    assert peak < PEAK_BOUND, peak


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("version: 1\nmetadata: {a: &x 1}\n", 2),  # an anchor alone, on a scalar
        ("version: 1\nmetadata:\n  base: &b {owner: x}\n  copy: {<<: *b}\n", 3),  # a merge key
        ("version: 1\nrules:\n  - &r {countries: [GB], action: allow}\n", 3),  # on a rule
        ("version: 1\nrules: &rules\n  - {countries: [GB], action: allow}\n", 2),  # on a list
        ("version: 1\nmetadata: {a: *undefined}\n", 2),  # an alias with no anchor
        ("version: 1\nmetadata:\n  x: 1\n  y: [1, 2, !!str &s 3]\n", 4),  # after a tag
        ("&top\nversion: 1\n", 1),  # on the document
    ],
    ids=["scalar-anchor", "merge-key", "rule-anchor", "list-anchor", "undefined-alias", "tagged", "document"],
)
def test_every_anchor_and_alias_is_refused_with_its_line(text: str, line: int) -> None:
    with pytest.raises(FileError) as e:
        parse_policy(text, "p.yaml", None)
    assert str(e.value).startswith(f"p.yaml:{line}: YAML anchors and aliases"), str(e.value)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("version: 1\nmetadata: " + "[" * 10_000 + "\n", 2),  # the report: unclosed, one line
        ("version: 1\nmetadata: " + "[" * 10_000 + "]" * 10_000 + "\n", 2),  # closed
        ("version: 1\nmetadata: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n", 2),
        ("version: 1\nmetadata:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(200)), MAX_DEPTH + 2),
        ("version: 1\nmetadata:\n  x:\n" + "    " + "- " * 5_000 + "1\n", 4),
    ],
    ids=["flow-lists-unclosed", "flow-lists", "flow-mappings", "block-mappings", "block-lists"],
)
def test_deep_nesting_is_refused_as_too_deeply_nested_with_its_line(text: str, line: int) -> None:
    msg, peak = refused(lambda: parse_policy(text, "p.yaml", None))
    assert msg.startswith(f"p.yaml:{line}: too deeply nested: ") and str(MAX_DEPTH) in msg, msg
    assert peak < PEAK_BOUND, peak


@pytest.mark.e2e
def test_deep_nesting_in_a_file_names_the_file_and_line_from_the_command_line(tmp_path: Path) -> None:
    """What an operator sees: the file and line and what is wrong, not a traceback or a watcher error."""
    path = write(tmp_path, "deep.yaml", "version: 1\n\nmetadata: " + "[" * 10_000 + "\n")
    r = subprocess.run([sys.executable, "-m", "gateway", "check", path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"{path}:3: too deeply nested" in r.stderr and "Traceback" not in r.stderr, r.stderr


def nested(depth: int) -> str:
    """A document whose deepest collection is ``depth`` levels down (the top mapping is level 1)."""
    return "version: 1\nmetadata: " + "[" * (depth - 1) + "]" * (depth - 1) + "\n"


def test_the_depth_bound_is_exact() -> None:
    assert load(nested(MAX_DEPTH), "p.yaml").data["version"] == 1
    with pytest.raises(FileError, match="too deeply nested"):
        load(nested(MAX_DEPTH + 1), "p.yaml")


def many(values: int) -> str:
    """A document of exactly ``values`` values: the top mapping, its two keys, the version, a list."""
    return "version: 1\nmetadata: [" + ",".join(["1"] * (values - 5)) + "]\n"


def test_the_node_bound_refuses_with_a_line() -> None:
    """At the real bound, by the fast path (a flow list: about 5 s of CPU on a busy machine)."""
    with pytest.raises(FileError) as e:
        load(many(MAX_NODES + 1), "p.yaml")
    assert str(e.value) == f"p.yaml:2: too many values: a policy may hold at most {MAX_NODES:,}"


@pytest.mark.parametrize("read", [load, load_pure], ids=["fast", "pure"])
def test_the_node_bound_is_exact_and_refuses_with_a_line_both_ways(read: Callable[[str, str], Document]) -> None:
    """Exactness at 50,000 (the old bound, so the pure path stays quick), on both paths."""
    bound = 50_000
    with mock.patch.object(yamlfile, "MAX_NODES", bound):
        assert len(read(many(bound), "p.yaml").data["metadata"]) == bound - 5
        msg, peak = refused(lambda: read(many(bound + 1), "p.yaml"))
        assert msg == f"p.yaml:2: too many values: a policy may hold at most {bound:,}"
        assert peak < PEAK_BOUND, peak
        block = "version: 1\nmetadata:\n" + "".join(f"  - {i}\n" for i in range(bound))
        with pytest.raises(FileError) as e:
            read(block, "p.yaml")
        assert str(e.value).startswith(f"p.yaml:{3 + bound - 5}: too many values"), str(e.value)


def test_a_file_over_the_byte_bound_is_refused_with_the_line_that_crosses_it(tmp_path: Path) -> None:
    line = "# " + "x" * 1022 + "\n"  # 1 KiB a line
    text = "version: 1\n" + line * (MAX_BYTES // len(line) + 1)
    path = write(tmp_path, "big.yaml", text)
    msg, peak = refused(lambda: load_policy(path))
    crossing = text.encode()[:MAX_BYTES].count(b"\n") + 1
    assert msg.startswith(f"{path}:{crossing}: the file is larger than {MAX_BYTES:,} bytes"), msg
    assert peak < PEAK_BOUND_BYTES, peak
    # multi-byte characters count as bytes: fewer characters than the bound, more bytes
    wide = "version: 1\nmetadata: {a: '" + "é" * (MAX_BYTES // 2) + "'}\n"
    assert len(wide) < MAX_BYTES < len(wide.encode())
    with pytest.raises(FileError, match="larger than"):
        parse_policy(wide, "p.yaml", None)
    assert load("version: 1\n" + "#" * (MAX_BYTES - 12) + "\n", "p.yaml").data == {"version": 1}  # the bound itself


def test_a_huge_file_is_not_read_past_the_bound(tmp_path: Path) -> None:
    """A 4 GiB (sparse) file: refused after reading about the bound, not the file."""
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.write(b"version: 1\nmetadata: {}\n")
        f.truncate(4 << 30)
    msg, peak = refused(lambda: load_policy(str(path)))
    assert msg.startswith(f"{path}:3: the file is larger than"), msg
    assert peak < PEAK_BOUND_BYTES, peak


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("version: 1\nmetadata:\n  n: " + "1" * 5_000 + "\n", 3, "digits"),
        ("version: 1\nmetadata: {taken: 2024-02-30}\n", 2, "day is out of range"),
        ("version: 1\nmetadata:\n  taken: !!timestamp GB\n", 3, "'GB' is not a timestamp"),  # a traceback before
        ("version: 1\nmetadata: {on: !!bool maybe}\n", 2, "'maybe' is not a bool"),
    ],
    ids=["integer-of-5000-digits", "impossible-date", "tagged-timestamp", "tagged-bool"],
)
def test_a_value_python_cannot_hold_is_a_problem_with_its_line(text: str, line: int, words: str) -> None:
    with pytest.raises(FileError) as e:
        parse_policy(text, "p.yaml", None)
    assert str(e.value).startswith(f"p.yaml:{line}: cannot read this value: ") and words in str(e.value)


@pytest.mark.parametrize(
    "path", sorted(POLICIES.glob("*.yaml")) + sorted((POLICIES / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_the_shipped_policies_are_well_inside_the_bounds(path: Path) -> None:
    text = path.read_text()
    doc = load(text, str(path))  # it loads, so it uses no anchor or alias and is not too deep
    assert len(text.encode()) < MAX_BYTES // 1_000
    assert len(doc.lines) < MAX_NODES // 1_000


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("version: 1\nmetadata: {a: \x03}\n", 2, "U+0003 at column 15 is a control character"),
        ("\n\x03", 2, "U+0003 at column 1"),
        ("version: 1\nmetadata: {a: x\ufffe}\n", 2, "U+FFFE at column 16"),
        ("version: 1\ndescription: '\ud800'\n", 2, "U+D800 at column 15"),  # a lone surrogate posted as text
        ('version: 1\ndescription: "\\ud800"\n', 2, "a lone surrogate escape"),  # written as a YAML escape
        ('version: 1\nrules:\n  - {name: "x\\udc00", action: deny}\n', 3, "a lone surrogate escape"),
    ],
    ids=["control", "control-alone", "non-character", "surrogate", "surrogate-escape", "surrogate-in-a-name"],
)
def test_characters_yaml_or_text_cannot_hold_are_a_problem_with_a_line(text: str, line: int, words: str) -> None:
    """Found by fuzzing: these gave a two-line message without a line, or a traceback."""
    with pytest.raises(FileError) as e:
        parse_policy(text, "p.yaml", None)
    assert str(e.value).startswith(f"p.yaml:{line}: ") and words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (bomb(), ":3: YAML anchors and aliases"),  # the report: accepted on reload, 1.1 GB
        ("version: 1\nmetadata: " + "[" * 10_000 + "\n", ":2: too deeply nested"),  # the report: "inotify"
    ],
    ids=["alias-bomb", "deep-nesting"],
)
def test_a_running_gateway_refuses_the_reload_with_file_and_line(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nrules:\n  - {name: everyone, action: allow}\n")
    gw = gateway("--policy", str(path), "--geoip", CITY, "--upstream", stub.url)
    write_by_rename(path, text)
    status, ready = wait_until(
        lambda: (r := get_json(gw.admin + "/readyz"))[1]["policy"]["reload"]["error"] and r, "the refusal reported"
    )
    assert status == 200 and ready["policy"]["reload"]["error"].startswith(f"{path}{problem}")
    assert httpx.get(gw.url + "/v1/models").status_code == 200  # the last good policy still serves
    err = gw.stderr()
    assert "inotify" not in err and "Traceback" not in err and "RecursionError" not in err, err
