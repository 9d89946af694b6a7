"""The decision service's core, built in this process as ``regiongate serve`` builds it (fast tier)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from gateway.authz.judge import Judge
from gateway.authz.query import Answer, Contract, Query
from gateway.dataplane.limits import Limits
from gateway.metrics import Metrics
from gateway.runtime import Runtime, Settings, load_runtime
from support.processes import CITY

GB, CN = "2.125.160.216", "175.16.199.1"

POLICY = """\
version: 1
upstreams:
  default: {url: "http://127.0.0.1:9"}
  eu: {url: "http://127.0.0.1:9"}
rules:
  - {name: no-files, paths: ["/v1/files*"], action: deny}
  - {name: small-models, countries: [SE], models: ["gpt-4o-mini"], action: route, upstream: eu}
  - {name: gb, countries: [GB], action: allow}
defaults: {action: deny, missing: deny}
"""


def runtime_for(tmp_path: Path, policy: str = POLICY, **settings: object) -> Runtime:
    path = tmp_path / "authz-policy.yaml"
    path.write_text(policy)
    access_log = tmp_path / "authz-access.log"
    options = {"policy": str(path), "geoip": (CITY,), "access_log": str(access_log), "watch": False} | settings
    return load_runtime(Settings(**options))


def judge_for(runtime: Runtime, via: Contract = "forward") -> tuple[Judge, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return Judge(runtime, metrics, Limits(), via), metrics


def ask(judge: Judge, query: Query) -> Answer:
    """Judge one query whose answer does not wait (no Redis)."""
    answers: list[Answer] = []
    judge.ask(query, answers.append)
    assert len(answers) == 1
    return answers[0]
