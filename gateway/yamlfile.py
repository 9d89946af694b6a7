"""YAML that remembers where each value was written.

A compliance owner who mistypes a country code needs "policy.yaml:14", not a
Python traceback. PyYAML's parser knows the line of every value, so the
document is built here recording the line of each value under its path
(``("rules", 3, "countries", 1)``); validation errors, which also speak in
paths, are then turned back into lines.

Two paths build the same document. :func:`load_pure` composes PyYAML's
pure-Python node tree: the definition, and the words of every error.
:func:`load` builds from libyaml's parser events (:func:`fast`), about 6x
faster and without a node tree, and leaves to the pure path every file that
holds anything but plain data or that libyaml and PyYAML might read
differently (a fast-tier differential test, tests/policy/test_yaml_fast.py,
holds the two to the same values, lines and errors).

Booleans follow YAML 1.2 (``true``/``false`` only): under YAML 1.1 rules
``countries: [NO]`` would be ``[False]``, and Norway would be dropped from a
policy by its own country code.

Duplicate keys are an error: PyYAML would keep the last one silently, and a
policy with two ``rules:`` keys would lose half its rules.

A policy file is bounded before it is built, since it may come from a volume
or an admin request and is parsed by a running gateway: anchors and aliases
are refused (a policy needs none, and nine nested aliases in a 522-byte file
expand to about a billion values, 1.1 GB), and so are more than
:data:`MAX_BYTES`, more than :data:`MAX_NODES` values and nesting deeper than
:data:`MAX_DEPTH`, each with the line where the limit was crossed. Both
paths check each node before they descend, so nothing is expanded,
recursed into or held past a limit: a refused file costs at most what
:data:`MAX_NODES` values or :data:`MAX_BYTES` of YAML cost to read (the
figures are beside the bounds).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

Path = tuple[str | int, ...]
_T = TypeVar("_T")

# Sized for policies of 100,000 rules: a one-CIDR rule (``- {name: block-1, cidrs: [...],
# action: deny}``) is 8 values and about 65 bytes, so 100,000 of them are 800,000 values and
# 6.5 MB. The fast path costs about 160 bytes and 7 µs of CPU a value (a flat list; measured
# on a busy 2-core machine), up to about 380 bytes where every value is 31 levels deep (its
# path, a 32-item tuple, is the line map's key). So the worst file the bounds let through, a
# million values 31 levels deep (2 MB of ``[[[...1,1,1...]]]``), costs about 400 MB and 8 s
# to read or to refuse; 16 MiB is the most held as text (48 MiB at peak while counting
# bytes). A file the fast path leaves to the pure one costs the pure parser's time first
# (about 10x, with nothing kept: :func:`_walk`), and the node tree (about 800 bytes a value)
# only when it holds no parse-time refusal. 32 levels keep the composer's recursion (three
# Python frames a level) far from Python's limit of 1,000.
MAX_BYTES = 16 << 20
MAX_NODES = 1_000_000
MAX_DEPTH = 32


class _Limit(Exception):
    """A bound crossed while composing: the line (1-based) and what to say."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (``yes``, ``no``, ``on``, ``off`` stay strings), no
    anchors or aliases, and at most :data:`MAX_NODES` values nested :data:`MAX_DEPTH` deep."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        self._nodes, self._depth = _count(event, self._nodes, self._depth)
        try:
            return super().compose_node(parent, index)
        finally:
            if isinstance(event, yaml.CollectionStartEvent):
                self._depth -= 1


def _count(event: Any, nodes: int, depth: int) -> tuple[int, int]:
    """The bounds' checks for one node's first event, in the composer's order; the new counts."""
    line = event.start_mark.line + 1
    if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
        raise _Limit(line, "YAML anchors and aliases (&name, *name) are not allowed in a policy; write the values out")
    nodes += 1
    if nodes > MAX_NODES:
        raise _too_many(line)
    if isinstance(event, yaml.CollectionStartEvent):
        depth += 1
        if depth > MAX_DEPTH:
            raise _too_deep(line)
    return nodes, depth


