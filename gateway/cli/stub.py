"""``regiongate stub``: run the bundled OpenAI-compatible stub upstream (for trying out and tests)."""

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
    st.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime import ConfigError
    from ..stub import run as serve_stub

    try:
        stub = {"status": args.status, "refuse_region": args.refuse_region}
        serve_stub(args.host, args.port, args.certfile, args.keyfile, **stub)
    except ConfigError as e:  # the port is taken, say: one line, as serve says it
        print(f"regiongate: cannot start: {e}", file=sys.stderr)
        return 2
    return 0
