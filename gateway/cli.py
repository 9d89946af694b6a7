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
from typing import Any, NoReturn

import orjson

from . import __version__

ENV_PREFIX = "REGIONGATE_"
LOCAL_NOTE = (
    "decided here from the files above, not asked of a running gateway; "
    "compare the policy's sha256 with the gateway's /readyz"
)


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(ENV_PREFIX + name, default)


def _env_list(name: str) -> list[str]:
    value = os.environ.get(ENV_PREFIX + name, "")
    return [v.strip() for v in value.split(",") if v.strip()]


# ``serve`` options: (flag, Settings field, help, default as shown). The flags
# default to None so that a flag given beats its variable, which beats the
# default in :class:`~gateway.runtime.Settings`; help shows that default,
# never the variable's value (it may be --log-key).
_SERVE_OPTIONS: tuple[tuple[str, str, str, str, dict[str, Any]], ...] = (
    ("--policy", "policy", "policy YAML", "the shipped country-only OpenAI policy", {"metavar": "FILE"}),
    (
        "--geoip",
        "geoip",
        "MaxMind-format database, repeatable",
        "the embedded iptocc country data",
        {"action": "append", "metavar": "MMDB"},
    ),
    (
        "--trusted-proxy",
        "trusted_proxy",
        "peer allowed to set the client address header, repeatable",
        "nobody",
        {"action": "append", "metavar": "CIDR"},
    ),
    (
        "--client-ip-header",
        "client_ip_header",
        "X-Forwarded-For, Forwarded, or a single-value header like CF-Connecting-IP",
        "X-Forwarded-For",
        {"metavar": "NAME"},
    ),
    (
        "--upstream",
        "upstream",
        "URL of the upstream named 'default' when the policy defines none; no credentials in it "
        "(a key goes in a policy upstream's api_key_env)",
        "https://api.openai.com",
        {"metavar": "URL"},
    ),
    ("--host", "host", "proxy listen address", "127.0.0.1", {"metavar": "ADDRESS"}),
    ("--port", "port", "proxy listen port", "8080", {"metavar": "PORT"}),
    ("--admin-host", "admin_host", "control-plane listen address", "127.0.0.1", {"metavar": "ADDRESS"}),
    ("--admin-port", "admin_port", "control-plane listen port: /healthz /readyz /metrics", "9090", {"metavar": "PORT"}),
    ("--workers", "workers", "worker processes", "1", {"metavar": "N"}),
    ("--access-log", "access_log", "'-' for stdout, 'off', or a file to append to", "-", {"metavar": "DEST"}),
    (
        "--log-address",
        "log_address",
        "how the access log writes client addresses",
        "full",
        {"choices": ["full", "truncated", "hashed"]},
    ),
    (
        "--log-key",
        "log_key",
        "key for --log-address hashed, so hashes are stable across restarts",
        "a random key per start",
        {"metavar": "KEY"},
    ),
    (
        "--log-level",
        "log_level",
        "server log level (stderr)",
        "warning",
        {"choices": ["debug", "info", "warning", "error"]},
    ),
)
_LIST_OPTIONS = frozenset({"geoip", "trusted_proxy"})


def _env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def _add_serve_options(p: argparse.ArgumentParser, only: frozenset[str] | None = None) -> None:
    for flag, dest, text, shown, extra in _SERVE_OPTIONS:
        if only is None or dest in only:
            env = _env_name(dest) + (", comma-separated" if dest in _LIST_OPTIONS else "")
            p.add_argument(flag, dest=dest, default=None, help=f"{text} (env {env}; default: {shown})", **extra)


