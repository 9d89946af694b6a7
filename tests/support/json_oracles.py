"""Three readers of a JSON body's top-level ``model``, as oracles for gateway.modelfield.

orjson and Python's json read keys exactly; the third reads them the way Go's
encoding/json fills a struct, case-insensitively. Shared by the property tests
(test_modelfield) and the fuzz harness (fuzz_targets).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# A Go-style decoder: encoding/json filling struct{ Model string `json:"model"` }.
#
# decode.go matches an object key to a field by its exact name, else by foldName
# (fold.go, Go 1.21 and later): ASCII a-z upper-cased, any other rune replaced by
# the smallest rune of its unicode.SimpleFold orbit. The only non-ASCII runes whose
# orbit holds an ASCII letter are the Kelvin sign (K, k, U+212A) and the long s
# (S, s, U+017F); U+0130 and U+0131, the dotted and dotless I, fold to themselves
# (Go's own simpleFoldTests).
# Other non-ASCII runes stay non-ASCII, so they can never equal an ASCII field
# name, which is all this decoder compares against. Go before 1.21 (equalFold,
# simpleLetterEqualFold for a name of letters without k or s) matches the same keys.
# Each matching key assigns the field in turn (the last one wins), a null leaves it
# as it was, and a value of another type is an UnmarshalTypeError (no model).

GO_FOLDS_TO_ASCII = {0x212A: "K", 0x017F: "S"}


def go_fold_name(name: str) -> str:
    out = []
    for ch in name:
        if ch.isascii():
            out.append(ch.upper() if "a" <= ch <= "z" else ch)
        else:
            out.append(GO_FOLDS_TO_ASCII.get(ord(ch), ch))
    return "".join(out)


def go_v2_fold_name(name: str) -> str:
    """json/v2's case-insensitive matching (``case:ignore``): as v1, also ignoring ``_`` and ``-``."""
    return go_fold_name(name.replace("_", "").replace("-", ""))


class _Object(list[tuple[str, Any]]):
    """An object as its pairs, in order, repeats kept (what a streaming decoder sees)."""


def go_model(body: bytes, fold: Any = go_fold_name) -> str | None:
    top = json.loads(body, object_pairs_hook=_Object)
    model: str | None = None
    for key, value in top:
        if key == "model" or fold(key) == fold("model"):
            if isinstance(value, str):
                model = value
            elif value is not None:
                return None  # UnmarshalTypeError: the request fails, no model is used
    return model


def python_model(body: bytes) -> str | None:
    value = json.loads(body).get("model")
    return value if isinstance(value, str) else None


def is_variant(key: str) -> bool:
    """A key some decoder reads as ``model`` that is not ``model`` itself."""
    return key != "model" and "MODEL" in (go_fold_name(key), go_v2_fold_name(key))


def variants_at_top(body: bytes) -> list[str]:
    """The top-level keys the gateway refuses: variants of ``model``, and keys a C-string decoder cuts at a NUL."""
    return [key for key, _ in json.loads(body, object_pairs_hook=_Object) if is_variant(key) or "\x00" in key]


def oracle_model(body: bytes) -> str | None:
    value = orjson.loads(body).get("model")
    return value if isinstance(value, str) else None
