"""The world as inline SVG, each country coloured by a class: for a policy, a diff, a report.

The promise: the SVG is self-contained (its colours in its own ``<style>``,
no script, no link, no font file, nothing fetched), so that it can be opened
offline, inlined in an HTML report and printed; every country's ``<path>``
carries ``data-iso`` (its ISO 3166-1 alpha-2 code) and a class saying what
it stands for, with a ``<title>`` a reader sees on hover; the legend and the
notes (subdivision carve-outs, rules the map cannot show) are drawn in the same
SVG, below the map, so a PNG of it says everything the SVG says.

The shapes are :file:`world.svg` beside this module: Natural Earth's 1:50m
countries (public domain) from the npm package ``world-atlas`` (ISC), built
once by :mod:`.worldmap_build` and committed. Not pygal's world map, which
the dashboard extra installs: its shapes are LGPL-3.0 (this project is
Apache-2.0, and a copy would bring that licence along) and it comes as a
chart with scripts and a 1 MB file, where this asset is 116 kB.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from html import escape
from importlib.resources import files

# The asset's box: 1000 wide, projected height 445 (worldmap_build.height()).
WIDTH = 1000
_MAP_HEIGHT = 445
_LINE = 18  # height of a legend or note line, in the box's units
_NOTE_CHARS = 150  # at 13 px, a line of the 1000-wide box
_PATH = re.compile(r'<path data-iso="([A-Z]{2})" d="([^"]+)"/>')

# Each rule is scoped to the map's id: an HTML page with two maps (the report's) shares one stylesheet.
BASE_STYLE = (
    "#{id}{{font:13px/1.3 system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;background:#fff}}"
    "#{id} path{{stroke:#fff;stroke-width:.4;stroke-linejoin:round}}"
    "#{id} .rg-none{{fill:#d9dde3}}#{id} text{{fill:#1f2933}}#{id} .rg-title{{font-weight:600;font-size:16px}}"
    "#{id} .rg-note{{fill:#52606d}}"
)


@dataclass(frozen=True, slots=True)
class Shade:
    """One class of the map: its CSS class, fill colour and legend label."""

    css: str
    fill: str
    label: str


@dataclass(frozen=True, slots=True)
class Country:
    """What one country's shape carries: its class, its hover text, and extra ``data-*`` attributes."""

    css: str
    title: str
    data: tuple[tuple[str, str], ...] = ()


@cache
def shapes() -> dict[str, str]:
    """ISO alpha-2 code -> the path data of that country's shape (read once from the committed asset)."""
    text = files(__package__).joinpath("world.svg").read_text(encoding="utf-8")
    return dict(_PATH.findall(text))


def render(
    countries: Mapping[str, Country],
    shades: Sequence[Shade],
    title: str,
    notes: Sequence[str] = (),
    *,
    css_id: str = "rg-map",
) -> str:
    """The map as one ``<svg>`` element: the title, every country (unlisted ones in class ``rg-none``),
    the legend (only the shades some country has), and the notes, one per line."""
    lines = [line for note in notes for line in textwrap.wrap(note, _NOTE_CHARS, subsequent_indent="    ")]
    used = {c.css.split()[0] for c in countries.values()}
    legend = [s for s in shades if s.css in used]
    columns = 3
    legend_rows = -(-len(legend) // columns)
    top = 30
    height = top + _MAP_HEIGHT + 12 + (legend_rows + len(lines)) * _LINE + 10
    scope = escape(css_id)
    style = BASE_STYLE.format(id=scope) + "".join(f"#{scope} .{s.css}{{fill:{s.fill}}}" for s in shades)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="rg-map" id="{escape(css_id)}" '
        f'viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" '
        f'aria-label="{escape(title)}">',
        f"<style>{style}</style>",
        f'<rect width="{WIDTH}" height="{height}" fill="#fff"/>',
        f'<text class="rg-title" x="8" y="20">{escape(title)}</text>',
        f'<g transform="translate(0 {top})">',
    ]
    for code, d in shapes().items():
        country = countries.get(code)
        if country is None:
            out.append(f'<path data-iso="{code}" class="rg-none" d="{d}"/>')
            continue
        data = "".join(f' data-{k}="{escape(v)}"' for k, v in country.data)
        hover = f"<title>{escape(country.title)}</title>"
        out.append(f'<path data-iso="{code}" class="{escape(country.css)}"{data} d="{d}">{hover}</path>')
    out.append("</g>")
    y = top + _MAP_HEIGHT + 12
    for i, shade in enumerate(legend):
        x = 8 + (i % columns) * (WIDTH // columns)
        row_y = y + (i // columns) * _LINE
        out.append(f'<rect class="{shade.css}" x="{x}" y="{row_y}" width="12" height="12" fill="{shade.fill}"/>')
        out.append(f'<text x="{x + 18}" y="{row_y + 11}">{escape(shade.label)}</text>')
    y += legend_rows * _LINE
    for note in lines:
        out.append(f'<text class="rg-note" x="8" y="{y + 11}">{escape(note)}</text>')
        y += _LINE
    out.append("</svg>")
    return "\n".join(out) + "\n"


def to_png(svg: str, width: int = 1600) -> bytes:
    """The SVG as PNG, drawn by CairoSVG (the dashboard extra; ``ImportError`` says which package is missing)."""
    import cairosvg

    png: bytes = cairosvg.svg2png(bytestring=svg.encode("utf-8"), output_width=width)
    return png


def count_shades(
    counts: Mapping[str, int], colours: Sequence[str], noun: str
) -> tuple[dict[str, Country], list[Shade]]:
    """Countries classed by ``counts`` in steps of ten (1-9, 10-99, ...), one colour per step, for a report's map."""
    steps = len(colours)
    shades = []
    for i, fill in enumerate(colours):
        low, high = 10**i, 10 ** (i + 1) - 1
        label = f"{low:,}+ {noun}" if i == steps - 1 else f"{low:,}-{high:,} {noun}"
        shades.append(Shade(f"rg-n{i}", fill, label))
    countries = {}
    for code, n in counts.items():
        if n > 0:
            step = min(len(str(n)) - 1, steps - 1)
            countries[code] = Country(f"rg-n{step}", f"{code}: {n:,} {noun}", (("n", str(n)),))
    return countries, shades
