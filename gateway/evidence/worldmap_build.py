"""Build the committed world map asset (``world.svg``) from Natural Earth's 1:50m countries.

Run by hand when the asset should change, not at install or run time::

    npm pack world-atlas@2.0.2 && tar xzf world-atlas-2.0.2.tgz
    python -m gateway.evidence.worldmap_build package/countries-50m.json > gateway/evidence/world.svg

The input is the TopoJSON that the npm package ``world-atlas`` (ISC licence,
Mike Bostock) derives from Natural Earth (public domain). The output is one
``<path>`` per ISO 3166-1 alpha-2 code, projected with the Natural Earth
projection (Šavrič et al. 2011: a compromise projection, so that neither
Russia nor Africa looks wrong to a reader) into a 1000-unit-wide box, with
coordinates rounded to 0.1 unit and repeated points dropped: about a fifth of the
50m file's size, and finer than the 110m file, which lacks Singapore, Bahrain
and most small island states.

Antarctica is left out: no policy has a reason to name it, and it would take
a sixth of the picture. Features without an ISO number are mapped as GeoIP
databases report them: Kosovo as XK, Somaliland as SO, Northern Cyprus as CY;
the others (Indian Ocean territories, Siachen Glacier) are dropped.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import orjson

WIDTH = 1000.0
# Points closer than this (in units of the 1000-wide box) to the line of their neighbours are dropped:
# at 1000 px, less than a pixel; it takes the 50m file's shapes from 765 kB to ~150 kB of SVG.
TOLERANCE = 0.35
MARKER = 1.5
UNNUMBERED = {"Kosovo": "XK", "Somaliland": "SO", "N. Cyprus": "CY"}
LEFT_OUT = frozenset({"AQ"})
# The projection's x at longitude 180 on the equator; its y at the pole is _Y_MAX, below.
_X_MAX = math.pi * 0.8707
(math.pi / 2) * (
    1.007226
    + (math.pi / 2) ** 2
    * (0.015085 + (math.pi / 2) ** 4 * (-0.044475 + 0.028874 * (math.pi / 2) ** 2 - 0.005916 * (math.pi / 2) ** 4))
)
SCALE = WIDTH / (2 * _X_MAX)
# Southern edge: 58 degrees south, below Cape Horn and above Antarctica.
_SOUTH = math.radians(-58.0)


def natural_earth(lon: float, lat: float) -> tuple[float, float]:
    """Longitude and latitude in degrees to the Natural Earth projection's plane (unit sphere)."""
    lam, phi = math.radians(lon), math.radians(lat)
    p2 = phi * phi
    p4 = p2 * p2
    x = lam * (0.8707 - 0.131979 * p2 + p4 * (-0.013791 + p4 * (0.003971 * p2 - 0.001529 * p4)))
    y = phi * (1.007226 + p2 * (0.015085 + p4 * (-0.044475 + 0.028874 * p2 - 0.005916 * p4)))
    return x, y


_Y_MAX = natural_earth(0.0, 90.0)[1]  # the pole line's y


def height() -> float:
    _, south = natural_earth(0.0, math.degrees(_SOUTH))
    return round((_Y_MAX - south) * SCALE, 1)


def to_box(lon: float, lat: float) -> tuple[float, float]:
    x, y = natural_earth(lon, lat)
    return round((x + _X_MAX) * SCALE, 1), round((_Y_MAX - y) * SCALE, 1)


def decode_arcs(topology: dict[str, Any]) -> list[list[tuple[float, float]]]:
    """The topology's arcs as absolute longitude/latitude points (they are quantized and delta-coded)."""
    (sx, sy), (tx, ty) = topology["transform"]["scale"], topology["transform"]["translate"]
    out = []
    for arc in topology["arcs"]:
        x = y = 0
        points = []
        for dx, dy in arc:
            x += dx
            y += dy
            points.append((x * sx + tx, y * sy + ty))
        out.append(points)
    return out


def ring(arcs: list[list[tuple[float, float]]], indexes: Sequence[int]) -> list[tuple[float, float]]:
    """One closed ring from its arcs (a negative index ~i is arc i reversed); shared ends appear once."""
    points: list[tuple[float, float]] = []
    for i in indexes:
        arc = arcs[i] if i >= 0 else arcs[~i][::-1]
        points.extend(arc if not points else arc[1:])
    return points


