"""``regiongate``: serve, check, explain, diff, map, override, keys, audit, report, policies, schema, stub.

- ``serve``: run the gateway (:mod:`~gateway.cli.serve`; its options are data in :mod:`~gateway.cli.options`);
- ``check``: validate policy files and run their tests (:mod:`~gateway.cli.check`);
- ``explain``: the decision for one address and path, and why (:mod:`~gateway.cli.explain`);
- ``diff``: which callers a policy change treats differently, optionally replaying traffic (:mod:`~gateway.cli.diff`);
- ``map``: the world coloured by what a policy (or a policy change) does to each country (:mod:`~gateway.cli.map`);
- ``override add|list|remove``: runtime overrides, through a gateway's admin API or Redis
  (:mod:`~gateway.cli.override`);
- ``keys add|list|revoke``: the gateway's own client keys, through its admin API, Redis or a keys file
  (:mod:`~gateway.cli.keys`);
- ``audit tail|export``: read the Redis audit stream (:mod:`~gateway.cli.audit`);
- ``report``: a dated evidence pack (JSON, HTML, PDF) from the audit stream or an export (:mod:`~gateway.cli.report`);
- ``policies``: the shipped policies, with the provider, source and date of each list (:mod:`~gateway.cli.policies`);
- ``schema``: print the policy file's JSON Schema (:mod:`~gateway.cli.schema`);
- ``stub``: run the bundled OpenAI-compatible stub upstream (:mod:`~gateway.cli.stub`).

Every ``serve`` flag has a ``REGIONGATE_*`` environment variable (flags win);
repeatable flags take a comma-separated list there. ``check`` and
``explain`` accept the same policy and geo flags as ``serve``, so that what
they say is what a running gateway with those flags would do. Text output is
worded in :mod:`~gateway.cli.render`; ``docs/reference/cli.md`` is generated
from these parsers by :mod:`gateway.cli.reference`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .. import __version__
from . import audit, check, diff, explain, keys, map, override, policies, report, schema, serve, stub

# In the order ``regiongate --help`` lists them.
SUBCOMMANDS = (serve, check, explain, diff, map, override, keys, audit, report, policies, schema, stub)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, pointing at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    """The whole command line; each subcommand's module adds its parser and sets ``func``."""
    parser = _Parser(prog="regiongate", description="Region-aware gateway for model APIs.")
    parser.add_argument("--version", action="version", version=f"regiongate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in SUBCOMMANDS:
        command.add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.func
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed: not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
