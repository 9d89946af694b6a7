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
# explain computes its report from files; only /admin/explain asks a running gateway.
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
        "--proxy-protocol-from",
        "proxy_protocol_from",
        "load balancer that must open every connection with a PROXY protocol v1/v2 header, whose address then "
        "stands for the TCP peer; repeatable or comma-separated",
        "nobody",
        {"action": "append", "metavar": "CIDR"},
    ),
    (
        "--tls-cert",
        "tls_cert",
        "PEM certificate chain: the proxy port speaks TLS 1.2+ (ALPN http/1.1); reloaded when the file changes",
        "none: plain HTTP",
        {"metavar": "FILE"},
    ),
    ("--tls-key", "tls_key", "PEM private key of --tls-cert", "none", {"metavar": "FILE"}),
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
    (
        "--allow-trust-all",
        "allow_trust_all",
        "accept a --trusted-proxy list that covers every public address (refused without it: "
        "then any caller can choose its country)",
        "off",
        {"action": "store_true"},
    ),
    ("--workers", "workers", "worker processes", "1", {"metavar": "N"}),
    ("--access-log", "access_log", "'-' for stdout, 'off', or a file to append to", "-", {"metavar": "DEST"}),
    (
        "--access-log-buffer",
        "access_log_buffer",
        "log bytes that may wait for a slow log destination; past it lines are dropped and counted",
        "8388608 (8 MiB)",
        {"metavar": "BYTES"},
    ),
    (
        "--allow-method",
        "allow_methods",
        "HTTP method forwarded upstream, repeatable; others get a 405; TRACE and CONNECT are never allowed",
        "GET HEAD OPTIONS POST DELETE",
        {"action": "append", "metavar": "METHOD"},
    ),
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
        "--shadow-policy",
        "shadow_policy",
        "a candidate policy judged beside the active one on every request, never enforced; reloaded like the policy",
        "none",
        {"metavar": "FILE"},
    ),
    (
        "--no-watch",
        "watch",
        "do not watch the policy and GeoIP files; reload only on SIGHUP or POST /admin/reload (variable: 0 or 1)",
        "watch",
        {"action": "store_false"},
    ),
    (
        "--pid-file",
        "pid_file",
        "write the supervising process's pid here (the one SIGHUP reloads), removed at exit",
        "none",
        {"metavar": "FILE"},
    ),
    (
        "--geoip-max-age",
        "geoip_max_age",
        "a GeoIP database built longer ago than this (45d, 12h, 30m, 90s) is reported stale in /readyz",
        "none: never stale",
        {"metavar": "AGE"},
    ),
    (
        "--stale-geoip-not-ready",
        "stale_geoip_not_ready",
        "stale GeoIP data makes /readyz answer 503",
        "off: stale is a warning",
        {"action": "store_true"},
    ),
    ("--header-timeout", "header_timeout", "seconds a client may take to send a request's headers", "10", {}),
    ("--idle-timeout", "idle_timeout", "seconds a client connection may stay open with no request", "30", {}),
    (
        "--max-connections",
        "max_connections",
        "concurrent proxy connections",
        "0: as many as the open-file limit allows with room for the control plane",
        {"metavar": "N"},
    ),
    (
        "--upstream-connections",
        "upstream_connections",
        "connections per upstream, busy and idle",
        "0: as many as proxy connections",
        {"metavar": "N"},
    ),
    (
        "--upstream-keepalive",
        "upstream_keepalive",
        "seconds an idle upstream connection is kept; keep it below the upstream's own keep-alive timeout",
        "4",
        {},
    ),
    (
        "--redis",
        "redis",
        "Redis shared by every replica for runtime overrides: redis://host:6379/0, rediss:// (TLS), "
        "unix:///path.sock, redis+sentinel://host:26379,host:26379/service, redis+cluster://host:7000,host:7001; "
        "no password in it (REGIONGATE_REDIS_PASSWORD)",
        "none: overrides live in this process's memory",
        {"metavar": "URL"},
    ),
    (
        "--redis-prefix",
        "redis_prefix",
        "prefix of every Redis key, so several gateways can share one Redis",
        "regiongate:",
        {"metavar": "PREFIX"},
    ),
    (
        "--redis-timeout",
        "redis_timeout",
        "seconds a Redis call may take before it counts as failed (the request path never waits on Redis)",
        "0.05",
        {"metavar": "SECONDS"},
    ),
    (
        "--audit",
        "audit",
        "what goes to the Redis audit stream <prefix>audit (needs --redis)",
        "refusals",
        {"choices": ["off", "refusals", "all"]},
    ),
    (
        "--audit-maxlen",
        "audit_maxlen",
        "the audit stream is capped at about this many entries (XADD MAXLEN ~)",
        "100000",
        {"metavar": "N"},
    ),
    (
        "--log-level",
        "log_level",
        "server log level (stderr)",
        "warning",
        {"choices": ["debug", "info", "warning", "error"]},
    ),
)
_LIST_OPTIONS = frozenset({"geoip", "trusted_proxy", "proxy_protocol_from", "allow_methods"})


