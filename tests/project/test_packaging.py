"""The version is written once, in gateway/__init__.py; what cannot read it is checked against it.

The package metadata reads it (``[tool.hatch.version]``), the CLI and the admin API import it, and
the Dockerfile takes it as a build argument with no default. The deploy files name the image they
run by tag, and YAML cannot import Python, so this test holds them to the same version.

Every third-party module that gateway/ imports is declared: in the runtime dependencies, or, for
gateway/stub.py alone, in the ``stub`` extra, and for Envoy's gRPC decision service
(gateway/authz/envoy_*.py) alone, in the ``envoy`` extra.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions, requires, version
from pathlib import Path

import yaml
from packaging.requirements import Requirement

from gateway import __version__
from support.processes import ROOT


def test_the_package_metadata_reads_the_version_from_gateway() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["hatch"]["version"] == {"path": "gateway/__init__.py"}
    assert version("regiongate") == __version__


def test_no_other_file_writes_the_version() -> None:
    pattern = re.compile(r"\b" + re.escape(__version__) + r"\b")
    for name in ("pyproject.toml", "Dockerfile", "gateway/cli.py", "gateway/admin.py"):
        path = ROOT / name
        if path.exists():
            assert not pattern.search(path.read_text()), name


def test_the_deploy_files_run_this_version() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    anchor = compose["x-regiongate"]
    assert anchor["build"]["args"]["VERSION"] == __version__
    assert anchor["image"] == f"regiongate:{__version__}"
    deployment = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/base/deployment.yaml").read_text()))
    images = [
        c["image"]
        for doc in deployment
        if doc and doc.get("kind") == "Deployment"
        for c in doc["spec"]["template"]["spec"]["containers"]
        + doc["spec"]["template"]["spec"].get("initContainers", [])
        if c["image"].startswith("regiongate:")
    ]
    assert images and set(images) == {f"regiongate:{__version__}"}
    production = yaml.safe_load((ROOT / "deploy/kubernetes/overlays/production/kustomization.yaml").read_text())
    (image,) = [i for i in production["images"] if i["name"] == "regiongate"]
    assert image["newTag"] == __version__


def third_party_imports(path: Path) -> set[str]:
    """The top-level names of the non-stdlib, non-gateway modules a file imports (anywhere in it)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "gateway"}


def test_every_import_of_gateway_is_declared() -> None:
    declared: dict[str, set[str]] = {}  # distribution -> the extras it is declared in ("" = always)
    for line in requires("regiongate") or []:
        req = Requirement(line)
        extras = {m for m in ("stub", "dashboard", "envoy") if req.marker and req.marker.evaluate({"extra": m})}
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            extras.add("")
        declared.setdefault(canonical(req.name), set()).update(extras)
    providers = packages_distributions()
    missing = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        # The optional parts and their extras: the stub upstream; PNG maps (CairoSVG, as the dashboard's PNG);
        # Envoy's gRPC contract (grpcio and Envoy's protos).
        allowed = {"", "stub"} if path.name == "stub.py" else {"", "dashboard"} if path.name == "worldmap.py" else {""}
        if path.parent.name == "authz" and path.name.startswith("envoy_"):
            allowed = {"", "envoy"}
        for name in sorted(third_party_imports(path)):
            dists = {canonical(d) for d in providers.get(name, [name])}
            if not any(declared.get(d, set()) & allowed for d in dists):
                missing.append(f"{path.relative_to(ROOT)}: {name} ({', '.join(sorted(dists))})")
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(missing)
    assert declared["aiohttp"] == {"stub"}, "aiohttp is for `regiongate stub` only"
    assert declared["grpcio"] == {"envoy"}, "grpcio is for Envoy's gRPC decision service only"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
