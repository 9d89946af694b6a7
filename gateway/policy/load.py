"""Loading a policy: the only place in :mod:`gateway.policy` that touches a file.

:func:`load_policy` reads a file; :func:`parse_policy` turns its text into a
compiled :class:`~.compiled.Policy` (YAML, schema, compilation checks) and
stamps it with the text's SHA-256. Every problem found in one pass is raised
together as a :class:`~gateway.yamlfile.FileError`.
"""

from __future__ import annotations

import dataclasses
import hashlib

from pydantic import ValidationError

from ..yamlfile import FileError, Problem
from ..yamlfile import load as load_yaml
from ..yamlfile import read as read_yaml
from .compile import compile_policy, salvaged_problems
from .compiled import Policy
from .messages import validation_problems
from .provenance import source_problems
from .schema import PolicySpec


def load_policy(path: str, capabilities: frozenset[str] | None = None) -> Policy:
    """Read, validate and compile a policy file. Raises :class:`FileError`."""
    return parse_policy(read_yaml(path), path, capabilities)


def parse_policy(text: str, filename: str, capabilities: frozenset[str] | None = None) -> Policy:
    """Validate and compile policy text. ``capabilities`` are the geo facts the
    configured sources provide; ``None`` skips that check (schema-only use)."""
    doc = load_yaml(text, filename)
    if not isinstance(doc.data, dict):
        raise FileError(filename, [Problem(doc.line_of(()), "a policy must be a mapping at the top level")])
    try:
        spec = PolicySpec.model_validate(doc.data)
    except ValidationError as e:
        problems = validation_problems(doc, e) + salvaged_problems(doc, capabilities)
        raise FileError(filename, sorted(problems, key=lambda p: p.line or 0)) from None
    sources = source_problems(spec, doc)
    try:
        policy = compile_policy(spec, doc, capabilities)
    except FileError as e:  # every problem at once: the compiler's and the sources'
        raise FileError(filename, sorted([*e.problems, *sources], key=lambda p: p.line or 0)) from None
    if sources:
        raise FileError(filename, sorted(sources, key=lambda p: p.line or 0))
    return dataclasses.replace(policy, sha256=hashlib.sha256(text.encode()).hexdigest())