def _too_many(line: int) -> _Limit:
    return _Limit(line, f"too many values: a policy may hold at most {MAX_NODES:,}")


def _too_deep(line: int) -> _Limit:
    return _Limit(line, f"too deeply nested: a policy may nest lists and mappings at most {MAX_DEPTH} deep")


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


@dataclass(frozen=True, slots=True)
class Problem:
    line: int | None
    message: str


class FileError(Exception):
    """One or more problems in one file; ``str()`` is ``file:line: problem`` per line."""

    def __init__(self, filename: str, problems: Sequence[Problem]) -> None:
        self.filename = filename
        self.problems = tuple(problems)
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(
            f"{self.filename}:{p.line}: {p.message}" if p.line else f"{self.filename}: {p.message}"
            for p in self.problems
        )


@dataclass
class Document:
    """Plain Python data plus the line each path came from."""

    filename: str
    data: Any
    lines: dict[Path, int] = field(default_factory=dict)

    def line_of(self, path: Sequence[str | int]) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get(())


class _Builder:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.lines: dict[Path, int] = {}
        self.problems: list[Problem] = []
        self._scalars = _Loader("")

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.build(key_node, (*path, "<key>"))
                if not isinstance(key, str | int | bool | float) and key is not None:
                    self.problems.append(Problem(key_node.start_mark.line + 1, "mapping keys must be plain scalars"))
                    continue
                if key in out:
                    first = self.lines.get((*path, key)) if isinstance(key, str | int) else None
                    self.problems.append(
                        Problem(
                            key_node.start_mark.line + 1,
                            f"duplicate key {key!r} (first at line {first})",
                        )
                    )
                    continue
                child = (*path, key) if isinstance(key, str | int) else path
                out[key] = self.build(value_node, child)
                self.lines[child] = key_node.start_mark.line + 1
            self.lines.pop((*path, "<key>"), None)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        try:
            value = self._scalars.construct_object(node, deep=True)
        except ValueError as e:  # PyYAML resolved it, Python refuses it: 5,000 digits, 2024-02-30
            self.problems.append(Problem(node.start_mark.line + 1, f"cannot read this value: {e}"))
            return None
        except (KeyError, AttributeError):  # an explicit tag PyYAML's constructor cannot apply: !!bool x, !!timestamp x
            kind = str(node.tag).rsplit(":", 1)[-1]
            self.problems.append(
                Problem(node.start_mark.line + 1, f"cannot read this value: {node.value!r} is not a {kind}")
            )
            return None
        if isinstance(value, str) and not value.isascii() and _SURROGATE.search(value):
            # "\ud800" in a double-quoted scalar: not text, and it would break every log line and label it reached
            self.problems.append(
                Problem(node.start_mark.line + 1, "a lone surrogate escape (\\uD800-\\uDFFF) is not text")
            )
            return None
        return value


