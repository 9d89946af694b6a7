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
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: ``yes``, ``no``, ``on``, ``off`` stay strings."""


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
        return self._scalars.construct_object(node, deep=True)


def load(text: str, filename: str) -> Document:
    """Parse one YAML document. Raises :class:`FileError` with line numbers."""
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        col = f" (column {mark.column + 1})" if mark else ""
        raise FileError(filename, [Problem(line, f"YAML syntax error: {e.problem or e.context}{col}")]) from None
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
