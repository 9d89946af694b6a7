"""``regiongate serve``: run the gateway with the options of :mod:`gateway.cli.options`."""

from __future__ import annotations

import argparse
import sys

from .options import add_serve_options, serve_values


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Every option has a REGIONGATE_* environment variable; a flag beats its variable.",
    )
    add_serve_options(s)
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ..policy import plain_error
    from ..runtime import ConfigError, Settings
    from ..server import serve

    values, sources = serve_values(args)
    try:
        settings = Settings(**values)
    except ValidationError as e:
        for err in e.errors():
            dest = str(err["loc"][0]) if err["loc"] else ""
            print(f"regiongate: {sources.get(dest, dest)}: {plain_error(err)}", file=sys.stderr)
        return 2
    try:
        return serve(settings)
    except ConfigError as e:
        text = str(e)  # several problems (a policy file's) go one per line
        sep = "\n" if "\n" in text else " "
        print(f"regiongate: cannot start:{sep}{text}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"regiongate: cannot start: {e.strerror or e}", file=sys.stderr)
        return 2
