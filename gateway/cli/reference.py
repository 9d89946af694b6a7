"""``docs/reference/cli.md``, generated from the parsers and :data:`~gateway.cli.options.SERVE_OPTIONS`.

``python -m gateway.cli.reference > docs/reference/cli.md`` writes it; a test
fails when the committed page differs from what this prints, so the reference
cannot fall behind the command line. The ``serve`` table comes from the
options as data (flag, variable, default, help); every other command's from
its argparse help.
"""

from __future__ import annotations

import argparse
import sys

from . import SUBCOMMANDS, _parser
from .options import SERVE_OPTIONS

REGENERATE = "python -m gateway.cli.reference > docs/reference/cli.md"


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell (no pipes, no HTML)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _summaries(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each subcommand's one-line help, as ``--help`` lists it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._get_subactions()}
    return {}


def _metavar(action: argparse.Action) -> str:
    """What follows the flag, as ``--help`` shows it; empty for a switch."""
    if action.nargs == 0:
        return ""
    if isinstance(action.metavar, str):
        return action.metavar
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest.upper()


def _argument(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    metavar = _metavar(action)
    return ", ".join(f"`{flag} {metavar}`" if metavar else f"`{flag}`" for flag in action.option_strings)


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    rows = [
        action
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
    ]
    if not rows:
        return []
    out = ["| Argument | What it does |", "|---|---|"]
    out += [f"| {_argument(a)} | {_cell(a.help or '')} |" for a in rows]
    return [*out, ""]


def _serve(parser: argparse.ArgumentParser) -> list[str]:
    out = [_cell(parser.description or ""), ""]
    out += ["| Flag | Variable | Default | What it does |", "|---|---|---|---|"]
    actions = {a.dest: a for a in parser._actions}
    for o in SERVE_OPTIONS:
        flag = _argument(actions[o.dest])
        variable = f"`{o.variable}`" + (" (comma-separated)" if o.listed else "")
        out.append(f"| {flag} | {variable} | {_cell(o.default)} | {_cell(o.help)} |")
    return [*out, ""]


def _command(name: str, parser: argparse.ArgumentParser, level: int) -> list[str]:
    out = [f"{'#' * level} regiongate {name}", ""]
    if name == "serve":
        return out + _serve(parser)
    if parser.description:
        out += [_cell(parser.description), ""]
    out += _arguments(parser)
    summaries = _summaries(parser)
    for sub, subparser in _subparsers(parser).items():
        out += [f"{'#' * (level + 1)} regiongate {name} {sub}", ""]
        if summaries.get(sub):
            out += [_cell(summaries[sub][:1].upper() + summaries[sub][1:]) + ".", ""]
        out += _arguments(subparser)
    return out


def markdown() -> str:
    """The whole page."""
    parser = _parser()
    summaries = _summaries(parser)
    out = [
        "# Command line",
        "",
        f"<!-- Generated from gateway/cli/ by `{REGENERATE}`; do not edit by hand. -->",
        "",
        f"`regiongate`: {parser.description} `regiongate --version` prints the version; "
        "`regiongate COMMAND --help` describes a command.",
        "",
        "| Command | What it does |",
        "|---|---|",
    ]
    out += [
        f"| [`{m.__name__.rsplit('.', 1)[1]}`](#regiongate-{m.__name__.rsplit('.', 1)[1]}) | "
        f"{_cell(summaries[m.__name__.rsplit('.', 1)[1]])} |"
        for m in SUBCOMMANDS
    ]
    out.append("")
    for name, sub in _subparsers(parser).items():
        out += _command(name, sub, 2)
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