# Where an option's variable is not simply its name: REGIONGATE_REDIS_URL is what every command reads.
_ENV_NAMES = {"redis": "REDIS_URL"}


def _env_name(dest: str) -> str:
    return ENV_PREFIX + _ENV_NAMES.get(dest, dest.upper())


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
    e.add_argument(
        "--model",
        help="the request body's model, for policies with models or allow_models rules "
        "(left out: judged as a request whose model is unknown, see body.unknown_model)",
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
    e.add_argument("--redis-prefix", default=_env("REDIS_PREFIX", "regiongate:"), help="as serve --redis-prefix")
    _add_serve_options(e, frozenset({"policy", "geoip"}))

    d = sub.add_parser(
        "diff",
        help="which callers a policy change treats differently; exit 0 none, 1 some, 2 bad file",
        description="Judge every country, named subdivision, ASN, CIDR, anonymizer kind, path and client kind "
        "with both policies (the gateway's own decide()) and list the callers whose decision differs.",
    )
    d.add_argument("old", metavar="OLD", help="the policy in force now (YAML file)")
    d.add_argument("new", metavar="NEW", help="the candidate policy (YAML file)")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument(
        "--replay",
        metavar="FILE",
        help="also replay addresses (one per line, optionally followed by a path) or the gateway's JSON-lines "
        "access log through both policies, with the geo data from --geoip; '-' reads stdin",
    )
    _add_serve_options(d, frozenset({"geoip"}))

    o = sub.add_parser(
        "override",
        help="add, list or remove runtime overrides (through a gateway's admin API or straight to Redis)",
        description="Runtime overrides: allow or deny a CIDR, API key, country or subdivision now, before the "
        "policy. Give --admin-url (token in REGIONGATE_ADMIN_TOKEN) or --redis.",
    )
    osub = o.add_subparsers(dest="override_command", required=True, parser_class=_Parser, help="what to do")
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
        p.add_argument("--admin-url", metavar="URL", help="a running gateway's control plane, e.g. http://127.0.0.1:9090")
        p.add_argument("--redis", metavar="URL", default=_env("REDIS_URL"), help="Redis, as serve --redis (env "
                       "REGIONGATE_REDIS_URL; password in REGIONGATE_REDIS_PASSWORD)")
        p.add_argument("--redis-prefix", default=_env("REDIS_PREFIX", "regiongate:"), help="as serve --redis-prefix")

    au = sub.add_parser(
        "audit",
        help="read the Redis audit stream (refusals, or every decision with serve --audit all)",
        description="Read the audit stream <prefix>audit that gateways with --redis write.",
    )
    asub = au.add_subparsers(dest="audit_command", required=True, parser_class=_Parser, help="what to do")
    at = asub.add_parser("tail", help="the latest entries as JSON lines")
    at.add_argument("-n", "--count", type=int, default=20, help="how many of the latest entries (default: 20)")
    at.add_argument("--follow", "-f", action="store_true", help="then keep printing new entries as they come")
    ae = asub.add_parser("export", help="entries since a time, as JSON lines or CSV")
    ae.add_argument("--since", default="24h", help="how far back: 30m, 12h, 7d (default: 24h)")
    ae.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="output format (default: jsonl)")
    for p in (at, ae):
        p.add_argument("--redis", metavar="URL", default=_env("REDIS_URL"), help="Redis, as serve --redis (env "
                       "REGIONGATE_REDIS_URL; password in REGIONGATE_REDIS_PASSWORD)")
        p.add_argument("--redis-prefix", default=_env("REDIS_PREFIX", "regiongate:"), help="as serve --redis-prefix")

    sub.add_parser("schema", help="print the policy file's JSON Schema")

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
        if args.command == "override":
            return _override(args)
        if args.command == "audit":
            return _audit(args)
        if args.command == "schema":
            from .policy import json_schema

            sys.stdout.buffer.write(orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2) + b"\n")
            return 0
        if args.command == "stub":
            from .runtime import ConfigError
            from .stub import run

            try:
                stub = {"status": args.status, "refuse_region": args.refuse_region}
                run(args.host, args.port, args.certfile, args.keyfile, **stub)
            except ConfigError as e:  # the port is taken, say: one line, as serve says it
                print(f"regiongate: cannot start: {e}", file=sys.stderr)
                return 2
            return 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed: not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return 2


