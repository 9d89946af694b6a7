"""YAML that remembers where each value was written.

A compliance owner who mistypes a country code needs "policy.yaml:14", not a
Python traceback. PyYAML's composer already knows the line of every node, so
the document is built from the node tree here, recording the line of each
value under its path (``("rules", 3, "countries", 1)``); validation errors,
which also speak in paths, are then turned back into lines.

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
:data:`MAX_DEPTH`, each with the line where the limit was crossed. The
composer checks each node before it descends, so nothing is expanded,
recursed into or held past a limit: a refused file costs at most what
:data:`MAX_BYTES` of YAML costs to read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]

# The shipped policies are 3 to 4 KB, about 400 values, 4 levels deep. The bounds leave
# a hand-written policy hundreds of times that room, and keep a refused one cheap: 50,000
# composed values cost about 40 MB, and 32 levels keep the composer's recursion (three
# Python frames a level) far from Python's limit of 1,000.
MAX_BYTES = 1 << 20
MAX_NODES = 50_000
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
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Limit(
                line,
                "YAML anchors and aliases (&name, *name) are not allowed in a policy; write the values out",
            )
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Limit(line, f"too many values: a policy may hold at most {MAX_NODES:,}")
        if not isinstance(event, yaml.CollectionStartEvent):
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Limit(line, f"too deeply nested: a policy may nest lists and mappings at most {MAX_DEPTH} deep")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


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
    """Parse one YAML document. Raises :class:`FileError` with line numbers."""
    too_large = _too_large(text)
    if too_large is not None:
        raise FileError(filename, [too_large])
    try:
        root = yaml.compose(text, Loader=_Loader)
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
