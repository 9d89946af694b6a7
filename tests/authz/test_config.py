"""The decision service's options: checked at load with clear errors, and the warnings about model rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.authz.config import blind_rules, contracts, parse_config
from gateway.cli import main
from gateway.runtime import ConfigError
from support.authz import runtime_for

MODEL_POLICY = """\
version: 1
rules:
  - {name: gb, countries: [GB], action: allow, allow_models: ["gpt-4o-mini"]}
  - {name: se, countries: [SE], models: ["gpt-4o*"], action: deny}
  - {name: us, countries: [US], action: allow}
"""


def test_client_headers_and_bodies_are_parsed_and_checked() -> None:
    config = parse_config(["nginx=X-Real-IP", "envoy-http = x-envoy-external-address"], ["forward", "Envoy_HTTP"])
    assert config.client_headers["nginx"] == "x-real-ip"
    assert config.client_headers["forward"] == "x-forwarded-for"
    assert config.bodies == {"forward", "envoy_http"}
    for headers, bodies, message in (
        (["nginx"], [], "is not CONTRACT=HEADER"),
        (["nginx=x real ip"], [], "is not a header name"),
        (["apache=x-real-ip"], [], "'apache' is not a contract"),
        ([], ["nginx"], "nginx cannot send the body"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_config(headers, bodies)
    assert contracts(["nginx", "forward"], "--authz") == {"nginx", "forward"}


def test_each_rule_that_reads_the_model_is_named_with_its_line(tmp_path: Path) -> None:
    policy = runtime_for(tmp_path, MODEL_POLICY).policy
    warnings = blind_rules(policy, ["nginx"])
    assert len(warnings) == 2
    assert warnings[0].endswith(
        ":3: rule 'gb' reads the request's model, which the contracts without a request body (nginx) cannot see: "
        "their requests are judged with an unknown model (body.unknown_model: deny)"
    )
    assert ":4: rule 'se'" in warnings[1]
    assert blind_rules(policy, []) == []


def test_serve_warns_at_start_and_needs_a_port(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path, MODEL_POLICY, authz_port=0, authz_body=("forward",))
    assert runtime.authz is not None and runtime.authz.bodies == {"forward"}
    blind = [w for w in runtime.warnings if "reads the request's model" in w]
    assert len(blind) == 2 and all("(envoy_http, nginx)" in w for w in blind)
    assert runtime_for(tmp_path, MODEL_POLICY).authz is None
    with pytest.raises(ConfigError, match="--port 0 turns the proxy port off: give --authz-port"):
        runtime_for(tmp_path, MODEL_POLICY, port=0)
    with pytest.raises(ConfigError, match="--authz-client-header"):
        runtime_for(tmp_path, MODEL_POLICY, authz_port=0, authz_client_header=("nginx",))


def test_check_warns_for_the_contracts_it_is_told(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(MODEL_POLICY)
    assert main(["check", str(path), "--authz", "nginx", "--authz", "forward", "--authz-body", "forward"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: ") == 2 and "(nginx) cannot see" in err
    assert main(["check", str(path), "--authz", "forward", "--authz-body", "forward"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["check", str(path), "--authz", "apache"]) == 2
    assert "--authz: 'apache' is not a contract" in capsys.readouterr().err
