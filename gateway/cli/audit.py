"""``regiongate audit tail|export|verify``: read and check the Redis audit stream that gateways with ``--redis`` write.

``verify`` exits 0 when every chain checks out, 1 when one does not (an
entry altered, removed, reordered, unsigned or under a key not given) and 2
when it could not check at all (Redis unreachable, an unreadable file or
key file, no key).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from .options import add_redis_options

EXIT_OK, EXIT_BROKEN, EXIT_UNCHECKED = 0, 1, 2


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    au = sub.add_parser(
        "audit",
        help="read and verify the Redis audit stream (refusals, or every decision with serve --audit all)",
        description="Read the audit stream <prefix>audit that gateways with --redis write, or verify its chains.",
    )
    asub = au.add_subparsers(dest="audit_command", required=True, help="what to do")
    at = asub.add_parser("tail", help="the latest request entries as JSON lines")
    at.add_argument("-n", "--count", type=int, default=20, help="how many of the latest entries (default: 20)")
    at.add_argument("--follow", "-f", action="store_true", help="then keep printing new entries as they come")
    ae = asub.add_parser(
        "export",
        help="entries since a time: request entries as JSON lines or CSV, or the whole chained evidence",
        description="jsonl and csv give the request entries; chain gives every entry with its chain, the policy "
        "texts and the hourly counts, a file that `audit verify --file` checks without Redis.",
    )
    ae.add_argument("--since", default="24h", help="how far back: 30m, 12h, 7d, or 'all' (default: 24h)")
    ae.add_argument(
        "--format", choices=["jsonl", "csv", "chain"], default="jsonl", help="output format (default: jsonl)"
    )
    ae.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")
    for p in (at, ae):
        p.add_argument("--all-kinds", action="store_true", help="also the chain's other entries (jsonl, tail)")
    av = asub.add_parser(
        "verify",
        help="check the HMAC chains: OK, or the first entry altered, removed or reordered",
        description="Check every gateway's chain in Redis, or in a file from `audit export --format chain`. "
        "Keys: REGIONGATE_AUDIT_KEY (id REGIONGATE_AUDIT_KEY_ID) and --key-file for earlier ones. "
        "Exit 0: every chain OK; 1: a chain is broken, unsigned or under a key not given; 2: could not check.",
    )
    av.add_argument("--file", metavar="EXPORT", help="verify an exported file instead of Redis")
    av.add_argument("--key-file", metavar="FILE", action="append", default=[], help="kid:secret lines (repeatable)")
    av.add_argument("--since", help="only entries since: 30m, 12h, 7d (default: the whole stream)")
    av.add_argument("--format", choices=["text", "json"], default="text", help="output format (default: text)")
    for p in (at, ae, av):
        add_redis_options(p)
    au.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"regiongate: {message}", file=sys.stderr)
    return EXIT_UNCHECKED


def run(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from ..runtime import parse_duration
    from ..shared import audit
    from ..shared.redisconn import RedisConfigError, RedisUnavailable

    if args.audit_command == "verify":
        return verify(args)
    if not args.redis:
        print("regiongate: give --redis (or REGIONGATE_REDIS_URL)", file=sys.stderr)
        return 1
    env = dict(os.environ)
    kinds = args.all_kinds
    try:
        if args.audit_command == "tail":
            asyncio.run(
                audit.read(args.redis, args.redis_prefix, env, count=args.count, follow=args.follow, all_kinds=kinds)
            )
        elif args.format == "chain":
            return export_chain(args)
        else:
            since = parse_duration(args.since) if args.since != "all" else time.time()  # all: since the epoch
            rows: list[dict[str, Any]] = []
            asyncio.run(audit.read(args.redis, args.redis_prefix, env, since=since, out=rows, all_kinds=kinds))
            text = (
                "".join(orjson.dumps(r).decode() + "\n" for r in rows) if args.format == "jsonl" else audit.as_csv(rows)
            )
            if args.out:
                Path(args.out).write_text(text)
            else:
                sys.stdout.write(text)
    except (RedisConfigError, RedisUnavailable, ValueError, OSError) as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 1
    return 0


def export_chain(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from ..evidence import exportfile
    from ..runtime import parse_duration
    from ..shared.auditread import read_evidence

    since = time.time() - parse_duration(args.since) if args.since != "all" else None
    ev = asyncio.run(read_evidence(args.redis, args.redis_prefix, dict(os.environ), since=since))
    since_text = datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds") if since is not None else None
    now = datetime.now(UTC).isoformat(timespec="seconds")
    lines = [exportfile.header_line(now, args.redis_prefix, since_text, None)]
    lines += [exportfile.entry_line(sid, e) for sid, e in ev.items]
    lines += [exportfile.policy_line(sha, text) for sha, text in sorted(ev.policy_texts.items())]
    lines += [
        exportfile.hourly_line(r["hour"], r["country"], r["subdivision"], r["decision"], r["rule"], r["n"])
        for r in ev.hourly
    ]
    data = b"".join(lines)
    if args.out:
        Path(args.out).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
    return 0


def verify(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from ..evidence.chain import KEY_ENV, AuditKeyError, key_from_env, parse_key_file, verify
    from ..evidence.exportfile import ExportError, load_export
    from ..runtime import parse_duration
    from ..shared.auditread import read_evidence
    from ..shared.redisconn import RedisConfigError, RedisUnavailable

    try:
        keys: dict[str, bytes] = {}
        for path in args.key_file:
            keys |= parse_key_file(Path(path).read_text(), path)
        current = key_from_env(os.environ)
        if current is not None:
            keys[current.kid] = current.secret
        if not keys:
            return _fail(f"no key to verify with: set {KEY_ENV} (and REGIONGATE_AUDIT_KEY_ID) or give --key-file")
        since = time.time() - parse_duration(args.since) if args.since else None
        if args.file:
            with open(args.file, "rb") as f:
                items = load_export(f, args.file).items
            where = args.file
        elif args.redis:
            read = read_evidence(args.redis, args.redis_prefix, dict(os.environ), since=since, hourly=False)
            items = asyncio.run(read).items
            where = f"{args.redis_prefix}audit"
        else:
            return _fail("give --file EXPORT, or --redis (or REGIONGATE_REDIS_URL)")
    except (AuditKeyError, ExportError, RedisConfigError, RedisUnavailable, ValueError, OSError) as e:
        return _fail(str(e))
    result = verify(items, keys)
    if args.format == "json":
        print(orjson.dumps(_as_json(result, where), option=orjson.OPT_INDENT_2).decode())
    else:
        _print_text(result, where)
    return EXIT_OK if result.ok else EXIT_BROKEN


def _as_json(result: Any, where: str) -> dict[str, Any]:
    from dataclasses import asdict

    return {
        "source": where,
        "ok": result.ok,
        "unchained": result.unchained,
        "malformed": list(result.malformed),
        "chains": [asdict(c) | {"ok": c.ok, "notices": c.notices()} for c in result.chains],
    }


def _print_text(result: Any, where: str) -> None:
    for c in result.chains:
        span = f"seq {c.first_seq}..{c.last_seq}, {c.entries} entries, {c.first_time} to {c.last_time}"
        if c.ok:
            print(f"OK      {c.chain} ({span})")
        else:
            p = c.problems[0]
            more = f" (+{len(c.problems) - 1} more)" if len(c.problems) > 1 else ""
            print(f"{p.what.upper():<8}{c.chain} ({span}): {p.detail}; stream id {p.stream_id}, time {p.time}{more}")
        for g in c.gaps:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(g.reasons.items()))
            print(f"  gap (seq {g.seq}): {g.lost} entries lost from {g.start} to {g.end} ({reasons})")
        for n in c.notices():
            print(f"  notice: {n}")
    for sid in result.malformed:
        print(f"MALFORMED stream id {sid}: not an audit entry")
    broken = sum(1 for c in result.chains if not c.ok)
    print(
        f"{where}: {len(result.chains)} chains, {len(result.chains) - broken} OK, {broken} not OK"
        + (f"; {result.unchained} entries from before the chain (not covered)" if result.unchained else "")
    )