def _override(args: argparse.Namespace) -> int:
    from .runtime import parse_duration
    from .shared.client import ClientError, client_for, render

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


def _audit(args: argparse.Namespace) -> int:
    import asyncio

    from .runtime import parse_duration
    from .shared import audit
    from .shared.redisconn import RedisConfigError, RedisUnavailable

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
            asked = f"{r.test.ip} {r.test.path}" + (f" model {r.test.model}" if r.test.model is not None else "")
            if not r.passed:
                print(f"{path}:{r.line}: test {asked}: {r.problem}", file=sys.stderr)
            elif not args.quiet:
                to = f" to {r.decision.upstream}" if r.decision.verdict == "route" else ""
                print(f"{path}:{r.line}: ok   {asked} -> {r.decision.verdict}{to} ({r.decision.rule})")
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
        policy = load_checked_policy(_policy(args), geo)
    except ConfigError as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 2
    overrides = None
    if args.redis:
        from .shared.client import ClientError, RedisClient

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
        )
    except BadPath as e:
        print(f"regiongate: --path {args.path!r}: {e}; the gateway answers it with a 400, no policy is asked",
              file=sys.stderr)
        return 2
    report = result.report
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    from .policy.overrides import printable

    path = report["path"]
    if report["rule_line"]:
        where = f" (line {report['rule_line']})"
    elif report["rule_conditions"] is None and report["rule"].startswith("defaults."):
        where = f" (not in the file: the built-in default, {report['action']})"
    else:
        where = ""
    print(f"{args.ip} {path}: {report['decision'].upper()}")
    if report["normalized"] is not None and report["normalized"] != args.ip:
        print(f"  address:   {args.ip} is {report['normalized']}")
    print(f"  client:    {report['kind']}" + (f" ({report['problem']})" if report["problem"] else ""))
    print(f"  rule:      {report['rule']}{where}")
    print(f"  reason:    {printable(report['reason'])}")  # an override's reason and author are in it
    if report["upstream"] is not None and report["decision"] != "deny":
        print(f"  upstream:  {report['upstream']}")
    if report["model"] is not None or "allow_models" in report or _uses_models(policy):
        print(f"  model:     {report['model'] or 'unknown (--model not given)'}"
              + (f"; allowed here: {', '.join(report['allow_models'])}" if "allow_models" in report else ""))
    if "override" in report:
        o = report["override"]
        print(f"  override:  {o['id']} by {printable(o['by']) or 'unknown'}: {o['action']} {o['kind']} {o['value']} "
              "(runtime override from Redis, evaluated before the policy's rules)")
    if "rate_limit" in report:
        lim = report["rate_limit"]
        print(f"  limit:     {lim['requests']} requests per {lim['per']:g}s by {lim['by']} (burst {lim['burst']})")
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
    for src in geo.sources:
        print(f"  geo:       {src.type} {src.path or '(' + src.description + ')'}, built {src.build_date or 'unknown'}")
    print(f"  note:      {LOCAL_NOTE}")
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


def _uses_models(policy: Any) -> bool:
    return any(r.models is not None or r.decision.allow_models is not None for r in policy.rules)


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
