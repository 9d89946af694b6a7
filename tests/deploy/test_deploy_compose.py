"""The Compose stack: valid against the Compose Specification, and wired as the image expects.

No Docker engine (nor the compose plugin) is here, so the file is validated
against the specification's own JSON Schema (vendored in
tests/fixtures/compose-spec), the Prometheus configuration with ``promtool``,
and the wiring between services, files and the image is checked directly.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from support.dockerfile import image_env, image_user
from support.processes import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
SCHEMA = ROOT / "tests" / "fixtures" / "compose-spec" / "compose-spec.json"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def schema_errors(document: Any) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"].startswith("https://json-schema.org/draft-07/")
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(document)]


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path, for the short-syntax bind mounts (relative to the compose file)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = (COMPOSE.parent / source).resolve()
    return mounts


def test_compose_file_matches_the_specification() -> None:
    assert schema_errors(compose()) == []


def test_schema_check_can_fail() -> None:
    broken = compose()
    broken["services"]["gateway"]["restart_policy"] = "always"  # a service's key is `restart`
    broken["services"]["gateway"]["depends_on"] = {"upstream": {"condition": "when_ready"}}
    errors = schema_errors(broken)
    assert any("restart_policy" in e for e in errors) and any("when_ready" in e for e in errors), errors


def test_stack_has_its_services() -> None:
    services = compose()["services"]
    assert set(services) == {"gateway", "upstream", "redis", "prometheus", "grafana"}
    for name, service in services.items():
        image = service["image"]
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), (name, image)


def test_gateway_runs_the_image_as_built_and_hardened() -> None:
    services = compose()["services"]
    gateway = services["gateway"]
    assert (COMPOSE.parent / gateway["build"]["context"] / gateway["build"]["dockerfile"]).resolve() == (
        ROOT / "Dockerfile"
    )
    assert gateway["read_only"] is True and gateway["cap_drop"] == ["ALL"]
    env = image_env()
    uid, gid = image_user()
    (tmpfs,) = gateway["tmpfs"]
    path, options = tmpfs.split(":", 1)
    assert path == env["PROMETHEUS_MULTIPROC_DIR"] and f"uid={uid}" in options and f"gid={gid}" in options
    mounts = bind_mounts(gateway)
    assert mounts[env["REGIONGATE_POLICY"]].is_file()
    check = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(mounts[env["REGIONGATE_POLICY"]]), "-q"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    # The upstream is the stub service, on the port it listens on.
    upstream = services["upstream"]
    assert upstream["image"] == gateway["image"] and upstream["command"][0] == "stub"
    port = upstream["command"][upstream["command"].index("--port") + 1]
    assert gateway["environment"]["REGIONGATE_UPSTREAM"] == f"http://upstream:{port}"
    help_text = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--help"], check=True, capture_output=True, text=True
    ).stdout
    assert all(name in help_text for name in gateway["environment"])
    # Trusted: only the host's address on the stack's network.
    (network,) = compose()["networks"]["default"]["ipam"]["config"]
    assert gateway["environment"]["REGIONGATE_TRUSTED_PROXY"] == network["gateway"] + "/32"


def test_only_loopback_is_published() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    gateway = compose()["services"]["gateway"]
    published = {int(p.split(":")[2]) for p in gateway["ports"]}
    env = image_env()
    assert published == {int(env["REGIONGATE_PORT"]), int(env["REGIONGATE_ADMIN_PORT"])}


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing (Debian package prometheus; scripts/test installs it)"
    out = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_scrapes_the_gateways_control_plane() -> None:
    prometheus = compose()["services"]["prometheus"]
    mounts = bind_mounts(prometheus)
    config_path = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert mounts[config_path] == PROMETHEUS
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "regiongate"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"gateway:{image_env()['REGIONGATE_ADMIN_PORT']}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_grafana_is_provisioned_with_prometheus_and_a_dashboard_folder() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == GRAFANA / "provisioning"
    (datasources,) = (provisioning / "datasources").glob("*.yaml")
    (source,) = yaml.safe_load(datasources.read_text())["datasources"]
    port = compose()["services"]["prometheus"]["ports"][0].split(":")[2]
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{port}"
    (dashboards,) = (provisioning / "dashboards").glob("*.yaml")
    (provider,) = yaml.safe_load(dashboards.read_text())["providers"]
    assert provider["type"] == "file"
    folder = mounts[provider["options"]["path"]]
    assert folder == GRAFANA / "dashboards" and folder.is_dir()


@pytest.mark.parametrize("path", sorted(p.relative_to(GRAFANA).as_posix() for p in GRAFANA.rglob("*.yaml")))
def test_grafana_provisioning_files_are_version_1(path: str) -> None:
    assert yaml.safe_load((GRAFANA / path).read_text())["apiVersion"] == 1