def read(path: str) -> str:
    """A policy file's text, read no further than a too-large file needs to be told. Raises :class:`FileError`."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(MAX_BYTES + 1)  # characters: at least as many bytes, so enough to tell
    except (OSError, UnicodeDecodeError) as e:
        raise FileError(path, [Problem(None, f"cannot read policy: {e}")]) from None


def _too_large(text: str) -> Problem | None:
    head = text[: MAX_BYTES + 1].encode("utf-8", "surrogatepass")  # a lone surrogate is YAML's to refuse
    if len(head) <= MAX_BYTES:
        return None
    return Problem(
        head[:MAX_BYTES].count(b"\n") + 1,
        f"the file is larger than {MAX_BYTES:,} bytes, the most a policy may be (this line crosses it)",
    )


def load(text: str, filename: str) -> Document:
    """Parse one YAML document. Raises :class:`FileError` with line numbers.

    libyaml's events build the document when they can (:func:`fast`). Anything
    else is :func:`load_pure`'s to answer, the definition, so every message
    stays its own; a refusal it finds while parsing (a syntax error, an anchor,
    a bound) is first looked for by its own parser without its node tree
    (:func:`_walk`), which a large file would make cost about 800 bytes a value.
    """
    too_large = _too_large(text)
    if too_large is not None:
        raise FileError(filename, [too_large])
    built = _parsed(text, filename, fast)
    if built is not None:
        return Document(filename, built[0], built[1])
    _parsed(text, filename, _walk)
    return load_pure(text, filename)


def load_pure(text: str, filename: str) -> Document:
    """:func:`load` by PyYAML's pure-Python composer and a node tree: the definition, and every error's words."""
    too_large = _too_large(text)
    if too_large is not None:
        raise FileError(filename, [too_large])
    root = _parsed(text, filename, lambda text: yaml.compose(text, Loader=_Loader))
    if root is None:
        raise FileError(filename, [Problem(None, "the file is empty")])
    builder = _Builder(filename)
    try:
        data = builder.build(root, ())
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        raise FileError(filename, [Problem(mark.line + 1 if mark else None, str(e.problem))]) from None
    if builder.problems:
        raise FileError(filename, builder.problems)
    return Document(filename, data, builder.lines)


def _parsed(text: str, filename: str, parse: Callable[[str], _T]) -> _T:
    """``parse(text)``, its refusals (a bound, PyYAML's errors) as :class:`FileError`."""
    try:
        return parse(text)
    except _Limit as e:
        raise FileError(filename, [Problem(e.line, e.message)]) from None
    except yaml.MarkedYAMLError as e:
        raise FileError(filename, [syntax_problem(text, e)]) from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow, anywhere in the file
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise FileError(
            filename,
            [
                Problem(
                    line,
                    f"U+{e.character:04X} at column {column} is a control character or a non-character, "
                    "which YAML does not allow",
                )
            ],
        ) from None
    except yaml.YAMLError as e:
        raise FileError(filename, [Problem(None, f"YAML error: {e}")]) from None


def _walk(text: str) -> None:
    """What composing ``text`` by :class:`_Loader` would refuse first, found from its events alone.

    The composer's checks in the composer's order (:func:`_count` per node, the
    parser's errors as they come), with nothing kept: a refused file of a
    million values costs the pure parser's time but not a million nodes. It
    stops at a second document, whose error :func:`load_pure` words.
    """
    loader = _Loader(text)
    nodes = depth = documents = 0
    try:
        while not loader.check_event(yaml.StreamEndEvent):
            event = loader.get_event()  # type: ignore[no-untyped-call]
            if isinstance(event, yaml.NodeEvent):
                nodes, depth = _count(event, nodes, depth)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    return
    finally:
        loader.dispose()


_SURROGATE = re.compile("[\ud800-\udfff]")
_OPENERS = {"while parsing a flow sequence": "[", "while parsing a flow mapping": "{"}


def syntax_problem(text: str, e: yaml.MarkedYAMLError) -> Problem:
    """A YAML syntax error at the line where the mistake is, in an editor's words.

    PyYAML reports where it *noticed* a problem, which for the commonest
    mistakes is a line or more after it: an unclosed ``[`` or quote is noticed
    where the next token does not fit, and a key without ``: `` is read as
    text running on to the next line, where the next ``:`` is refused.
    """
    mark = e.problem_mark or e.context_mark
    if mark is None:
        return Problem(None, f"YAML syntax error: {e.problem or e.context}")
    line, col = mark.line + 1, mark.column + 1
    ctx = e.context_mark
    problem = str(e.problem or e.context)
    if e.context in _OPENERS and ctx is not None:
        opener = _OPENERS[str(e.context)]
        where = f"line {line}, column {col}" if ctx.line + 1 != line else f"column {col}"
        return Problem(
            ctx.line + 1,
            f"YAML syntax error: the '{opener}' at column {ctx.column + 1} is not closed "
            f"(at {where}: {problem.replace('<', '').replace('>', '')})",
        )
    if e.context == "while scanning a quoted scalar" and ctx is not None:
        return Problem(ctx.line + 1, f"YAML syntax error: the quote at column {ctx.column + 1} is not closed")
    if "'\\t'" in problem:  # "found character '\\t' that cannot start any token"
        return Problem(line, f"YAML syntax error: a tab at column {col}; YAML indents with spaces only")
    if problem == "mapping values are not allowed here":
        return _colon_problem(text, line, col)
    if problem.startswith("expected <block end>"):
        source = text.splitlines()[line - 1] if line <= len(text.splitlines()) else ""
        if re.match(r"^\s*-[^\s-]", source):
            return Problem(line, f"YAML syntax error: a list item needs a space after '-' (column {col})")
        opened = f" that starts at line {ctx.line + 1}" if ctx is not None else ""
        return Problem(
            line,
            f"YAML syntax error: bad indentation at column {col}: this line does not line up with the block{opened}",
        )
    return Problem(line, f"YAML syntax error: {problem} (column {col})")


def _colon_problem(text: str, line: int, col: int) -> Problem:
    """A ':' where a key cannot be: find the text it was read as part of."""
    loader = _Loader(text)
    seen: list[yaml.Token] = []
    try:
        while loader.check_token():
            seen.append(loader.get_token())  # type: ignore[no-untyped-call]
    except yaml.MarkedYAMLError:
        pass
    tokens = seen + list(loader.tokens)
    last = tokens[-1] if tokens else None
    if isinstance(last, yaml.ScalarToken) and last.start_mark.line + 1 < line:
        start = last.start_mark.line + 1
        if len(tokens) > 1 and isinstance(tokens[-2], yaml.ValueToken):
            return Problem(
                line,
                f"YAML syntax error: this line is indented more than the key it follows, so it was read as "
                f"the rest of the value begun on line {start}, and its ':' (column {col}) is not allowed there",
            )
        return Problem(
            start,
            f"YAML syntax error: no ': ' after the key on this line (a key needs a colon and a space), "
            f"so it was read as text running on to line {line}, where a ':' (column {col}) is not allowed",
        )
    return Problem(
        line,
        f"YAML syntax error: a ':' at column {col} where none is allowed (quote a value that contains ': ')",
    )


# --- the fast path: libyaml's events, no node tree ---------------------------------------------


def _libyaml_parser() -> Any:
    try:
        from yaml import cyaml
    except ImportError:  # PyYAML built without libyaml: the pure path reads every file
        return None
    return getattr(cyaml, "CParser", None)


_CParser: Any = _libyaml_parser()
_RESOLVERS = _Loader.yaml_implicit_resolvers
_STR = "tag:yaml.org,2002:str"
# The scalar types a policy uses. Any other tag (merge ``<<``, ``=``, binary) goes the pure way.
_SCALARS = _Loader("")
_CONSTRUCT = {
    tag: _SCALARS.yaml_constructors[tag]
    for tag in (
        "tag:yaml.org,2002:null",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:timestamp",
    )
}
# Line breaks and a byte-order mark where libyaml's marks could differ from PyYAML's Reader, and
# tabs, which libyaml takes as blanks where PyYAML refuses them (``[\t]``): rare in a policy, so
# such a file simply goes the pure way.
_UNUSUAL_TEXT = re.compile("[\t\x85\u2028\u2029\ufeff]")


class _Fallback(Exception):
    """Something the fast path leaves to :func:`load_pure`: an error, an anchor, a tag, a duplicate key."""


def fast(text: str) -> tuple[Any, dict[Path, int]] | None:
    """The document and its line map from libyaml's parser events, or None where :func:`load_pure` must answer.

    It builds the same values and the same lines as :class:`_Builder` does from
    the node tree, without the tree: PyYAML's pure-Python composer is about 5x
    the time of the whole fast path, and a composed node about 800 bytes. It
    answers only plain data it is sure of; for anything else (any parser error,
    an anchor, an alias, a tag, a key that is not a scalar or repeats, a value
    Python cannot hold, a lone surrogate, an empty file or a second document,
    characters PyYAML's Reader refuses) it returns None. The bounds are its own
    to enforce, with :func:`load_pure`'s words and line (raising :class:`_Limit`),
    since reading a file over them again by the pure path would cost what they
    exist to prevent.
    """
    if _CParser is None or yaml.reader.Reader.NON_PRINTABLE.search(text) or _UNUSUAL_TEXT.search(text):
        return None
    events = _Events(text)
    try:
        data = events.document()
    except _Fallback:
        return None
    except _Limit:
        raise
    except Exception:  # any error of libyaml's or a constructor's: the pure path words it
        return None
    finally:
        events.parser.dispose()
    return data, events.lines


class _Events:
    """One pass over libyaml's events, building values as :class:`_Builder` does from nodes."""

    def __init__(self, text: str) -> None:
        self.parser = _CParser(text)
        self.next = self.parser.get_event
        self.lines: dict[Path, int] = {}
        self.nodes = 0
        self.depth = 0
        self.flow = 0  # how many of the enclosing collections are flow ([...], {...})

    def document(self) -> Any:
        if type(self.next()) is not yaml.StreamStartEvent or type(self.next()) is not yaml.DocumentStartEvent:
            raise _Fallback  # an empty file
        data = self.value(self.next(), ())
        if type(self.next()) is not yaml.DocumentEndEvent or type(self.next()) is not yaml.StreamEndEvent:
            raise _Fallback  # a second document
        return data

    def value(self, event: Any, path: Path) -> Any:
        # The same order of checks as _Loader.compose_node: anchors, then the count, then the depth.
        if event.anchor is not None:  # an AliasEvent's anchor is its name
            raise _Fallback
        # _count's checks, inlined: a third of this path's time went to its isinstance calls
        line = self.lines[path] = event.start_mark.line + 1
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _too_many(line)
        kind = type(event)
        if kind is yaml.ScalarEvent:
            return self.scalar(event)
        if kind is not yaml.SequenceStartEvent and kind is not yaml.MappingStartEvent:
            raise _Fallback
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _too_deep(line)
        if event.tag is not None:
            raise _Fallback
        flow = bool(event.flow_style)
        self.flow += flow
        out = self.sequence(path) if kind is yaml.SequenceStartEvent else self.mapping(path)
        self.flow -= flow
        self.depth -= 1
        return out

    def sequence(self, path: Path) -> list[Any]:
        out: list[Any] = []
        nxt, value, end = self.next, self.value, yaml.SequenceEndEvent
        while type(event := nxt()) is not end:
            out.append(value(event, (*path, len(out))))
        return out

    def mapping(self, path: Path) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        nxt, value, lines, end = self.next, self.value, self.lines, yaml.MappingEndEvent
        at_key = (*path, "<key>")
        while type(event := nxt()) is not end:
            if type(event) is not yaml.ScalarEvent:
                raise _Fallback  # a key that is a list or mapping: the pure path says so
            key = value(event, at_key)
            if (not isinstance(key, str | int | bool | float) and key is not None) or key in out:
                raise _Fallback  # the pure path words these problems
            child = (*path, key) if isinstance(key, str | int) else path
            out[key] = value(nxt(), child)
            lines[child] = lines[at_key]  # the key's line, as _Builder records it
        lines.pop(at_key, None)
        return out

    def scalar(self, event: Any) -> Any:
        if event.tag is not None:
            raise _Fallback
        text: str = event.value
        if event.implicit[0]:  # plain: resolved as _Loader resolves it
            if not text or (self.flow and "?" in text):
                # An empty value (``key:``) is placed by the next token, which libyaml and PyYAML
                # can mark on different lines ("? " at the end); libyaml reads [a? b] as one
                # value, PyYAML refuses it.
                raise _Fallback
            for tag, regexp in _RESOLVERS.get(text[:1] if text else "", ()):
                if regexp.match(text):
                    if tag == _STR:
                        break
                    construct = _CONSTRUCT.get(tag)
                    if construct is None:
                        raise _Fallback
                    return construct(_SCALARS, yaml.ScalarNode(tag, text))
        if not text.isascii() and _SURROGATE.search(text):
            raise _Fallback
        return text