def simplify(points: list[tuple[float, float]], tolerance: float = TOLERANCE) -> list[tuple[float, float]]:
    """Ramer-Douglas-Peucker: the points that stray more than ``tolerance`` from the line of their neighbours."""
    if len(points) < 3:
        return points
    keep = [False] * len(points)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        first, last = stack.pop()
        (ax, ay), (bx, by) = points[first], points[last]
        dx, dy = bx - ax, by - ay
        norm = math.hypot(dx, dy)
        far, index = 0.0, -1
        for i in range(first + 1, last):
            px, py = points[i]
            d = abs(dy * (px - ax) - dx * (py - ay)) / norm if norm else math.hypot(px - ax, py - ay)
            if d > far:
                far, index = d, i
        if far > tolerance:
            keep[index] = True
            stack += [(first, index), (index, last)]
    return [p for p, k in zip(points, keep, strict=True) if k]


def _number(v: float) -> str:
    text = f"{v:.1f}".rstrip("0").rstrip(".")
    return text.replace("0.", ".", 1) if text.startswith(("0.", "-0.")) else text or "0"


def split_at_antimeridian(points: list[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """A ring that crosses longitude 180 (Russia's Chukotka, Fiji) as rings on either side of it.

    Unsplit, the jump from +180 to -180 would draw a line across the whole
    map. The ring is turned to start after a jump and cut at every jump; each
    piece is closed along the antimeridian.
    """
    jumps = [i for i in range(1, len(points)) if abs(points[i][0] - points[i - 1][0]) > 180]
    if not jumps:
        return [points]
    turned = points[jumps[0] :] + points[1 : jumps[0]]  # the ring's first and last points are the same
    pieces, piece = [], [turned[0]]
    for a, b in itertools.pairwise(turned):
        if abs(b[0] - a[0]) > 180:
            pieces.append(piece)
            piece = []
        piece.append(b)
    pieces.append(piece)
    return [p + p[:1] for p in pieces if len(p) >= 3]


def path_data(rings: Iterator[list[tuple[float, float]]]) -> str:
    parts = []
    for points in (piece for whole in rings for piece in split_at_antimeridian(whole)):
        box: list[tuple[float, float]] = []
        for lon, lat in points:
            p = to_box(lon, lat)
            if not box or p != box[-1]:
                box.append(p)
        box = simplify(box)
        if len(box) < 4:
            continue  # an islet under half a unit across: nothing to draw
        moves = "".join(f"l{_number(b[0] - a[0])} {_number(b[1] - a[1])}" for a, b in itertools.pairwise(box[:-1]))
        parts.append(f"M{_number(box[0][0])} {_number(box[0][1])}{moves}z")
    return "".join(parts)


def marker(rings: Iterator[list[tuple[float, float]]]) -> str:
    """A diamond 3 units across where a country too small to draw lies (Vatican, Monaco), to be coloured."""
    points = [to_box(lon, lat) for r in rings for lon, lat in r]
    x = sum(p[0] for p in points) / len(points)
    y = sum(p[1] for p in points) / len(points)
    return f"M{_number(x)} {_number(y - MARKER)}l{MARKER:g} {MARKER:g}l-{MARKER:g} {MARKER:g}l-{MARKER:g} -{MARKER:g}z"


def geometry_rings(
    geometry: dict[str, Any], arcs: list[list[tuple[float, float]]]
) -> Iterator[list[tuple[float, float]]]:
    polygons = geometry["arcs"] if geometry["type"] == "MultiPolygon" else [geometry["arcs"]]
    for polygon in polygons:
        for indexes in polygon:
            yield ring(arcs, indexes)


def alpha2(geometry: dict[str, Any]) -> str | None:
    import pycountry

    number = geometry.get("id")
    if number is None:
        return UNNUMBERED.get(geometry.get("properties", {}).get("name", ""))
    found = pycountry.countries.get(numeric=number)
    return None if found is None else str(found.alpha_2)


def build(topology: dict[str, Any]) -> str:
    arcs = decode_arcs(topology)
    shapes: dict[str, list[str]] = {}
    for geometry in topology["objects"]["countries"]["geometries"]:
        code = alpha2(geometry)
        if code is None or code in LEFT_OUT or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        d = path_data(geometry_rings(geometry, arcs)) or marker(geometry_rings(geometry, arcs))
        shapes.setdefault(code, []).append(d)
    lines = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH:g} {height():g}">',
        "<!-- Natural Earth 1:50m countries (public domain), via world-atlas 2.0.2 (ISC, Mike Bostock);"
        " built by gateway/evidence/worldmap_build.py -->",
    ]
    lines += [f'<path data-iso="{code}" d="{"".join(shapes[code])}"/>' for code in sorted(shapes)]
    lines.append("</svg>")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m gateway.evidence.worldmap_build countries-50m.json > world.svg", file=sys.stderr)
        return 2
    with open(args[0], "rb") as f:
        sys.stdout.write(build(orjson.loads(f.read())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
