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
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=_env("LOG_LEVEL", "warning"),
        help="(env REGIONGATE_LOG_LEVEL)",
    )
    s.add_argument(
        "--data-plane",
        choices=["native", "asgi"],
        default=_env("DATA_PLANE", "native"),
        help="proxy port implementation: native (asyncio protocols, httptools) or asgi (the previous "
        "uvicorn + aiohttp one, kept for comparison) (env REGIONGATE_DATA_PLANE; default native)",
    )
    s.add_argument(
        "--header-timeout",
        type=float,
        default=float(_env("HEADER_TIMEOUT", 10.0)),
        help="seconds a client may take to send a request's headers (env REGIONGATE_HEADER_TIMEOUT; default 10)",
    )
    s.add_argument(
        "--idle-timeout",
        type=float,
        default=float(_env("IDLE_TIMEOUT", 30.0)),
        help="seconds a client connection may stay open with no request (env REGIONGATE_IDLE_TIMEOUT; default 30)",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        default=int(_env("MAX_CONNECTIONS", 0)),
        help="concurrent proxy connections (env REGIONGATE_MAX_CONNECTIONS; default 0: as many as the "
        "open-file limit allows with room for the control plane)",
    )
    s.add_argument(
        "--upstream-connections",
        type=int,
        default=int(_env("UPSTREAM_CONNECTIONS", 0)),
        help="connections per upstream, busy and idle (env REGIONGATE_UPSTREAM_CONNECTIONS; default 0: "
        "as many as proxy connections)",
    )
    s.add_argument(
        "--upstream-keepalive",
        type=float,
        default=float(_env("UPSTREAM_KEEPALIVE", 4.0)),
        help="seconds an idle upstream connection is kept; keep it below the upstream's own keep-alive "
        "timeout (env REGIONGATE_UPSTREAM_KEEPALIVE; default 4)",
    )

    c = sub.add_parser("check", help="validate policy files and run their tests")
    c.add_argument("policies", nargs="+", metavar="POLICY")
    _add_geo_flags(c, with_policy=False)
    c.add_argument("--quiet", "-q", action="store_true", help="print only failures")

    e = sub.add_parser("explain", help="show the decision for an address, and why")
    e.add_argument("ip")
    e.add_argument("--path", default="/v1/chat/completions")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    _add_geo_flags(e)

    sub.add_parser("schema", help="print the policy file's JSON Schema")

    st = sub.add_parser("stub", help="run the bundled OpenAI-compatible stub upstream (for trying out and tests)")
    st.add_argument("--host", default="127.0.0.1")
    st.add_argument("--port", type=int, default=8000)
    st.add_argument("--certfile", help="serve HTTPS with this certificate chain (PEM)")
    st.add_argument("--keyfile", help="the certificate's private key (PEM)")
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
        if args.command == "schema":
            from .policy import json_schema

            sys.stdout.buffer.write(orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2) + b"\n")
            return 0
        if args.command == "stub":
            from .stub import run

            run(args.host, args.port, args.certfile, args.keyfile)
            return 0
    except KeyboardInterrupt:
        return 130
    return 2


def _geoip(args: argparse.Namespace) -> list[str]:
    return args.geoip if args.geoip is not None else _env_list("GEOIP")


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .runtime import ConfigError, Settings
    from .server import serve

    try:
        settings = Settings(
            policy=args.policy,
            geoip=tuple(_geoip(args)),
            trusted_proxy=tuple(args.trusted_proxy if args.trusted_proxy is not None else _env_list("TRUSTED_PROXY")),
            client_ip_header=args.client_ip_header,
            upstream=args.upstream,
            host=args.host,
            port=args.port,
            admin_host=args.admin_host,
            admin_port=args.admin_port,
            workers=args.workers,
            access_log=args.access_log,
            log_address=args.log_address,
            log_key=args.log_key,
            log_level=args.log_level,
            data_plane=args.data_plane,
            header_timeout=args.header_timeout,
            idle_timeout=args.idle_timeout,
            max_connections=args.max_connections,
            upstream_connections=args.upstream_connections,
            upstream_keepalive=args.upstream_keepalive,
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
    from .policy import judge_ip
    from .runtime import ConfigError, load_checked_policy, load_geo

    try:
        geo = load_geo(_geoip(args))
        policy = load_checked_policy(args.policy, geo)
    except ConfigError as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 2
    client, facts, decision = judge_ip(policy, geo, args.ip, args.path)
    rule = next((r for r in policy.rules if r.name == decision.rule), None)
    country = facts.country if policy.field == "country" else facts.registered_country
    why = rule.why(client.ip, country, facts, args.path) if rule else [decision.reason]
    report: dict[str, Any] = {
        "ip": args.ip,
        "normalized": str(client.ip) if client.ip is not None else None,
        "kind": client.kind,
        "problem": client.problem,
        "path": args.path,
        "decision": decision.verdict,
        "action": decision.action,
        "rule": decision.rule,
        "rule_line": rule.line if rule else None,
        "rule_conditions": rule.conditions() if rule else None,
        "reason": decision.reason,
        "why": why,
        "shadow": list(decision.shadow),
        "status": policy.spec.block.status if decision.verdict == "deny" else None,
        "facts": facts.as_dict(),
        "policy": {"path": policy.source, "sha256": policy.sha256, "mode": policy.spec.mode, "geo_field": policy.field},
        "geo": [s.as_dict() for s in geo.sources],
    }
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    where = f" (line {report['rule_line']})" if report["rule_line"] else ""
    print(f"{args.ip} {args.path}: {decision.verdict.upper()}")
    if client.ip is not None and str(client.ip) != args.ip:
        print(f"  address:   {args.ip} is {client.ip}")
    print(f"  client:    {client.kind}" + (f" ({client.problem})" if client.problem else ""))
    print(f"  rule:      {decision.rule}{where}")
    print(f"  reason:    {decision.reason}")
    for line in why:
        print(f"  because:   {line}")
    if decision.shadow:
        print(f"  shadow:    {', '.join(decision.shadow)} (matched, mode: monitor, not enforced)")
    f = facts
    print(f"  country:   {f.country or '-'}   registered: {f.registered_country or '-'}")
    if f.subdivisions:
        print(f"  subdivisions: {', '.join(f.subdivisions)}")
    if f.asn is not None:
        print(f"  asn:       AS{f.asn} {f.as_org or ''}".rstrip())
    if f.anonymizer:
        print(f"  anonymizer: {', '.join(sorted(f.anonymizer))}")
    if f.network:
        print(f"  network:   {f.network}")
    print(f"  policy:    {policy.source} (sha256:{policy.sha256[:12]}, mode {policy.spec.mode})")
    print(f"  geo:       {', '.join(s.type + (' ' + s.path if s.path else '') for s in geo.sources)}")
    return 0
