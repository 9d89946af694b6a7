"""The YAML fast path (libyaml's events) against the definition (PyYAML's pure-Python composer).

:func:`gateway.yamlfile.load` must give exactly what :func:`load_pure` gives:
the same values, the same line for every path, or the same error, byte for
byte. Checked on the shipped policies, the fuzz corpus, and generated texts:
policy-like documents in block and flow style, then broken by splicing in the
things the fast path must leave alone (anchors, aliases, tags, duplicate and
non-scalar keys, tabs, stray colons and brackets, control characters,
surrogate escapes, odd line breaks, a second document), also under small
bounds so that a bound crossed by the fast path is worded and placed as the
pure path places it.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import yamlfile
from gateway.yamlfile import FileError, fast, load, load_pure
from support.processes import POLICIES

CORPUS = Path(__file__).parent.parent / "fuzz_corpus" / "policy"
FILES = sorted(POLICIES.glob("*.yaml")) + sorted((POLICIES / "examples").glob("*.yaml")) + sorted(CORPUS.iterdir())


def outcome(read: object, text: str) -> object:
    """The document's values and lines, or the error's text."""
    assert callable(read)
    try:
        doc = read(text, "p.yaml")
    except FileError as e:
        return str(e)
    return (doc.data, doc.lines)


def same(text: str) -> object:
    got = outcome(load, text)
    assert got == outcome(load_pure, text), text
    return got


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_the_shipped_policies_and_the_fuzz_corpus_read_the_same_both_ways(path: Path) -> None:
    text = path.read_bytes().decode("utf-8", "replace")
    got = same(text)
    if not isinstance(got, str):  # a file that loads is the fast path's to read
        assert fast(text) == got


def test_without_libyaml_the_pure_path_reads_every_file() -> None:
    text = (POLICIES / "openai-supported.yaml").read_text()
    with mock.patch.object(yamlfile, "_CParser", None):
        assert fast(text) is None
        assert outcome(load, text) == outcome(load_pure, text)


scalars = st.one_of(
    st.sampled_from(["GB", "NO", "yes", "on", "true", "False", "null", "~", "", "1_000", "0x1F", "0o17", "1e3"]),
    st.sampled_from([".nan", "-.inf", "2024-02-29", "2024-02-30", "2001-12-14t21:59:43.10-05:00", "10.0.0.0/8"]),
    st.sampled_from(["2001:db8::/32", "a: b", "#x", "'q'", "é", "\u2028", "<<", "=", "9" * 5_000]),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.text(st.characters(codec="utf-8"), max_size=8),
)
keys = st.one_of(st.sampled_from(["version", "rules", "name", "cidrs", "action", "countries", "1", "true"]), scalars)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=30,
)
splices = st.sampled_from(
    [
        "&a ",
        "*a",
        "!!str ",
        "!!binary ",
        "!x ",
        "!!timestamp ",
        "<<: ",
        "\t",
        ": ",
        "- ",
        "[",
        "]",
        "{",
        "}",
        ",",
        "'",
        '"',
        "#",
        "\n",
        "\r\n",
        "\r",
        "\x85",
        "\u2028",
        "\ufeff",
        "\x03",
        "\ufffe",
        '"\\ud800"',
        "\n---\n",
        "\n...\n",
        "%YAML 1.1\n",
        "? ",
        "|\n  x\n",
        ">-\n  y\n",
        "{a: 1, a: 2}",
        "[[a]]: 1",
        "{[1]: 2}",
        "1: x\n1: y\n",
        "true: 1\n1: 2\n",
        "\n  " * 3,
        " " * 5,
    ]
)


@st.composite
def texts(draw: st.DrawFn) -> str:
    data = draw(documents)
    text = yaml.safe_dump(
        data, default_flow_style=draw(st.sampled_from([None, True, False])), allow_unicode=draw(st.booleans())
    )
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(splices) + text[at:]
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts())
def test_generated_texts_read_the_same_both_ways(text: str) -> None:
    same(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts(), st.integers(1, 12), st.integers(1, 4))
def test_a_bound_crossed_by_the_fast_path_is_worded_and_placed_as_the_pure_path_does(
    text: str, nodes: int, depth: int
) -> None:
    with mock.patch.object(yamlfile, "MAX_NODES", nodes), mock.patch.object(yamlfile, "MAX_DEPTH", depth):
        same(text)


def test_the_fast_path_reads_plain_data_and_leaves_the_rest() -> None:
    plain = "version: 1\nrules:\n  - {name: a, cidrs: [10.0.0.0/8], action: deny}\n  - name: b\n    action: allow\n"
    assert fast(plain) is not None
    for unusual in ["&a 1", "*a", "!!str 1", "{a: 1, a: 2}", "2024-02-30", '"\\ud800"', "1\n---\n2", "[\n", "\t1"]:
        assert fast(f"version: 1\nmetadata: {unusual}\n") is None, unusual
    assert fast("") is None and fast("# only a comment\n") is None
