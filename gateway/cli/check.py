"""``regiongate check``: validate policy files against the given databases and run their tests.

With ``--max-age``, a policy that says when its list was read (``captured:``) and
read longer ago than that is reported, and the exit code is 3 when nothing else
failed: a CI job can fail on a list due for review without mistaking it for a
broken policy (1) or a usage error (2).
"""

from __future__ import annotations

import argparse
import datetime
import sys

from . import policies
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
        "(--authz-body), and each rule with token_limit or max_concurrent (the decision service enforces "
        "rate_limit only)",
    )
    c.add_argument("--quiet", "-q", action="store_true", help="print only failures")
    c.add_argument(
        "--max-age",
        metavar="AGE",
        help="warn when a policy's list (captured:) was read longer ago than AGE (180d, 26w); "
        "exit code 3 if that is the only problem",
    )
    c.set_defaults(func=run)


STALE = 3  # the exit code when every policy is valid but a list is older than --max-age


def age_warning(
    path: str, captured: datetime.date | None, max_age: float, day: datetime.date, written: str
) -> str | None:
    """What to say about a list captured on ``captured`` when it may be ``max_age`` seconds old, if anything."""
    from ..policy import age_days

    if captured is None:
        return None
    days = age_days(captured, day)
    if days < 0:
        return f"{path}: warning: captured: {captured} is {-days} days in the future (today is {day})"
    if days * 86400 > max_age:
        return (
            f"{path}: warning: its list was captured {captured}, {days} days ago, more than --max-age {written}: "
            "read its source: again and regenerate or update it"
        )
    return None


def run(args: argparse.Namespace) -> int:
    from ..authz.config import blind_rules, contracts, parse_config, unenforced_budgets
    from ..policy import load_policy, run_tests
    from ..runtime import ConfigError, load_geo, parse_duration
    from ..yamlfile import FileError

    try:
        max_age = parse_duration(args.max_age) if args.max_age is not None else None
    except ValueError as e:
        print(f"regiongate check: --max-age: {e}", file=sys.stderr)
        return 2
    try:
        geo = load_geo(geoip(args))
        bodies = parse_config((), args.authz_body or env_list("AUTHZ_BODY")).bodies
        served = contracts(args.authz or (), "--authz")
    except (ConfigError, ValueError) as e:
        print(f"regiongate: {e}", file=sys.stderr)
        return 2
    failed = stale = False
    day = policies.today()
    for path in args.policies:
        try:
            policy = load_policy(path, geo.capabilities)
        except FileError as e:
            print(e.render(), file=sys.stderr)
            failed = True
            continue
        for w in policy.warnings:
            where = f"{path}:{w.line}" if w.line is not None else path
            print(f"warning: {where}: {w.message}", file=sys.stderr)
        for blind in blind_rules(policy, sorted(served - bodies)):
            print(f"warning: {blind}", file=sys.stderr)
        for unenforced in unenforced_budgets(policy, served):
            print(f"warning: {unenforced}", file=sys.stderr)
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
        warning = age_warning(path, policy.spec.captured, max_age, day, args.max_age) if max_age is not None else None
        if warning is not None:
            print(warning, file=sys.stderr)
            stale = True
        if not args.quiet or bad:
            status = "FAILED" if bad else "ok"
            print(f"{path}: {status}: {len(policy.rules)} rules, {len(results) - len(bad)}/{len(results)} tests passed")
    return 1 if failed else STALE if stale else 0
