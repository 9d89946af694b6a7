"""``regiongate explain``: the decision for one address and path, and why, from the files given.

The report is :func:`gateway.explain.explain`'s, the one ``GET /admin/explain``
returns; ``--json`` prints it, otherwise :func:`gateway.cli.render.print_explain` words it.
"""

from __future__ import annotations

import argparse
import os
import sys

import orjson

from .options import LOCAL_HELP, add_serve_options, env, geoip, policy_path


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    e = sub.add_parser(
        "explain",
        help="show the decision for an address, and why",
        description="Show the decision for one address and path, which rule (and line) made it, and the "
        "geo facts. " + LOCAL_HELP,
    )
    e.add_argument("ip", help="client address (IPv4 or IPv6) to judge")
    e.add_argument(
        "--path",
        default="/v1/chat/completions",
        help="request path to judge, for policies with paths rules (default: /v1/chat/completions)",
    )
    e.add_argument(
        "--model",
        help="the request body's model, for policies with models or allow_models rules "
        "(left out: judged as a request whose model is unknown, see body.unknown_model)",
    )
    e.add_argument(
        "--body",
        metavar="FILE",
        help="a JSON request body ('-': standard input), read as the gateway reads a held one: its model (unless "
        "--model), and, under a rule with token_limit, what it would reserve under each limit",
    )
    e.add_argument(
        "--max-tokens",
        type=_positive,
        metavar="N",
        help="the request's max_tokens (in place of the body's): what it would reserve under each token_limit",
    )
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument(
        "--missing",
        action="store_true",
        help="judge IP as a trusted proxy whose request named no client (defaults.missing)",
    )
    e.add_argument("--trace", action="store_true", help="every rule in order: matched or not, and which key failed")
    e.add_argument(
        "--redis",
        metavar="URL",
        help="also apply the runtime overrides kept in this Redis, as the gateways sharing it do "
        "(password in REGIONGATE_REDIS_PASSWORD)",
    )
    e.add_argument("--redis-prefix", default=env("REDIS_PREFIX", "regiongate:"), help="as serve --redis-prefix")
    add_serve_options(e, frozenset({"policy", "geoip"}))
    e.set_defaults(func=run)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
    if not 1 <= value <= 10**9:
        raise argparse.ArgumentTypeError("must be from 1 to 1000000000")
    return value


def _read_body(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    with open(name, "rb") as f:
        return f.read()


def run(args: argparse.Namespace) -> int:
    from ..explain import explain
    from ..modelfield import BadBody
    from ..requestpath import BadPath
    from ..runtime import ConfigError, load_checked_policy, load_geo
    from ..usage.request import BadTokens

    try:
        geo = load_geo(geoip(args))
        policy = load_checked_policy(policy_path(args), geo)
    except ConfigError as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 2
    body = None
    if args.body is not None:
        try:
            body = _read_body(args.body)
        except OSError as e:
            print(f"regiongate: --body: {e.strerror or e}: {args.body}", file=sys.stderr)
            return 2
    overrides = None
    if args.redis:
        from ..shared.client import ClientError, RedisClient

        try:
            overrides = RedisClient(args.redis, args.redis_prefix, dict(os.environ)).compiled()
        except ClientError as e:
            print(f"regiongate: {e}", file=sys.stderr)
            return 2
    try:
        result = explain(
            policy,
            geo,
            args.ip,
            args.path,
            with_trace=args.trace,
            missing=args.missing,
            overrides=overrides,
            model=args.model,
            body=body,
            max_tokens=args.max_tokens,
        )
    except BadPath as e:
        print(
            f"regiongate: --path {args.path!r}: {e}; the gateway answers it with a 400, no policy is asked",
            file=sys.stderr,
        )
        return 2
    except (BadBody, BadTokens) as e:
        print(f"regiongate: --body: {e.message.rstrip('.')}; the gateway answers it with a 400", file=sys.stderr)
        return 2
    report = result.report
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    from .render import print_explain

    print_explain(args.ip, result, policy, geo)
    return 0
