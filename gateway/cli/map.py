"""``regiongate map``: the world coloured by what a policy does to each country (SVG or PNG)."""

from __future__ import annotations

import argparse
import sys

from .options import add_serve_options, geoip


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser(
        "map",
        help="the world coloured by what a policy does to each country (SVG or PNG)",
        description="Judge a caller from every country with the policy (the gateway's own decide()) and draw "
        "the world coloured by the outcome: allowed, refused, monitored, rate-limited, routed to which upstream. "
        "Subdivision carve-outs and rules that name no place are listed below the map. "
        "With --diff OLD, colour what changes from OLD to POLICY instead.",
    )
    m.add_argument("policy", metavar="POLICY", help="the policy (YAML file)")
    m.add_argument("--diff", metavar="OLD", help="colour what changes from this policy to POLICY")
    m.add_argument(
        "--out",
        "-o",
        metavar="FILE",
        default="-",
        help="where to write: a .svg or .png file, or '-' for SVG on stdout (default)",
    )
    add_serve_options(m, frozenset({"geoip"}))
    m.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evidence.policymap import diff_svg, policy_map
    from ..policy import load_policy
    from ..runtime import ConfigError, load_geo
    from ..yamlfile import FileError

    try:
        capabilities = load_geo(geoip(args)).capabilities if geoip(args) else None
        policy = load_policy(args.policy, capabilities)
        svg = diff_svg(load_policy(args.diff, capabilities), policy) if args.diff else policy_map(policy).svg()
    except FileError as e:
        print(e.render(), file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 2
    return write_map(svg, args.out)


def write_map(svg: str, out: str) -> int:
    """Write ``svg`` to ``out`` (stdout for '-'; PNG for a .png name); 2 with one line on a problem."""
    if out == "-":
        sys.stdout.write(svg)
        return 0
    try:
        if out.lower().endswith(".png"):
            from ..evidence.worldmap import to_png

            data = to_png(svg)
        elif out.lower().endswith(".svg"):
            data = svg.encode("utf-8")
        else:
            print(f"regiongate: --out {out}: give a .svg or .png file name", file=sys.stderr)
            return 2
        with open(out, "wb") as f:
            f.write(data)
    except ImportError as e:
        print(f"regiongate: PNG needs CairoSVG (pip install 'regiongate[dashboard]'): {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"regiongate: --out {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0
