"""``regiongate``: serve, check, explain, stub.

Every ``serve`` flag has a ``REGIONGATE_*`` environment variable (flags win);
repeatable flags take a comma-separated list there. ``check`` and
``explain`` accept the same policy and geo flags as ``serve``, so that what
they say is what a running gateway with those flags would do.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from . import __version__

ENV_PREFIX = "REGIONGATE_"


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(ENV_PREFIX + name, default)


def _env_list(name: str) -> list[str]:
    value = os.environ.get(ENV_PREFIX + name, "")
    return [v.strip() for v in value.split(",") if v.strip()]


def _add_geo_flags(p: argparse.ArgumentParser, with_policy: bool = True) -> None:
    if with_policy:
        p.add_argument(
            "--policy",
            default=_env("POLICY"),
            help="policy YAML (env REGIONGATE_POLICY; default: the shipped country-only OpenAI policy)",
        )
    p.add_argument(
        "--geoip",
        action="append",
        default=None,
        metavar="MMDB",
        help="MaxMind-format database, repeatable (env REGIONGATE_GEOIP, comma-separated); none: embedded country data",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regiongate", description="Region-aware gateway for model APIs.")
    parser.add_argument("--version", action="version", version=f"regiongate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    _add_geo_flags(s)
    s.add_argument(
        "--trusted-proxy",
        action="append",
        default=None,
        metavar="CIDR",
        help="peer allowed to set the client address header, repeatable (env REGIONGATE_TRUSTED_PROXY); "
        "default: nobody",
    )
    s.add_argument(
        "--allow-trust-all",
        action="store_true",
        default=None,
        help="accept a --trusted-proxy list that covers every public address (env REGIONGATE_ALLOW_TRUST_ALL); "
        "refused without it, since then any caller can choose its country",
    )
    s.add_argument(
        "--client-ip-header",
        default=_env("CLIENT_IP_HEADER", "x-forwarded-for"),
        help="X-Forwarded-For, Forwarded, or a single-value header like CF-Connecting-IP "
        "(env REGIONGATE_CLIENT_IP_HEADER)",
    )
    s.add_argument(
        "--upstream",
        default=_env("UPSTREAM"),
        help="URL of the upstream named 'default' "
        "when the policy defines none (env REGIONGATE_UPSTREAM; default https://api.openai.com)",
    )
    s.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="proxy address (env REGIONGATE_HOST)")
    s.add_argument("--port", type=int, default=int(_env("PORT", 8080)), help="proxy port (env REGIONGATE_PORT)")
    s.add_argument(
        "--admin-host",
        default=_env("ADMIN_HOST", "127.0.0.1"),
        help="control-plane address (env REGIONGATE_ADMIN_HOST)",
    )
    s.add_argument(
        "--admin-port",
        type=int,
        default=int(_env("ADMIN_PORT", 9090)),
        help="control-plane port: /healthz /readyz /metrics (env REGIONGATE_ADMIN_PORT)",
    )
    s.add_argument(
        "--workers", type=int, default=int(_env("WORKERS", 1)), help="worker processes (env REGIONGATE_WORKERS)"
    )
    s.add_argument(
        "--access-log",
        default=_env("ACCESS_LOG", "-"),
        help="'-' for stdout, 'off', or a file to append to (env REGIONGATE_ACCESS_LOG)",
    )
    s.add_argument(
        "--access-log-buffer",
        type=int,
        default=int(_env("ACCESS_LOG_BUFFER", 8 * 1024 * 1024)),
        metavar="BYTES",
        help="log bytes that may wait for a slow log destination; past it lines are dropped and counted "
        "(env REGIONGATE_ACCESS_LOG_BUFFER; default 8 MiB)",
    )
    s.add_argument(
        "--log-address",
        choices=["full", "truncated", "hashed"],
        default=_env("LOG_ADDRESS", "full"),
        help="how the access log writes client addresses (env REGIONGATE_LOG_ADDRESS)",
    )
    s.add_argument(
        "--log-key",
        default=_env("LOG_KEY"),
        help="key for --log-address hashed, so hashes are stable across restarts (env REGIONGATE_LOG_KEY)",
    )
    s.add_argument(
        "--allow-method",
        action="append",
        default=None,
        metavar="METHOD",
        help="HTTP method forwarded upstream, repeatable (env REGIONGATE_ALLOW_METHODS, comma-separated); "
        "others get a 405; default: GET HEAD OPTIONS POST DELETE; TRACE and CONNECT are never allowed",
    )
    s.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=_env("LOG_LEVEL", "warning"),
        help="(env REGIONGATE_LOG_LEVEL)",
    )

    c = sub.add_parser("check", help="validate policy files and run their tests")
    c.add_argument("policies", nargs="+", metavar="POLICY")
    _add_geo_flags(c, with_policy=False)
    c.add_argument("--quiet", "-q", action="store_true", help="print only failures")

    e = sub.add_parser("explain", help="show the decision for an address, and why")
    e.add_argument("ip")
    e.add_argument("--path", default="/v1/chat/completions")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument(
        "--missing",
        action="store_true",
        help="judge IP as a trusted proxy whose request named no client (defaults.missing)",
    )
    e.add_argument("--trace", action="store_true", help="every rule in order: matched or not, and which key failed")
    _add_geo_flags(e)

    d = sub.add_parser(
        "diff",
        help="which callers a policy change treats differently; exit 0 none, 1 some, 2 bad file",
        description="Judge every country, named subdivision, ASN, CIDR, anonymizer kind, path and client kind "
        "with both policies (the gateway's own decide()) and list the callers whose decision differs.",
    )
    d.add_argument("old", metavar="OLD")
    d.add_argument("new", metavar="NEW")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument(
        "--replay",
        metavar="FILE",
        help="also replay addresses (one per line, optionally followed by a path) or the gateway's JSON-lines "
        "access log through both policies, with the geo data from --geoip; '-' reads stdin",
    )
    _add_geo_flags(d, with_policy=False)

    sub.add_parser("schema", help="print the policy file's JSON Schema")

    st = sub.add_parser("stub", help="run the bundled OpenAI-compatible stub upstream (for trying out and tests)")
    st.add_argument("--host", default="127.0.0.1")
    st.add_argument("--port", type=int, default=8000)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "check":
            return _check(args)
        if args.command == "explain":
            return _explain(args)
        if args.command == "diff":
            return _diff(args)
        if args.command == "schema":
            from .policy import json_schema

            sys.stdout.buffer.write(orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2) + b"\n")
            return 0
        if args.command == "stub":
            from .stub import run

            run(args.host, args.port)
            return 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed: not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return 2


def _geoip(args: argparse.Namespace) -> list[str]:
    return args.geoip if args.geoip is not None else _env_list("GEOIP")


def _methods(args: argparse.Namespace) -> dict[str, tuple[str, ...]]:
    methods = args.allow_method if args.allow_method is not None else _env_list("ALLOW_METHODS")
    return {"allow_methods": tuple(methods)} if methods else {}


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .runtime import ConfigError, Settings
    from .server import serve

    try:
        settings = Settings(
            policy=args.policy,
            geoip=tuple(_geoip(args)),
            trusted_proxy=tuple(args.trusted_proxy if args.trusted_proxy is not None else _env_list("TRUSTED_PROXY")),
            allow_trust_all=args.allow_trust_all or _env("ALLOW_TRUST_ALL", False),
            client_ip_header=args.client_ip_header,
            upstream=args.upstream,
            host=args.host,
            port=args.port,
            admin_host=args.admin_host,
            admin_port=args.admin_port,
            workers=args.workers,
            access_log=args.access_log,
            access_log_buffer=args.access_log_buffer,
            log_address=args.log_address,
            log_key=args.log_key,
            log_level=args.log_level,
            **_methods(args),
        )
        return serve(settings)
    except ValidationError as e:
        for err in e.errors():
            print(
                f"regiongate: --{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}", file=sys.stderr
            )
        return 2
    except ConfigError as e:
        print(f"regiongate: cannot start:\n{e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"regiongate: cannot start: {e}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace) -> int:
    from .policy import load_policy, run_tests
    from .runtime import ConfigError, load_geo
    from .yamlfile import FileError

    try:
        geo = load_geo(_geoip(args))
    except ConfigError as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 2
    failed = False
    for path in args.policies:
        try:
            policy = load_policy(path, geo.capabilities)
        except FileError as e:
            print(e.render(), file=sys.stderr)
            failed = True
            continue
        results = run_tests(policy, geo)
        bad = [r for r in results if not r.passed]
        for r in results:
            if not r.passed:
                print(f"{path}:{r.line}: test {r.test.ip} {r.test.path}: {r.problem}", file=sys.stderr)
            elif not args.quiet:
                print(f"{path}:{r.line}: ok   {r.test.ip} {r.test.path} -> {r.decision.verdict} ({r.decision.rule})")
        failed |= bool(bad)
        if not args.quiet or bad:
            status = "FAILED" if bad else "ok"
            print(f"{path}: {status}: {len(policy.rules)} rules, {len(results) - len(bad)}/{len(results)} tests passed")
    return 1 if failed else 0


def _explain(args: argparse.Namespace) -> int:
    from . import georecords
    from .explain import explain
    from .requestpath import BadPath
    from .runtime import ConfigError, load_checked_policy, load_geo

    try:
        geo = load_geo(_geoip(args))
        policy = load_checked_policy(args.policy, geo)
    except ConfigError as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 2
    try:
        result = explain(policy, geo, args.ip, args.path, with_trace=args.trace, missing=args.missing)
    except BadPath as e:
        print(f"regiongate: --path {args.path!r}: {e}; the gateway answers it with a 400, no policy is asked",
              file=sys.stderr)
        return 2
    report = result.report
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    path = report["path"]
    where = f" (line {report['rule_line']})" if report["rule_line"] else ""
    print(f"{args.ip} {path}: {report['decision'].upper()}")
    if report["normalized"] is not None and report["normalized"] != args.ip:
        print(f"  address:   {args.ip} is {report['normalized']}")
    print(f"  client:    {report['kind']}" + (f" ({report['problem']})" if report["problem"] else ""))
    print(f"  rule:      {report['rule']}{where}")
    print(f"  reason:    {report['reason']}")
    for line in report["why"]:
        print(f"  because:   {line}")
    if report["shadow"]:
        print(f"  shadow:    {', '.join(report['shadow'])} (matched, mode: monitor, not enforced)")
    f = report["facts"]
    print(f"  country:   {f['country'] or '-'}   registered: {f['registered_country'] or '-'}")
    if f["subdivisions"]:
        print(f"  subdivisions: {', '.join(f['subdivisions'])}")
    if f["asn"] is not None:
        print(f"  asn:       AS{f['asn']} {f['as_org'] or ''}".rstrip())
    if f["anonymizer"]:
        print(f"  anonymizer: {', '.join(f['anonymizer'])}")
    if f["network"]:
        print(f"  network:   {f['network']}")
    print(f"  policy:    {policy.source} (sha256:{policy.sha256[:12]}, mode {policy.spec.mode})")
    print(f"  geo:       {', '.join(s.type + (' ' + s.path if s.path else '') for s in geo.sources)}")
    if result.records:
        print("what the databases say:")
        for record in result.records:
            for line in georecords.render(record):
                print(f"  {line}")
    if result.trace is not None:
        print("trace (rules in order, first enforcing match wins):")
        for line in result.trace.lines():
            print(f"  {line}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    from .diff import diff, replay
    from .policy import load_policy
    from .runtime import ConfigError, load_geo
    from .yamlfile import FileError

    try:
        old, new = load_policy(args.old), load_policy(args.new)
    except FileError as e:
        print(e.render(), file=sys.stderr)
        return 2
    result = diff(old, new)
    replayed = None
    if args.replay is not None:
        try:
            geo = load_geo(_geoip(args))
            if args.replay == "-":
                replayed = replay(old, new, geo, sys.stdin)
            else:
                with open(args.replay, encoding="utf-8", errors="replace") as f:
                    replayed = replay(old, new, geo, f)
        except ConfigError as e:
            print(f"regiongate: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"regiongate: --replay {args.replay}: {e.strerror or e}", file=sys.stderr)
            return 2
    changed = result.changed or bool(replayed and replayed.flipped)
    if args.json:
        out = result.as_dict()
        if replayed is not None:
            out["replay"] = replayed.as_dict()
            out["changed"] = changed
        sys.stdout.buffer.write(orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")
        return 1 if changed else 0
    _print_diff(result)
    if replayed is not None:
        _print_replay(args.replay, replayed)
    return 1 if changed else 0


def _country_name(code: str) -> str:
    import pycountry

    c = pycountry.countries.get(alpha_2=code)
    return str(c.name) if c is not None else ("Kosovo" if code == "XK" else "")


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _change_rows(changes: Sequence[Any]) -> list[str]:
    rows = [["KIND", "SUBJECT", "FROM", "TO", "WHERE"]]
    for c in changes:
        subject = f"{c.subject} {_country_name(c.subject)}".strip() if c.kind == "country" else c.subject
        where = []
        if c.countries is not None:
            shown = ", ".join(c.countries[:12]) + (f", … ({len(c.countries)} in all)" if len(c.countries) > 12 else "")
            where.append("with " + shown)
        if c.addresses is not None:
            where.append("at " + ", ".join(c.addresses))
        if c.paths is not None:
            where.append("on " + ", ".join(c.paths))
        rows.append(
            [
                c.kind,
                subject,
                f"{c.old_verdict} ({c.old_rule})",
                f"{c.new_verdict} ({c.new_rule})",
                "; ".join(where) or "everywhere probed",
            ]
        )
    return _table(rows)


def _print_diff(result: Any) -> None:
    print(
        f"{result.old_source} (sha256:{result.old_sha256[:12]}) -> {result.new_source} "
        f"(sha256:{result.new_sha256[:12]}): {len(result.changes)} decision changes, "
        f"{result.probes} callers probed"
    )
    if result.changes:
        print()
        for line in _change_rows(result.changes):
            print(line)
    if result.settings:
        print()
        print("settings that change what a client sees:")
        for s in result.settings:
            print(f"  {s.key}: {s.old!r} -> {s.new!r}")
    if result.rule_changes:
        print()
        print("same decision, made by another rule (not a change):")
        for line in _change_rows(result.rule_changes):
            print(f"  {line}")
    if not result.changed:
        print("no caller is treated differently")


def _print_replay(source: str, r: Any) -> None:
    print()
    skipped = r.skipped_redacted + r.skipped_unreadable
    print(
        f"replay of {source}: {r.replayed} requests replayed, {skipped} skipped "
        f"({r.skipped_redacted} with hashed or truncated addresses, {r.skipped_unreadable} unreadable); "
        f"{r.flipped} decisions flip"
    )
    for transition, n in r.transitions:
        print(f"  {transition}: {n}")
    if r.top_countries:
        print("  top countries: " + ", ".join(f"{c} {n}" for c, n in r.top_countries))
    if r.top_rules:
        print("  top rules:     " + ", ".join(f"{rules} {n}" for rules, n in r.top_rules))
