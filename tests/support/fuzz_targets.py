"""One fuzz target per parser that reads what a client or an operator wrote, each with its invariants.

A target takes bytes and returns nothing; it raises (AssertionError or any
undocumented exception) only when an invariant breaks. Each parser may refuse
input only with its documented error type:

- ``forwarded``: RFC 7239 ``Forwarded`` (:mod:`gateway.forwarded`), ForwardedError.
  A parsed field re-serialises to the same elements, and an element a trusted
  proxy appends (on the same line or its own) is read as the last one, after
  exactly what the client's part parses to alone: a client's broken part never
  becomes readable because something was appended to it.
- ``xff``: the client address behind a trusted proxy (:mod:`gateway.clientip`),
  never an exception. Whatever the client wrote before the proxy's appended hop,
  the client is that hop; a hop read as an address prints and parses back to itself.
- ``path``: the request path (:mod:`gateway.requestpath`), BadPath. The canonical
  form is printable ASCII, absolute, without ``//`` or dot segments, and canonical
  again (idempotent).
- ``model``: the ``model`` of a JSON body (:mod:`gateway.modelfield`), BadBody. An
  accepted body's model is what orjson, Python's json and a Go-style (case-folding)
  decoder all read, its span holds exactly that value, and a rename changes only it.
- ``policy``: a policy file (:mod:`gateway.yamlfile` and the policy compiler),
  FileError, whose every line is ``p.yaml:...``. A policy that loads loads again to
  the same hash.

Used by ``tests/parsers/test_fuzz.py`` (a short, fixed pass) and ``python -m tests.support.fuzz``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import orjson

from gateway import forwarded, modelfield, requestpath
from gateway.cidrs import CidrSet
from gateway.clientip import INVALID, MISSING, PRIVATE, PUBLIC, AddressError, ClientIPConfig, parse_address, resolve
from gateway.policy import parse_policy
from gateway.yamlfile import FileError
from support.json_oracles import go_model, go_v2_fold_name, oracle_model, python_model

Target = Callable[[bytes], None]

PROXY_HOP = "203.0.113.9"  # what a trusted proxy appends: its own peer, an address no trusted range holds
_TRUSTED = CidrSet(["127.0.0.0/8", "10.0.0.0/8", "::1/128"])
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _header(data: bytes) -> str:
    return data.decode("latin-1")  # as the server hands header values to the parsers


def _serialise(elements: list[dict[str, str]]) -> str:
    def value(v: str) -> str:
        return v if _TOKEN.fullmatch(v) else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return ", ".join(";".join(f"{k}={value(v)}" for k, v in e.items()) or ";" for e in elements)


def _parsed(values: list[str]) -> list[dict[str, str]] | None:
    try:
        return forwarded.elements(values)
    except forwarded.ForwardedError:
        return None


def fuzz_forwarded(data: bytes) -> None:
    text = _header(data)
    alone = _parsed([text])
    appended = {"for": PROXY_HOP}
    expected = None if alone is None else [*alone, appended]
    assert _parsed([text + ", for=" + PROXY_HOP]) == expected, "the same line"
    assert _parsed([text, "for=" + PROXY_HOP]) == expected, "a line of its own"
    if alone is not None:
        assert _parsed([_serialise(alone)]) == alone, "round trip"
        try:
            nodes = forwarded.for_nodes([text])
        except forwarded.ForwardedError:
            return
        assert len(nodes) == len(alone)


def fuzz_xff(data: bytes) -> None:
    text = _header(data)
    for header, appended in (("x-forwarded-for", ", " + PROXY_HOP), ("forwarded", ", for=" + PROXY_HOP)):
        config = ClientIPConfig(_TRUSTED, header)
        raw = [(header.encode(), (text + appended).encode("latin-1"))]
        client = resolve("127.0.0.1", raw, config)
        if header == "x-forwarded-for" or client.kind != INVALID:  # Forwarded: a broken field is unreadable
            assert str(client.ip) == PROXY_HOP and client.kind in (PUBLIC, PRIVATE), (header, client)
        alone = resolve("127.0.0.1", [(header.encode(), data)], config)
        assert alone.kind in (PUBLIC, PRIVATE, INVALID, MISSING)
        assert (alone.ip is None) == (alone.kind == INVALID)
        if alone.kind in (PUBLIC, PRIVATE):
            assert alone.ip is not None and alone.ip not in _TRUSTED
    try:
        ip = parse_address(text)
    except AddressError:
        return
    assert parse_address(str(ip)) == ip


def fuzz_path(data: bytes) -> None:
    try:
        path = requestpath.canonical(data)
    except requestpath.BadPath:
        return
    assert path.startswith("/") and path.isascii() and path.isprintable() and " " not in path, path
    assert "//" not in path and "\\" not in path, path
    assert not any(seg.split(";", 1)[0] in (".", "..") for seg in path.split("/")), path
    assert requestpath.canonical(path.encode()) == path, "idempotent"


def fuzz_model(data: bytes) -> None:
    try:
        field = modelfield.read_model(data)
    except modelfield.BadBody as e:
        assert e.message and e.message.isprintable()
        return
    expected = oracle_model(data)
    assert field.model == expected == python_model(data) == go_model(data) == go_model(data, go_v2_fold_name)
    if field.model is None:
        assert (field.start, field.end) == (-1, -1)
        return
    assert orjson.loads(data[field.start : field.end]) == field.model
    renamed = modelfield.rename(data, field, "x\u00e9\"'")
    assert json.loads(renamed) == {**json.loads(data), "model": "x\u00e9\"'"}
    assert modelfield.read_model(renamed).model == "x\u00e9\"'"


def fuzz_policy(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        policy = parse_policy(text, "p.yaml", None)
    except FileError as e:
        assert e.filename == "p.yaml" and e.problems
        assert all(line.startswith("p.yaml") for line in str(e).split("\n") if line), str(e)
        return
    assert parse_policy(text, "p.yaml", None).sha256 == policy.sha256


# name: (target, runs in the test suite's short pass, largest input libFuzzer makes)
TARGETS: dict[str, tuple[Target, int, int]] = {
    "forwarded": (fuzz_forwarded, 3000, 256),
    "xff": (fuzz_xff, 3000, 256),
    "path": (fuzz_path, 3000, 256),
    "model": (fuzz_model, 3000, 1024),
    "policy": (fuzz_policy, 500, 4096),
}
