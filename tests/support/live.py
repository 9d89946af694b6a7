"""Helpers for the live-reload tests: policy texts, the three ways files are replaced, two GeoIP files.

The two City databases hold the same address in different countries (GB in
one, FR in the other) and carry the same ``build_epoch``, so that they can
replace each other in either order (an older build is refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import httpx

# An address the generated databases place in GB (file A) or FR (file B).
ADDR = "81.2.69.160"
BUILD_EPOCH = 1_790_000_000


def write_city_db(path: Path, country: str, epoch: int = BUILD_EPOCH) -> str:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(
        ip_version=6,
        database_type="GeoIP2-City",
        languages=["en"],
        description={"en": f"Regiongate live test: {ADDR} in {country}"},
        ipv4_compatible=True,
    )
    writer.insert_network(
        IPSet([f"{ADDR}/32"]),
        {"country": {"iso_code": country}, "registered_country": {"iso_code": country}},
    )
    writer.insert_network(
        IPSet(["216.160.83.0/24"]),
        {"country": {"iso_code": "US"}, "registered_country": {"iso_code": "US"}},
    )
    with mock.patch("mmdb_writer.time.time", return_value=epoch):
        writer.to_db_file(str(path))
    return str(path)


def policy(kind: str, revision: str) -> str:
    """Policy texts. ``version: 1`` comes last, so any truncated read of the file is invalid.

    ``allow`` lets GB and FR through; ``deny`` refuses them. Each sends an
    address without a country the other way, so broken geo data would show
    as a wrong decision too. The bad kinds fail in the four ways a candidate
    can: YAML, schema, its own test, a rule needing a database not loaded.
    """
    if kind == "allow":
        body = (
            "rules:\n  - {name: gb-fr-allowed, countries: [GB, FR], action: allow}\n"
            "defaults: {action: deny, unknown: deny}\n"
            f"tests:\n  - {{ip: {ADDR}, expect: allow, rule: gb-fr-allowed}}\n"
        )
    elif kind == "deny":
        body = (
            "rules:\n  - {name: gb-fr-refused, countries: [GB, FR], action: deny}\n"
            "defaults: {action: allow, unknown: allow}\n"
            f"tests:\n  - {{ip: {ADDR}, expect: deny, rule: gb-fr-refused}}\n"
        )
    elif kind == "yaml-error":
        body = "rules:\n  - {name: broken, countries: [GB, action: allow}\n"
    elif kind == "schema-error":
        body = "rules:\n  - {name: colour, countries: [GB], action: allow, colour: red}\n"
    elif kind == "failing-test":
        body = (
            "rules:\n  - {name: gb-fr-allowed, countries: [GB, FR], action: allow}\n"
            f"tests:\n  - {{ip: {ADDR}, expect: deny}}\n"
        )
    elif kind == "missing-database":
        body = "rules:\n  - {name: by-asn, asns: [4837], action: deny}\n"
    else:
        raise ValueError(kind)
    return f"revision: {revision}\n{body}version: 1\n"


EXPECTED_PROBLEM = {
    "yaml-error": ":3: YAML syntax error",
    "schema-error": ":3: rules[0]: unknown key 'colour'",
    "failing-test": ":5: test 81.2.69.160 /v1/chat/completions: expected deny, got allow",
    "missing-database": ":3: rules[0] (by-asn) uses 'asns', which needs an ASN, ISP or Enterprise database",
}


def tag(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# --- the three ways a file is replaced ------------------------------------------------


def write_in_place(path: Path, text: str) -> None:
    with open(path, "w") as f:  # truncate, then one write(2)
        f.write(text)


def write_by_rename(path: Path, text: str) -> None:
    real = Path(os.path.realpath(path))
    tmp = real.with_name(f".{real.name}.tmp{time.monotonic_ns()}")
    tmp.write_text(text)
    os.replace(tmp, real)


class ConfigMapDir:
    """A Kubernetes ConfigMap volume: ``name -> ..data/name``, ``..data -> ..<timestamp>``, swapped atomically."""

    def __init__(self, root: Path, name: str, text: str) -> None:
        self.root = root
        self.name = name
        self.n = 0
        root.mkdir(parents=True, exist_ok=True)
        self.swap(text)
        os.symlink(f"..data/{name}", root / name)

    @property
    def path(self) -> Path:
        return self.root / self.name

    def swap(self, text: str) -> None:
        self.n += 1
        stamp = f"..2026_11_22_19_00_{self.n:04d}.{os.getpid()}"
        (self.root / stamp).mkdir()
        (self.root / stamp / self.name).write_text(text)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        os.symlink(stamp, self.root / "..data_tmp")
        os.replace(self.root / "..data_tmp", self.root / "..data")
        if old:  # the kubelet removes the previous directory
            for f in (self.root / old).iterdir():
                f.unlink()
            (self.root / old).rmdir()


# --- asking the gateway ------------------------------------------------------------------


def get_json(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, Any]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body else None


def wait_until(check: Callable[[], Any], what: str, attempts: int = 400, pause: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; a bound on attempts, not a timing assertion."""
    for _ in range(attempts):
        value = check()
        if value:
            return value
        time.sleep(pause)
    raise AssertionError(f"never happened: {what}")


def wait_workers_serve(admin: str, workers: int, sha256: str, attempts: int = 4000) -> dict[int, str]:
    """Ask ``/readyz`` until each of ``workers`` pids has answered with ``sha256``; pid -> last sha256 seen.

    Any worker can take a connection, so this keeps asking until every pid
    has been seen, and has been seen with the expected policy.
    """
    seen: dict[int, str] = {}
    for _ in range(attempts):
        _, ready = get_json(admin + "/readyz")
        seen[ready["pid"]] = ready["policy"]["sha256"]
        if len(seen) >= workers and all(v == sha256 for v in seen.values()):
            return seen
    raise AssertionError(f"workers never all served {sha256[:12]}: {seen}")


TRUST = ["--trusted-proxy", "127.0.0.1/32"]
TOKEN = "t0ken-for-tests-only"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ask(base: str, addr: str = ADDR, path: str = "/v1/models") -> tuple[int, str | None]:
    r = httpx.get(base + path, headers={"x-forwarded-for": addr}, timeout=10)
    return r.status_code, r.headers.get("x-regiongate-policy")


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one series, labels in any order."""
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return None
