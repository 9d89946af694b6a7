"""Operator messages: pydantic's validation errors in plain words, with the line they are on.

A message never repeats the value it is about (a policy can hold a URL with a
password, or a key pasted in the wrong place); it says where (``rules[2].asns[0]``)
and what to write instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from ..yamlfile import Document, Problem


def _fmt_loc(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_ASN_ERRORS = frozenset({"int_parsing", "int_type", "int_from_float", "greater_than_equal", "less_than"})
# pydantic's wording for the errors a policy can have, in plain words.
_PLAIN = {
    "greater_than_equal": "must be {ge} or more",
    "greater_than": "must be more than {gt}",
    "less_than_equal": "must be {le} or less",
    "less_than": "must be less than {lt}",
    "too_short": "must list at least one value (leave the key out to match anything)",
    "string_type": "must be text (put it in quotes)",
    "int_parsing": "must be a whole number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "list_type": "must be a list ([a, b] or one '- item' per line)",
    "dict_type": "must be a mapping (key: value)",
    "model_type": "must be a mapping (key: value)",
    "model_attributes_type": "must be a mapping (key: value)",
}


def plain_error(err: ErrorDetails) -> str:
    """One pydantic error in plain words, never repeating the value (it may be a secret)."""
    if err["type"] == "literal_error":
        return f"must be one of {err.get('ctx', {}).get('expected', '')}"
    if err["type"] == "value_error":
        return str(err.get("ctx", {}).get("error", err["msg"]))
    template = _PLAIN.get(err["type"])
    return template.format(**err.get("ctx", {})) if template else err["msg"]


def validation_problems(doc: Document, err: ValidationError) -> list[Problem]:
    problems = []
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and (p.startswith("function-") or "[" in p))]
        where = _fmt_loc(loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key {loc[-1]!r}" if loc else "unknown key"
            where = _fmt_loc(loc[:-1])
        elif e["type"] == "missing":
            msg = f"missing required key {loc[-1]!r}" if loc else msg
            where = _fmt_loc(loc[:-1])
        elif e["type"] == "literal_error":
            msg = f"{e['input']!r} is not one of {e.get('ctx', {}).get('expected', '')}"
        elif e["type"] == "value_error":
            msg = str(e.get("ctx", {}).get("error", msg))
        elif "asns" in loc and e["type"] in _ASN_ERRORS:
            msg = f"{e['input']!r} is not an AS number: write a whole number from 0 to {2**32 - 1} (4837, not AS4837)"
        else:
            msg = plain_error(e)
        problems.append(Problem(doc.line_of(loc), f"{where}: {msg}" if where else msg))
    return problems
