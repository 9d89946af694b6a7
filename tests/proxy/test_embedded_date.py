"""The embedded iptocc data is dated by when it was built, not when it was installed."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from datetime import datetime
from importlib.metadata import distribution
from typing import Any

import iptocc

from gateway.geo import Geo, embedded_data_epoch
from support.processes import GatewayFactory, Stub


def sbom_epoch() -> int:
    """The timestamp of the CycloneDX SBOM in iptocc's wheel, read independently of gateway.geo."""
    dist = distribution("iptocc")
    (sbom,) = [f for f in dist.files or () if f.name.endswith(".cyclonedx.json")]
    stamp = json.loads(sbom.read_text())["metadata"]["timestamp"]
    return int(datetime.fromisoformat(stamp[:19] + "+00:00").timestamp())


def test_embedded_source_is_dated_by_its_wheel_not_its_install() -> None:
    (source,) = Geo([]).sources
    installed = int(os.path.getmtime(iptocc.__file__))
    assert source.build_epoch == sbom_epoch()
    assert 0 < source.build_epoch < installed  # built before it could be installed here
    assert source.build_date == time.strftime("%Y-%m-%d", time.gmtime(sbom_epoch()))
    assert source.description.startswith(f"iptocc {distribution('iptocc').version}:")


class _NoSbom:
    files: list[Any] = []


def test_no_sbom_means_unknown_not_a_made_up_date() -> None:
    assert embedded_data_epoch(_NoSbom()) == 0


def test_readyz_and_metrics_report_the_data_date(gateway: GatewayFactory, stub: Stub) -> None:
    gw = gateway("--upstream", stub.url)
    with urllib.request.urlopen(gw.admin + "/readyz", timeout=5) as r:
        (geo,) = json.loads(r.read())["geo"]
    assert (geo["type"], geo["build_epoch"]) == ("embedded-iptocc", sbom_epoch())
    assert geo["build_date"] == time.strftime("%Y-%m-%d", time.gmtime(sbom_epoch()))
    assert f'regiongate_geoip_database_info{{build_epoch="{sbom_epoch()}",type="embedded-iptocc"}} 1.0' in gw.metrics()
