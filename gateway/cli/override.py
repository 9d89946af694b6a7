"""``regiongate override add|list|remove``: runtime overrides, through a gateway's admin API or straight to Redis."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import orjson

from .options import add_redis_options


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    o = sub.add_parser(
        "override",
        help="add, list or remove runtime overrides (through a gateway's admin API or straight to Redis)",
        description="Runtime overrides: allow or deny a CIDR, API key, country or subdivision now, before the "
        "policy. Give --admin-url (token in REGIONGATE_ADMIN_TOKEN) or --redis.",
    )
    osub = o.add_subparsers(dest="override_command", required=True, help="what to do")
    oa = osub.add_parser("add", help="add an override")
    oa.add_argument("action", choices=["allow", "deny"], help="let through or refuse, whatever the policy says")
    subject = oa.add_mutually_exclusive_group(required=True)
    subject.add_argument("--cidr", help="an IPv4 or IPv6 block")
    subject.add_argument("--country", help="ISO 3166-1 alpha-2 code")
    subject.add_argument("--subdivision", help="ISO 3166-2 code, e.g. GB-ENG")
    subject.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="name of an environment variable holding the caller's API key (never the key itself on the "
        "command line); only its keyed hash is stored",
    )
    oa.add_argument("--reason", required=True, help="why (shown in explain, logs and the list)")
    oa.add_argument("--by", default=os.environ.get("USER", ""), help="who sets it (default: $USER)")
    oa.add_argument("--ttl", metavar="DURATION", help="expires after this long (90s, 30m, 12h, 7d); default: never")
    oa.add_argument("--id", help="the override's id (default: a random one)")
    ol = osub.add_parser("list", help="list the overrides in force")
    ol.add_argument("--json", action="store_true", help="machine-readable output")
    orm = osub.add_parser("remove", help="remove an override")
    orm.add_argument("id", help="the override's id (see override list)")
    for p in (oa, ol, orm):
        p.add_argument(
            "--admin-url", metavar="URL", help="a running gateway's control plane, e.g. http://127.0.0.1:9090"
        )
        add_redis_options(p)
    o.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime import parse_duration
    from ..shared.client import ClientError, client_for, render

    try:
        # A gateway's admin URL beats a Redis URL that only came from the environment.
        redis = None if args.admin_url else args.redis
        client = client_for(args.admin_url, redis, args.redis_prefix)
        if args.override_command == "add":
            body: dict[str, Any] = {"action": args.action, "reason": args.reason, "by": args.by}
            if args.id:
                body["id"] = args.id
            if args.ttl:
                try:
                    body["ttl"] = parse_duration(args.ttl)
                except ValueError as e:
                    raise ClientError(f"--ttl: {e}") from None
            if args.api_key_env:
                key = os.environ.get(args.api_key_env)
                if not key:
                    raise ClientError(f"--api-key-env: {args.api_key_env} is not set")
                body["api_key"] = key
            else:
                kind = next(k for k in ("cidr", "country", "subdivision") if getattr(args, k))
                body[kind] = getattr(args, kind)
            out = client.add(body)
            print(f"added override {out['id']}: {out['action']} {out['kind']} {out['value']} (rule {out['rule']})")
        elif args.override_command == "list":
            rows = client.list()
            if args.json:
                sys.stdout.buffer.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2) + b"\n")
            else:
                for line in render(rows):
                    print(line)
        else:
            client.remove(args.id)
            print(f"removed override {args.id}")
    except ClientError as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 1
    return 0
