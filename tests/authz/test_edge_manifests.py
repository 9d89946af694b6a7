"""The shipped ingress-nginx manifest, without a cluster: a valid Ingress that asks Regiongate's nginx contract.

No cluster runs here, so the Ingress is validated strictly against Kubernetes' own schema
(kubernetes-validate, as tests/deploy does for the Kustomize manifests), and its annotations are
held to what the nginx edge tests exercise with a real nginx (tests/authz/test_nginx_edge.py):
the auth subrequest goes to ``/authz/nginx`` with the original URI and method, the facts come back
as headers, and the ``@regiongate`` location turns a refusal back into the OpenAI status and body.
"""

from __future__ import annotations

import re

import kubernetes_validate
import yaml
from kubernetes_validate.utils import latest_version

from support.processes import ROOT

INGRESS = ROOT / "deploy" / "edges" / "ingress-nginx" / "ingress.yaml"
NGINX = ROOT / "deploy" / "edges" / "nginx" / "regiongate-edge.conf"  # run by tests/authz/test_nginx_edge.py


def test_the_ingress_is_valid_kubernetes_and_asks_the_nginx_contract() -> None:
    docs = [d for d in yaml.safe_load_all(INGRESS.read_text()) if d]
    ingresses = [d for d in docs if d["kind"] == "Ingress"]
    assert len(ingresses) == 1
    for doc in docs:
        kubernetes_validate.validate(doc, latest_version(), strict=True)
    notes = ingresses[0]["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "auth-url"].endswith("/authz/nginx")
    assert notes[prefix + "auth-method"] == "GET"
    snippet = notes[prefix + "auth-snippet"]
    assert "X-Original-URI $request_uri" in snippet and "X-Original-Method $request_method" in snippet
    tested = NGINX.read_text()
    # Every x-regiongate-* header the tested nginx sets on the upstream request (from the answer, or
    # emptied), ingress-nginx replaces too: a client's own never reaches the upstream.
    set_upstream = {h.lower() for h in re.findall(r"proxy_set_header (X-Regiongate-[\w-]+)", tested)}
    copied = {h.strip().lower() for h in notes[prefix + "auth-response-headers"].split(",")}
    assert set_upstream and set_upstream <= copied
    assert "error_page 403 = @regiongate" in notes[prefix + "configuration-snippet"]
    # The refusal location sends the client what the tested one sends: the same headers, the same statuses.
    refusal = notes[prefix + "server-snippet"]
    added = {h.lower() for h in re.findall(r"add_header ([\w-]+)", tested)}
    assert added and added == {h.lower() for h in re.findall(r"add_header ([\w-]+)", refusal)}
    statuses = re.findall(r"if \(\$regiongate_status = (\d+)\) \{ return \1 \$regiongate_body; \}", tested)
    assert statuses and statuses == re.findall(
        r"if \(\$regiongate_status = (\d+)\) \{ return \1 \$regiongate_body; \}", refusal
    )
