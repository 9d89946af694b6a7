"""``regiongate stub``: run the bundled OpenAI-compatible stub upstream (for trying out and tests).

The stub (:mod:`gateway.stub`) runs on aiohttp, which only the ``stub`` extra
installs; without it this command says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = sub.add_parser("stub", help="run the bundled OpenAI-compatible stub upstream (for trying out and tests)")
    st.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    st.add_argument("--port", type=int, default=8000, help="listen port (default: 8000)")
    st.add_argument("--certfile", help="serve HTTPS with this certificate chain (PEM)")
    st.add_argument("--keyfile", help="the certificate's private key (PEM)")
    st.add_argument(
        "--status", type=int, metavar="N", help="answer every request with this status (after reading its body)"
    )
    st.add_argument(
        "--refuse-region",
        action="store_true",
        help="answer every request with OpenAI's 403 refusal of the caller's region",
    )
    st.add_argument(
        "--ignore-stream-options",
        action="store_true",
        help="never send a chat stream's usage, even when stream_options.include_usage asks for it",
    )
    st.add_argument("--no-usage", action="store_true", help="send no token usage in any answer")
    st.set_defaults(func=run)


# aiohttp is in the optional extra "stub": the gateway itself never needs it.
MISSING_AIOHTTP = "regiongate: the stub needs aiohttp, which is not installed: pip install 'regiongate[stub]'"


def run(args: argparse.Namespace) -> int:
    from ..runtime import ConfigError

    try:
        from ..stub import run as serve_stub
    except ModuleNotFoundError as e:
        if e.name is None or e.name.partition(".")[0] != "aiohttp":
            raise
        print(MISSING_AIOHTTP, file=sys.stderr)
        return 2

    try:
        stub = {
            "status": args.status,
            "refuse_region": args.refuse_region,
            "ignore_stream_options": args.ignore_stream_options,
            "no_usage": args.no_usage,
        }
        serve_stub(args.host, args.port, args.certfile, args.keyfile, **stub)
    except ConfigError as e:  # the port is taken, say: one line, as serve says it
        print(f"regiongate: cannot start: {e}", file=sys.stderr)
        return 2
    return 0
