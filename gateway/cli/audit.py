"""``regiongate audit tail|export``: read the Redis audit stream that gateways with ``--redis`` write."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .options import add_redis_options


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    au = sub.add_parser(
        "audit",
        help="read the Redis audit stream (refusals, or every decision with serve --audit all)",
        description="Read the audit stream <prefix>audit that gateways with --redis write.",
    )
    asub = au.add_subparsers(dest="audit_command", required=True, help="what to do")
    at = asub.add_parser("tail", help="the latest entries as JSON lines")
    at.add_argument("-n", "--count", type=int, default=20, help="how many of the latest entries (default: 20)")
    at.add_argument("--follow", "-f", action="store_true", help="then keep printing new entries as they come")
    ae = asub.add_parser("export", help="entries since a time, as JSON lines or CSV")
    ae.add_argument("--since", default="24h", help="how far back: 30m, 12h, 7d (default: 24h)")
    ae.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="output format (default: jsonl)")
    for p in (at, ae):
        add_redis_options(p)
    au.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from ..runtime import parse_duration
    from ..shared import audit
    from ..shared.redisconn import RedisConfigError, RedisUnavailable

    if not args.redis:
        print("regiongate: give --redis (or REGIONGATE_REDIS_URL)", file=sys.stderr)
        return 1
    env = dict(os.environ)
    try:
        if args.audit_command == "tail":
            asyncio.run(audit.read(args.redis, args.redis_prefix, env, count=args.count, follow=args.follow))
        else:
            since = parse_duration(args.since)
            if args.format == "jsonl":
                asyncio.run(audit.read(args.redis, args.redis_prefix, env, since=since))
            else:
                rows: list[dict[str, Any]] = []
                asyncio.run(audit.read(args.redis, args.redis_prefix, env, since=since, out=rows))
                sys.stdout.write(audit.as_csv(rows))
    except (RedisConfigError, RedisUnavailable, ValueError) as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 1
    return 0
