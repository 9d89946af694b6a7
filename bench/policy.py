"""bench/policy.yaml, read for nginx+geoip2 (its countries and refusal body) and checked with the
gateway's own `check` before anything starts.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .common import ANONYMOUS_DB, ASN_DB, CITY_DB, POLICY, REFERENCE_POLICY, REPO_DIR, TOKENS_POLICY, BenchError, log
from .processes import child_env


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans, as the gateway reads policies.

    Under PyYAML's YAML 1.1 rules `countries: [NO]` loads as [False]: Norway would
    vanish from the nginx map while the gateway still allows it.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_Yaml12Loader)


@dataclass(frozen=True)
class BenchPolicy:
    """What nginx+geoip2 must mirror from bench/policy.yaml."""

    countries: tuple[str, ...]
    block_body: str


def load_bench_policy() -> BenchPolicy:
    """Read the supported countries and the refusal body from bench/policy.yaml.

    bench/policy.yaml is the one source for both contenders, so nginx blocks exactly
    what the gateway's `supported` rule allows and answers with the same body.
    """
    doc = load_yaml(POLICY)
    countries = tuple(supported_countries(doc, POLICY))
    bad = [c for c in countries if not re.fullmatch(r"[A-Z]{2}", c)]
    if bad:
        raise BenchError(f"{POLICY}: not ISO 3166-1 alpha-2 codes: {bad}")
    block = doc.get("block") or {}
    error = {
        "message": block.get("message", "Country, region, or territory not supported"),
        "type": block.get("type", "request_forbidden"),
        "param": None,
        "code": block.get("code", "unsupported_country_region_territory"),
    }
    body = json.dumps({"error": error}, separators=(",", ":"))
    warn_if_drifted(set(countries))
    return BenchPolicy(countries, body)


def supported_countries(doc: dict[str, Any], path: Path) -> list[str]:
    for rule in doc.get("rules") or []:
        if rule.get("name") == "supported":
            return [str(c) for c in rule["countries"]]
    raise BenchError(f"{path}: no rule named 'supported'")


def warn_if_drifted(countries: set[str]) -> None:
    """The benchmark should use the shipped list; say so if the two have diverged."""
    with contextlib.suppress(OSError, BenchError, yaml.YAMLError):
        reference = set(supported_countries(load_yaml(REFERENCE_POLICY), REFERENCE_POLICY))
        if reference != countries:
            log(
                f"WARNING: bench/policy.yaml's supported countries differ from "
                f"{REFERENCE_POLICY.relative_to(REPO_DIR)}: "
                f"only in bench {sorted(countries - reference)}, "
                f"only in shipped {sorted(reference - countries)}"
            )


def preflight_policy() -> None:
    """Run the policies' own tests with the gateway's checker before starting anything.

    They pin the decision for every address in the rotation, so a policy or database
    change that would make the 25% refusal share wrong fails here, with the reason. The
    token-budget variant is checked too: a gateway that does not know ``token_limit`` says so
    here, before any server starts, rather than as a gateway that will not start.
    """
    for policy, needs in ((POLICY, ""), (TOKENS_POLICY, " (its rows need token_limit and max_concurrent, issue 19)")):
        cmd = [sys.executable, "-m", "gateway", "check", str(policy), "--quiet"]
        for db in (CITY_DB, ASN_DB, ANONYMOUS_DB):
            cmd += ["--geoip", str(db)]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_DIR, env=child_env(), check=False)
        if result.returncode != 0:
            raise BenchError(
                f"`gateway check {policy.name}` failed ({result.returncode}){needs}:\n{result.stdout}{result.stderr}"
            )
