"""``regiongate diff``: which callers a policy change treats differently; exit 0 none, 1 some, 2 bad file."""

from __future__ import annotations

import argparse
import sys

import orjson

from ..reports import dump
from .options import add_serve_options, geoip


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser(
        "diff",
        help="which callers a policy change treats differently; exit 0 none, 1 some, 2 bad file",
        description="Judge every country, named subdivision, ASN, CIDR, anonymizer kind, path and client kind "
        "with both policies (the gateway's own decide()) and list the callers whose decision differs.",
    )
    d.add_argument("old", metavar="OLD", help="the policy in force now (YAML file)")
    d.add_argument("new", metavar="NEW", help="the candidate policy (YAML file)")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument(
        "--replay",
        metavar="FILE",
        help="also replay addresses (one per line, optionally followed by a path) or the gateway's JSON-lines "
        "access log through both policies, with the geo data from --geoip; '-' reads stdin",
    )
    d.add_argument(
        "--map",
        metavar="FILE",
        help="also draw what changes for a caller from each country on a world map (.svg or .png; "
        "as regiongate map NEW --diff OLD)",
    )
    add_serve_options(d, frozenset({"geoip"}))
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..diff import diff, replay
    from ..policy import load_policy
    from ..runtime import ConfigError, load_geo
    from ..yamlfile import FileError

    try:
        old, new = load_policy(args.old), load_policy(args.new)
    except FileError as e:
        print(e.render(), file=sys.stderr)
        return 2
    result = diff(old, new)
    replayed = None
    if args.replay is not None:
        try:
            geo = load_geo(geoip(args))
            if args.replay == "-":
                replayed = replay(old, new, geo, sys.stdin)
            else:
                with open(args.replay, encoding="utf-8", errors="replace") as f:
                    replayed = replay(old, new, geo, f)
        except ConfigError as e:
            print(f"regiongate: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"regiongate: --replay {args.replay}: {e.strerror or e}", file=sys.stderr)
            return 2
    if args.map is not None:
        from ..evidence.policymap import diff_svg
        from .map import write_map

        if args.map == "-":  # stdout carries the diff itself
            print("regiongate: --map: give a .svg or .png file name", file=sys.stderr)
            return 2
        if write_map(diff_svg(old, new), args.map) != 0:
            return 2
    changed = result.changed or bool(replayed and replayed.flipped)
    if args.json:
        report = result.report()
        if replayed is not None:
            report = report.model_copy(update={"replay": replayed.report(), "changed": changed})
        sys.stdout.buffer.write(orjson.dumps(dump(report), option=orjson.OPT_INDENT_2) + b"\n")
        return 1 if changed else 0
    from .render import print_diff, print_replay

    print_diff(result)
    if replayed is not None:
        print_replay(args.replay, replayed)
    return 1 if changed else 0
