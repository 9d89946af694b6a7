"""The dependency rule of gateway/, read from the source and enforced.

The package has three planes and the wiring that builds a process from them:

* decisions: ``gateway.policy`` (schema, compiled form, ``decide``), beside the address modules
  it reads (clientip, cidrs, forwarded, trust, geo, ...): pure, no sockets, no Redis;
* bytes: ``gateway.dataplane`` (server, relay, pool, failover, bodyhold, limits, health);
* the join: ``gateway.proxy``, the request path, which asks the policy and moves the bytes.

The rule:

1. ``gateway.policy`` imports nothing, directly or through other modules, from
   ``gateway.dataplane``, ``gateway.proxy``, ``gateway.shared``, ``gateway.live``, the control
   plane (``gateway.control``) or the
   wiring (``gateway.cli``, ``gateway.server``, ``gateway.runtime``).
2. ``gateway.dataplane`` imports nothing, directly or through other modules, from
   ``gateway.policy``, ``gateway.proxy``, the control plane or the wiring.
3. Only the join imports both planes directly: a module that imports from ``gateway.policy``
   and from ``gateway.dataplane`` is ``gateway.proxy`` (or inside it), or is process wiring:
   ``gateway.runtime`` (builds the running objects from the options), ``gateway.server``
   (starts the planes), ``gateway.cli`` and ``gateway.control``; and ``gateway.authz``, the
   decision service, which is the request path's judging answered to another proxy (it
   subclasses ``gateway.proxy``'s Gateway and serves on the data plane's listener).
4. No import circle anywhere in gateway/.
5. ``gateway.evidence`` (the audit chain's entries and verification, the report built from them)
   imports nothing, directly or through other modules, from ``gateway.dataplane``, ``gateway.authz``,
   ``gateway.proxy``, ``gateway.shared``, ``gateway.live``, the control plane or the wiring: an
   exported file is verified offline, without Redis or a running gateway, so the code that checks
   the evidence cannot lean on the code that wrote it. Redis is read in ``gateway.shared.audit``
   and handed over by the CLI.
6. ``gateway.usage`` (token usage read from a request's and a response's bytes, and estimated)
   imports nothing, directly or through other modules, from ``gateway.policy``,
   ``gateway.dataplane``, ``gateway.proxy``, ``gateway.shared``, ``gateway.live``,
   ``gateway.authz``, the control plane or the wiring: it is bytes in, numbers out, so the
   policy and the request path can both use it, and the relay takes it through a Protocol of
   its own (``gateway.dataplane.relay.BodyTap``).

What counts as an import: every ``import`` and ``from ... import`` at module level, including
those under ``if TYPE_CHECKING:`` and in ``try`` blocks (a circle that only the type checker
sees still ties the modules together), but not those inside a function or a class body,
which run late and on purpose. ``from .a import b`` is an import of ``gateway.a.b`` when that
is a module, else of ``gateway.a``. Importing a submodule is not counted as importing its
package's ``__init__``, which would make every package that re-exports its modules a circle.

A short AST reading rather than import-linter's contracts: no new dependency, the rule reads as
plain Python beside its reasons, and the self-tests below plant each kind of violation in a
synthetic package, so the checker cannot silently pass.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

from support.processes import ROOT

CONTROL = ("gateway.control",)
WIRING = ("gateway.cli", "gateway.server", "gateway.runtime")
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "gateway.policy": (
        "gateway.dataplane",
        "gateway.proxy",
        "gateway.shared",
        "gateway.live",
        "gateway.authz",
        *CONTROL,
        *WIRING,
    ),
    "gateway.dataplane": ("gateway.policy", "gateway.proxy", "gateway.authz", *CONTROL, *WIRING),
    # Token usage read from bytes (issue 19): pure, so the policy and the request path can both use it.
    "gateway.usage": (
        "gateway.policy",
        "gateway.dataplane",
        "gateway.proxy",
        "gateway.shared",
        "gateway.live",
        "gateway.authz",
        *CONTROL,
        *WIRING,
    ),
    "gateway.evidence": (
        "gateway.dataplane",
        "gateway.proxy",
        "gateway.authz",
        "gateway.shared",
        "gateway.live",
        *CONTROL,
        *WIRING,
    ),
}
DECISIONS, BYTES = "gateway.policy", "gateway.dataplane"
JOINERS = ("gateway.proxy", "gateway.authz", *WIRING, *CONTROL)


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def modules(package: Path) -> dict[str, Path]:
    """Every module of the package rooted at ``package``, by dotted name."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def module_level(body: Iterable[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements that run when the module is imported: into if/try/with, not into defs."""
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        yield stmt
        for block in ("body", "orelse", "finalbody"):
            inner = getattr(stmt, block, None)
            if isinstance(inner, list):
                yield from module_level(inner)
        for handler in getattr(stmt, "handlers", []):
            yield from module_level(handler.body)


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at module level."""
    known = modules(package)
    top = package.name
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for stmt in module_level(ast.parse(path.read_text(), str(path)).body):
            if isinstance(stmt, ast.Import):
                targets.update(alias.name for alias in stmt.names)
            elif isinstance(stmt, ast.ImportFrom):
                if stmt.level:
                    base = here.split(".")[: len(here.split(".")) - stmt.level + 1]
                    source = ".".join([*base, stmt.module] if stmt.module else base)
                else:
                    source = stmt.module or ""
                for alias in stmt.names:
                    targets.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
        graph[name] = {t for t in targets if within(t, top) and t != name}
    return graph


def reaches(graph: dict[str, set[str]], start: str, banned: tuple[str, ...]) -> list[list[str]]:
    """The import chains from ``start`` to a module under a ``banned`` prefix (shortest first)."""
    chains, seen, frontier = [], {start}, [[start]]
    while frontier:
        following = []
        for chain in frontier:
            for nxt in sorted(graph.get(chain[-1], ())):
                if any(within(nxt, b) for b in banned):
                    chains.append([*chain, nxt])
                elif nxt not in seen:
                    seen.add(nxt)
                    following.append([*chain, nxt])
        frontier = following
    return chains


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def violations(package: Path) -> list[str]:
    """Every break of the rule in the module docstring, one line each."""
    top = package.name

    def rename(name: str) -> str:  # the rule is written for gateway; a synthetic package maps onto it
        return "gateway" + name[len(top) :] if within(name, top) else name

    graph = {rename(m): {rename(t) for t in ts} for m, ts in import_graph(package).items()}
    problems = []
    for layer, banned in FORBIDDEN.items():
        for module in sorted(m for m in graph if within(m, layer)):
            for chain in reaches(graph, module, banned):
                problems.append(f"{layer} must not import {chain[-1]}: {' -> '.join(chain)}")
    for module, targets in sorted(graph.items()):
        decisions = sorted(t for t in targets if within(t, DECISIONS))
        byte_side = sorted(t for t in targets if within(t, BYTES))
        if decisions and byte_side and not any(within(module, j) for j in JOINERS) and not within(module, DECISIONS):
            problems.append(
                f"{module} joins decisions and bytes ({decisions[0]}, {byte_side[0]}): only gateway.proxy does"
            )
    for circle in circles(graph):
        problems.append(f"import circle: {' <-> '.join(circle)}")
    return problems


def test_gateway_keeps_the_dependency_rule() -> None:
    problems = violations(ROOT / "gateway")
    assert not problems, "\n".join(problems)


# --- the checker itself, on a synthetic package ------------------------------------------------


def plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


CLEAN = {
    "__init__.py": "",
    "policy/__init__.py": "from .decide import decide\n",
    "policy/decide.py": "from ..clientip import Client\n\ndef decide(): ...\n",
    "clientip.py": "",
    "dataplane/__init__.py": "",
    "dataplane/relay.py": "from . import limits\n",
    "dataplane/limits.py": "",
    "proxy/__init__.py": "from pkg.policy import decide\nfrom pkg.dataplane.relay import limits\n",
    "cli.py": "def main():\n    from .proxy import decide  # late, inside a function: not counted\n",
}


def test_the_checker_passes_a_clean_package(tmp_path: Path) -> None:
    assert violations(plant(tmp_path, CLEAN)) == []


def test_the_checker_finds_a_forbidden_import_through_another_module(tmp_path: Path) -> None:
    package = plant(
        tmp_path,
        {**CLEAN, "dataplane/limits.py": "from ..upstream import URL\n", "upstream.py": "import pkg.policy.decide\n"},
    )
    assert violations(package) == [
        "gateway.dataplane must not import gateway.policy.decide: "
        "gateway.dataplane.limits -> gateway.upstream -> gateway.policy.decide",
        "gateway.dataplane must not import gateway.policy.decide: "
        "gateway.dataplane.relay -> gateway.dataplane.limits -> gateway.upstream -> gateway.policy.decide",
    ]


def test_the_checker_finds_a_second_joiner(tmp_path: Path) -> None:
    package = plant(tmp_path, {**CLEAN, "metrics.py": "from .policy import decide\nfrom .dataplane import relay\n"})
    assert violations(package) == [
        "gateway.metrics joins decisions and bytes (gateway.policy.decide, gateway.dataplane.relay): "
        "only gateway.proxy does"
    ]


def test_the_checker_finds_a_circle_seen_only_by_the_type_checker(tmp_path: Path) -> None:
    package = plant(
        tmp_path,
        {
            **CLEAN,
            "clientip.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .cidrs import Cidr\n",
            "cidrs.py": "from pkg import clientip\n",
        },
    )
    assert violations(package) == ["import circle: gateway.cidrs <-> gateway.clientip"]


def test_the_checker_finds_policy_reaching_shared(tmp_path: Path) -> None:
    package = plant(
        tmp_path,
        {
            **CLEAN,
            "shared/__init__.py": "",
            "shared/overrides.py": "from ..policy import decide\n",
            "policy/decide.py": "try:\n    from ..shared import overrides\nexcept ImportError:\n    pass\n",
        },
    )
    assert violations(package) == [
        "gateway.policy must not import gateway.shared.overrides: "
        "gateway.policy -> gateway.policy.decide -> gateway.shared.overrides",
        "gateway.policy must not import gateway.shared.overrides: gateway.policy.decide -> gateway.shared.overrides",
        "import circle: gateway.policy.decide <-> gateway.shared.overrides",
    ]


def test_the_checker_finds_usage_reaching_the_relay(tmp_path: Path) -> None:
    package = plant(
        tmp_path,
        {**CLEAN, "usage/__init__.py": "", "usage/tap.py": "from ..dataplane.relay import limits\n"},
    )
    assert violations(package) == [
        "gateway.usage must not import gateway.dataplane.relay: gateway.usage.tap -> gateway.dataplane.relay",
    ]
