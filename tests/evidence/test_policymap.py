"""The policy map: the right countries in the right classes, asserted on the SVG's elements."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.evidence import worldmap
from gateway.evidence.policymap import diff_svg, policy_map
from gateway.policy import load_policy
from support.processes import ROOT

SVG = "{http://www.w3.org/2000/svg}"
OPENAI = str(ROOT / "policies" / "openai-supported.yaml")

ROUTED = """\
version: 1
upstreams:
  default: {url: "https://api.example.com"}
  eu: {url: "https://eu.example.com"}
  cheap: {url: "https://cheap.example.com"}
defaults: {action: deny, unknown: deny, private: allow}
rules:
  - {name: crimea, subdivisions: [UA-43], action: deny}
  - {name: eu, countries: [DE, FR], action: route, upstream: eu}
  - {name: india, countries: [IN], action: route, upstream: cheap}
  - {name: watch, countries: [BR], action: monitor}
  - name: limited
    countries: [JP]
    action: allow
    rate_limit: {requests: 10, per: 60}
  - {name: office, cidrs: [203.0.113.0/24], action: allow}
  - {name: everyone-ok, countries: [US, GB, UA], action: allow}
"""


def classes(svg: str) -> dict[str, ET.Element]:
    """data-iso -> the country's <path>; every path must carry a code and a class."""
    root = ET.fromstring(svg)
    out = {}
    for path in root.iter(f"{SVG}path"):
        code, css = path.get("data-iso"), path.get("class")
        assert code is not None and css, ET.tostring(path)[:80]
        out[code] = path
    return out


def texts(svg: str) -> list[str]:
    return [t.text or "" for t in ET.fromstring(svg).iter(f"{SVG}text")]


def test_openai_supported_colours_refused_and_allowed_countries() -> None:
    svg = policy_map(load_policy(OPENAI)).svg()
    shapes = classes(svg)
    for code in ("CN", "RU", "IR", "KP", "SY", "CU", "BY"):
        assert shapes[code].get("class") == "rg-deny", code
        assert shapes[code].get("data-rule") == "defaults.action"
    for code in ("US", "GB", "DE", "JP", "UA", "IN"):
        assert shapes[code].get("class") == "rg-allow", code
        assert shapes[code].get("data-rule") == "supported"
    title = shapes["CN"].find(f"{SVG}title")
    assert title is not None and title.text == "CN China: refused (defaults.action)"
    notes = texts(svg)
    # The occupied regions are a carve-out of an allowed country: said in words below the map.
    for sub in ("UA-43", "UA-40", "UA-14", "UA-09"):
        assert any(t.startswith(f"{sub} (Ukraine): refused (occupied-regions)") for t in notes), sub
    assert "allowed" in notes and "refused" in notes  # the legend, only the shades in use
    assert not any("routed" in t for t in notes)


def test_self_contained_no_script_no_link() -> None:
    svg = policy_map(load_policy(OPENAI)).svg()
    root = ET.fromstring(svg)
    tags = {el.tag.removeprefix(SVG) for el in root.iter()}
    assert tags <= {"svg", "style", "rect", "text", "g", "path", "title"}, tags
    assert "http" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "url(" not in svg and "@import" not in svg


def test_every_asset_shape_is_drawn_with_a_code(tmp_path: Path) -> None:
    codes = classes(policy_map(load_policy(OPENAI)).svg())
    assert set(codes) == set(worldmap.shapes())
    # Small states a policy names are drawn (as a marker when too small for a shape).
    assert {"VA", "MC", "SG", "BH", "MT", "NR", "LI", "XK"} <= set(codes)
    assert len(codes) > 230


def test_routes_limits_monitor_and_rules_without_a_place(tmp_path: Path) -> None:
    path = tmp_path / "routed.yaml"
    path.write_text(ROUTED)
    pm = policy_map(load_policy(str(path)))
    svg = pm.svg()
    shapes = classes(svg)
    assert shapes["DE"].get("class") == shapes["FR"].get("class") == "rg-route-1"
    assert shapes["DE"].get("data-upstream") == "eu"
    assert shapes["IN"].get("class") == "rg-route-2" and shapes["IN"].get("data-upstream") == "cheap"
    assert shapes["BR"].get("class") == "rg-monitor"
    assert shapes["JP"].get("class") == "rg-limited"
    assert shapes["US"].get("class") == "rg-allow" and shapes["CN"].get("class") == "rg-deny"
    notes = texts(svg)
    assert "routed to eu" in notes and "routed to cheap" in notes and "allowed, rate-limited" in notes
    assert any("rule 'office' (allow) applies where cidrs: 203.0.113.0/24" in t for t in notes)
    assert any(t.startswith("UA-43 (Ukraine): refused (crimea)") for t in notes)
    assert pm.countries["JP"].words == "allowed, at most 10 per 60 s by ip"


def test_diff_map_colours_what_changes(tmp_path: Path) -> None:
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(ROUTED)
    new.write_text(
        ROUTED.replace("countries: [US, GB, UA]", "countries: [US, UA, CN]").replace(
            "countries: [IN], action: route, upstream: cheap", "countries: [IN], action: route, upstream: eu"
        )
    )
    shapes = classes(diff_svg(load_policy(str(old)), load_policy(str(new))))
    assert shapes["GB"].get("class") == "rg-now-refused"
    assert shapes["CN"].get("class") == "rg-now-allowed"
    assert shapes["IN"].get("class") == "rg-changed"
    assert shapes["IN"].get("data-from") == "routed to cheap" and shapes["IN"].get("data-to") == "routed to eu"
    assert shapes["US"].get("class") == shapes["RU"].get("class") == "rg-same"


@pytest.mark.e2e  # CairoSVG's import runs ldconfig to find libcairo
def test_cli_writes_svg_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "map.svg"
    assert main(["map", OPENAI, "--out", str(out)]) == 0
    assert classes(out.read_text())["RU"].get("class") == "rg-deny"
    png = tmp_path / "map.png"
    assert main(["map", OPENAI, "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["map", OPENAI, "--diff", OPENAI]) == 0
    assert set(c.get("class") for c in classes(capsys.readouterr().out).values()) == {"rg-same"}
    assert main(["map", OPENAI, "--out", str(tmp_path / "map.gif")]) == 2
    assert "give a .svg or .png file name" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - {name: x, countries: [UK], action: deny}\n")
    assert main(["map", str(bad)]) == 2
    assert f"{bad}:3" in capsys.readouterr().err
