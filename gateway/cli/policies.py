"""``regiongate policies``: the policies shipped with Regiongate, and the published lists they follow.

Each shipped file is listed with its provider, source and capture date (its
``provider:``, ``source:`` and ``captured:``) and the age of that date, so that
an operator can see which list a policy follows and how old it is before
choosing it; ``--json`` prints one :class:`~gateway.reports.ShippedPolicyOut`
per file. The files are read from the wheel (``gateway/policies``) or, in a
source checkout, from ``policies/``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from ..reports import ShippedPolicyOut


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "policies",
        help="list the shipped policies with their provider, source and capture date",
        description="List the policies shipped with Regiongate: the provider whose published list each "
        "follows, where it was read, the day it was read and how long ago. Pass a file's path to "
        "--policy; `regiongate check --max-age 180d FILE` says when a list is due to be read again.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output (one object per file)")
    p.set_defaults(func=run)


def today() -> datetime.date:
    """The day a list's age is counted to (UTC), here and by ``check --max-age``; tests replace it."""
    return datetime.datetime.now(datetime.UTC).date()


def shipped(directory: Path, day: datetime.date) -> list[ShippedPolicyOut]:
    """Every shipped file (top level, then examples/), as ``regiongate policies`` lists it."""
    from ..policy import age_days, load_policy
    from ..reports import ShippedPolicyOut

    out = []
    for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("examples/*.yaml")):
        spec = load_policy(str(path), None).spec
        out.append(
            ShippedPolicyOut(
                file=path.relative_to(directory).as_posix(),
                path=str(path),
                description=spec.description,
                provider=spec.provider,
                source=list(spec.source or []),
                captured=spec.captured.isoformat() if spec.captured else None,
                age_days=age_days(spec.captured, day) if spec.captured else None,
                rules=len(spec.rules),
            )
        )
    return out


def run(args: argparse.Namespace) -> int:
    from ..reports import dump
    from ..runtime import shipped_policies_dir
    from ..yamlfile import FileError

    directory = shipped_policies_dir()
    try:
        found = shipped(directory, today())
    except FileError as e:  # a damaged installation: say which file
        print(e.render(), file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.buffer.write(orjson.dumps([dump(p) for p in found], option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    from .render import print_shipped

    print_shipped(directory, found)
    return 0
