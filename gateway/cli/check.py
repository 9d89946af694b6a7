"""``regiongate check``: validate policy files against the given databases and run their tests."""

from __future__ import annotations

import argparse
import sys

from .options import LOCAL_HELP, add_serve_options, env_list, geoip


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser(
        "check",
        help="validate policy files and run their tests",
        description="Validate policy files against the given databases and run their tests:. " + LOCAL_HELP,
    )
    c.add_argument("policies", nargs="+", metavar="POLICY", help="policy YAML file(s) to check")
    add_serve_options(c, frozenset({"geoip", "authz_body"}))
    c.add_argument(
        "--authz",
        action="append",
        default=None,
        metavar="CONTRACT",
        help="a decision-service contract this policy is served through (forward, nginx, envoy_http, envoy_grpc, "
        "haproxy), repeatable: warns about each rule that reads the model where the contract sends no body "
        "(--authz-body)",
    )
    c.add_argument("--quiet", "-q", action="store_true", help="print only failures")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..authz.config import blind_rules, contracts, parse_config
    from ..policy import load_policy, run_tests
    from ..runtime import ConfigError, load_geo
    from ..yamlfile import FileError

    try:
        geo = load_geo(geoip(args))
        bodies = parse_config((), args.authz_body or env_list("AUTHZ_BODY")).bodies
        served = contracts(args.authz or (), "--authz")
    except (ConfigError, ValueError) as e:
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
        for warning in blind_rules(policy, sorted(served - bodies)):
            print(f"warning: {warning}", file=sys.stderr)
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