def _serve_values(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The serve options given as flags or variables, and where each came from."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for flag, dest, *_ in _SERVE_OPTIONS:
        given = getattr(args, dest, None)
        if given is not None:
            values[dest], sources[dest] = given, flag
            continue
        env = os.environ.get(_env_name(dest), "")
        if env.strip():
            values[dest] = _env_list(dest.upper()) if dest in _LIST_OPTIONS else env
            sources[dest] = _env_name(dest)
    return values, sources


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, pointing at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="regiongate", description="Region-aware gateway for model APIs.")
    parser.add_argument("--version", action="version", version=f"regiongate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Every option has a REGIONGATE_* environment variable; a flag beats its variable.",
    )
    _add_serve_options(s)

    local = (
        "It reads the policy and geo data itself: it does not ask a running gateway, so give it the "
        "same --policy/--geoip as the gateway (compare the sha256 with /readyz)."
    )
    c = sub.add_parser(
        "check",
        help="validate policy files and run their tests",
        description="Validate policy files against the given databases and run their tests:. " + local,
    )
    c.add_argument("policies", nargs="+", metavar="POLICY", help="policy YAML file(s) to check")
    _add_serve_options(c, frozenset({"geoip"}))
    c.add_argument("--quiet", "-q", action="store_true", help="print only failures")

    e = sub.add_parser(
        "explain",
        help="show the decision for an address, and why",
        description="Show the decision for one address and path, which rule (and line) made it, and the "
        "geo facts. " + local,
    )
    e.add_argument("ip", help="client address (IPv4 or IPv6) to judge")
    e.add_argument(
        "--path",
        default="/v1/chat/completions",
        help="request path to judge, for policies with paths rules (default: /v1/chat/completions)",
    )
    e.add_argument("--json", action="store_true", help="machine-readable output")
    _add_serve_options(e, frozenset({"policy", "geoip"}))

    sub.add_parser("schema", help="print the policy file's JSON Schema")

    st = sub.add_parser("stub", help="run the bundled OpenAI-compatible stub upstream (for trying out and tests)")
    st.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    st.add_argument("--port", type=int, default=8000, help="listen port (default: 8000)")
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

            run(args.host, args.port)
            return 0
    except KeyboardInterrupt:
        return 130
    return 2


def _geoip(args: argparse.Namespace) -> list[str]:
    return args.geoip if args.geoip is not None else _env_list("GEOIP")


def _policy(args: argparse.Namespace) -> str | None:
    return args.policy if args.policy is not None else (_env("POLICY") or None)


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .policy import plain_error
    from .runtime import ConfigError, Settings
    from .server import serve

    values, sources = _serve_values(args)
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
        policy = load_checked_policy(_policy(args), geo)
    except ConfigError as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 2
    client, facts, decision = judge_ip(policy, geo, args.ip, args.path)
    rule = next((r for r in policy.rules if r.name == decision.rule), None)
    country = facts.country if policy.field == "country" else facts.registered_country
    # A default's reason says it all; only a rule has conditions to explain.
    why = rule.why(client.ip, country, facts, args.path) if rule else []
    rule_line = rule.line if rule else policy.default_lines.get(decision.rule)
    report: dict[str, Any] = {
        "ip": args.ip,
        "normalized": str(client.ip) if client.ip is not None else None,
        "kind": client.kind,
        "problem": client.problem,
        "path": args.path,
        "decision": decision.verdict,
        "action": decision.action,
        "rule": decision.rule,
        "rule_line": rule_line,
        "rule_conditions": rule.conditions() if rule else None,
        "reason": decision.reason,
        "why": why,
        "shadow": list(decision.shadow),
        "status": policy.spec.block.status if decision.verdict == "deny" else None,
        "facts": facts.as_dict(),
        "policy": {"path": policy.source, "sha256": policy.sha256, "mode": policy.spec.mode, "geo_field": policy.field},
        "geo": [s.as_dict() for s in geo.sources],
        "note": LOCAL_NOTE,
    }
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    if rule_line:
        where = f" (line {rule_line})"
    elif rule is None and decision.rule.startswith("defaults."):
        where = f" (not in the file: the built-in default, {decision.action})"
    else:
        where = ""
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
    for src in geo.sources:
        print(f"  geo:       {src.type} {src.path or '(' + src.description + ')'}, built {src.build_date or 'unknown'}")
    print(f"  note:      {LOCAL_NOTE}")
    return 0
