"""``regiongate schema``: print the policy file's JSON Schema."""

from __future__ import annotations

import argparse
import sys

import orjson


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser("schema", help="print the policy file's JSON Schema").set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..policy import json_schema

    sys.stdout.buffer.write(orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2) + b"\n")
    return 0
