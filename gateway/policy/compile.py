"""Compilation: from the schema to the frozen form, with every check a schema cannot make.

:func:`compile_policy` checks ISO codes, CIDRs, path and model patterns,
upstream names and fallback chains, rules that can never match
(:func:`_subsumes`), rate limits that could not limit, and rules that need a
database that is not configured; it reports every problem it finds at once,
each with its line, and turns the rules into frozensets, CIDR range tables
and precomputed :class:`~.compiled.Decision` objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Container
from typing import Any

from pydantic import ValidationError

from .. import geo as geofacts
from .. import iso3166
from ..addresses import IPNetwork
from ..cidrs import CidrSet, parse_network
from ..clientip import AddressError, parse_address
from ..requestpath import BadPath, canonical
from ..usage.shapes import KNOWN as KNOWN_PATHS
from ..yamlfile import Document, FileError, Problem
from .compiled import Decision, PathSet, Patterns, Policy, Rule, make_decision
from .index import RuleIndex
from .ratelimit import RateLimit, parse_period
from .schema import (
    ALLOW,
    DEFAULT_UPSTREAM,
    DENY,
    MONITOR,
    ROUTE,
    Action,
    Block,
    PolicySpec,
    PolicyTest,
    RateLimitSpec,
    RuleSpec,
    TokenReserveSpec,
    UpstreamSpec,
)
from .tokenlimit import Budget, Concurrency, TokenLimit


def _with_limit(decision: Decision, spec: RateLimitSpec | None) -> Decision:
    """A rule's decision with its rate limit; only what a rule lets through is counted."""
    if spec is None or decision.action not in (ALLOW, ROUTE):
        return decision
    limit = RateLimit(decision.rule, spec.by, spec.requests, parse_period(spec.per), spec.burst or spec.requests)
    return dataclasses.replace(decision, limit=limit)


def _with_budget(decision: Decision, r: RuleSpec) -> Decision:
    """A rule's decision with its token limits and concurrency; only what a rule lets through is counted."""
    if decision.action not in (ALLOW, ROUTE) or (r.token_limit is None and r.max_concurrent is None):
        return decision
    rule = decision.rule
    tokens = tuple(
        TokenLimit(rule, j, t.tokens, t.seconds, tuple(t.by), t.count, t.kind, t.burst)
        for j, t in enumerate(r.token_limit or ())
    )
    c = r.max_concurrent
    concurrency = Concurrency(rule, c.streams, tuple(c.by)) if c is not None else None
    reserve = r.token_reserve or TokenReserveSpec()
    return dataclasses.replace(decision, budget=Budget(rule, tokens, concurrency, reserve.output, reserve.unreadable))


def _with_keys(decision: Decision, own: bool, required: frozenset[str], upstreams: dict[str, UpstreamSpec]) -> Decision:
    """A decision that must see a client key: the rule requires one, or an upstream the request may reach
    (its own or a fallback after it) does. Checked before the request goes anywhere, since which upstream
    answers is known only after failover."""
    if decision.verdict == DENY or decision.upstream is None:
        return decision
    if own or not required.isdisjoint(_reachable(decision.upstream, upstreams)):
        return dataclasses.replace(decision, client_keys=True)
    return decision


def block_body(block: Block) -> bytes:
    """The refusal's JSON body, built once per load (OpenAI's error shape)."""
    import orjson

    return orjson.dumps({"error": {"message": block.message, "type": block.type, "param": None, "code": block.code}})


_NEEDS = {
    "subdivisions": geofacts.SUBDIVISIONS,
    "asns": geofacts.ASN,
    "anonymizer": geofacts.ANONYMIZER,
}


def salvaged_problems(doc: Document, capabilities: frozenset[str] | None) -> list[Problem]:
    """Semantic problems in the rules and tests of a file whose structure is broken somewhere.

    Each rule is validated on its own, and a rule that fails is retried without
    its failing keys, so that a misspelt key in one rule does not hide a bad
    country code in another (or in the same rule) until the next run.
    """
    data: dict[str, Any] = doc.data if isinstance(doc.data, dict) else {}
    raw_rules: list[Any] = data["rules"] if isinstance(data.get("rules"), list) else []
    raw_tests: list[Any] = data["tests"] if isinstance(data.get("tests"), list) else []
    problems: list[Problem] = []
    names = {
        raw["name"] if isinstance(raw, dict) and isinstance(raw.get("name"), str) else f"rule-{i + 1}"
        for i, raw in enumerate(raw_rules)
    }
    for i, raw in enumerate(raw_tests):
        with contextlib.suppress(ValidationError):  # its shape is reported already
            problems.extend(_test_problems(i, PolicyTest.model_validate(raw), names, doc))
    for i, raw in enumerate(raw_rules):
        if not isinstance(raw, dict):
            continue
        try:
            rule = RuleSpec.model_validate(raw)
        except ValidationError as e:
            failing = {err["loc"][0] for err in e.errors() if err["loc"]}
            kept = {k: v for k, v in raw.items() if k not in failing}
            kept.setdefault("action", DENY)
            try:
                rule = RuleSpec.model_validate(kept)
            except ValidationError:
                continue
        problems.extend(_rule_problems(i, rule, doc, capabilities))
    return problems


def compile_policy(spec: PolicySpec, doc: Document, capabilities: frozenset[str] | None) -> Policy:
    problems: list[Problem] = []
    monitor_mode = spec.mode == "monitor"

    def bad(path: tuple[str | int, ...], message: str) -> None:
        problems.append(Problem(doc.line_of(path), message))

    problems += _upstream_problems(spec.upstreams, doc)
    problems += _api_key_problems(spec, doc)
    keyed = frozenset(name for name, up in spec.upstreams.items() if up.client_keys == "required")

    rules: list[Rule] = []
    names: dict[str, int] = {}
    for i, r in enumerate(spec.rules):
        here = ("rules", i)
        name = r.name or f"rule-{i + 1}"
        if name in names:
            bad((*here, "name"), f"rules[{i}]: duplicate rule name {name!r} (also rules[{names[name]}])")
        names[name] = i
        nets: list[IPNetwork] = []  # the valid ones, parsed once (_rule_problems reports the rest)
        problems.extend(_rule_problems(i, r, doc, capabilities, nets))
        desc = "; ".join(_describe(k, v) for k, v in _conditions(r).items()) or "matches everything"
        reason = f"rule {name!r}: {desc}"
        if r.upstream is not None and r.upstream != DEFAULT_UPSTREAM and r.upstream not in spec.upstreams:
            known = ", ".join(sorted({DEFAULT_UPSTREAM, *spec.upstreams}))
            bad((*here, "upstream"), f"rules[{i}] ({name}): no upstream named {r.upstream!r} (upstreams: {known})")
        decision = make_decision(r.action, name, reason, monitor_mode, r.upstream)
        if r.allow_models is not None:
            decision = dataclasses.replace(decision, allow_models=Patterns(r.allow_models))
        restrictive = r.action in (DENY, MONITOR)
        rules.append(
            Rule(
                name=name,
                line=doc.line_of(here),
                action=r.action,
                shadow=r.mode == "monitor",
                countries=frozenset(r.countries) if r.countries is not None else None,
                subdivisions=frozenset(r.subdivisions) if r.subdivisions is not None else None,
                asns=frozenset(r.asns) if r.asns is not None else None,
                anonymizer=frozenset(r.anonymizer) if r.anonymizer is not None else None,
                cidrs=CidrSet(nets) if r.cidrs is not None else None,
                paths=PathSet(r.paths, spec.paths_case == "insensitive") if r.paths is not None else None,
                decision=_with_keys(
                    _with_budget(_with_limit(decision, r.rate_limit), r),
                    r.client_keys == "required",
                    keyed,
                    spec.upstreams,
                ),
                models=Patterns(r.models) if r.models is not None else None,
                # Unknown model, 'deny': a rule that refuses takes it, one that lets through does not.
                unknown_matches=restrictive == (spec.body.unknown_model == "deny"),
            )
        )
    # Country data matters only where the policy tells countries apart.
    uses_country = any(r.countries is not None for r in spec.rules) or spec.defaults.action != spec.defaults.unknown
    if capabilities is not None and uses_country and spec.geo.field not in capabilities:
        bad(
            ("geo", "field") if "geo" in doc.data else (),
            f"geo.field {spec.geo.field!r} needs {_DB_FOR[spec.geo.field]}; none is configured",
        )

    index = RuleIndex(rules)
    for later_i, later in enumerate(rules):
        earlier_i = index.first_cover(rules, later_i, _enforced_cover)
        if earlier_i is not None:
            earlier = rules[earlier_i]
            bad(
                ("rules", later_i),
                f"rules[{later_i}] ({later.name}) can never match: rule {earlier.name!r} "
                f"(line {earlier.line}) matches everything it does",
            )

    for i, t in enumerate(spec.tests):
        problems.extend(_test_problems(i, t, names, doc))

    if problems:
        raise FileError(doc.filename, problems)

    d = spec.defaults

    def default(action: Action, name: str, reason: str) -> Decision:
        return _with_keys(make_decision(action, name, reason, monitor_mode), False, keyed, spec.upstreams)

    return Policy(
        spec=spec,
        source=doc.filename,
        sha256="",
        rules=tuple(rules),
        index=index,
        field=spec.geo.field,
        on_default=default(d.action, "defaults.action", "no rule matched"),
        on_unknown=default(d.unknown, "defaults.unknown", "no country for this address"),
        on_private=default(d.private, "defaults.private", "private, loopback or link-local address"),
        on_invalid=default(d.invalid, "defaults.invalid", "client address could not be read"),
        on_missing=default(d.missing, "defaults.missing", "a trusted proxy sent no client address"),
        block_body=block_body(spec.block),
        test_lines=tuple(doc.line_of(("tests", i)) for i in range(len(spec.tests))),
        # Only where the file says it: a default left out has no line.
        default_lines={f"defaults.{k}": doc.lines.get(("defaults", k)) for k in type(d).model_fields},
        unknown_model_allowed=spec.body.unknown_model == "allow",
        client_keys_required=keyed,
        warnings=tuple(w for i, r in enumerate(spec.rules) for w in _budget_warnings(i, r, spec, doc)),
    )


def _rule_problems(
    i: int, r: RuleSpec, doc: Document, capabilities: frozenset[str] | None, nets: list[IPNetwork] | None = None
) -> list[Problem]:
    """What a schema cannot check in one rule. Run on every rule that has a usable
    shape even when other parts of the file do not, so that one pass reports it all.
    ``nets`` receives the rule's valid CIDRs, parsed (ipaddress's parsing is most of a
    large policy's compile time, so it is done once)."""
    problems: list[Problem] = []
    here = ("rules", i)
    name = r.name or f"rule-{i + 1}"

    def bad(path: tuple[str | int, ...], message: str) -> None:
        problems.append(Problem(doc.line_of(path), message))

    for j, c in enumerate(r.countries or ()):
        if not iso3166.is_country(c):
            bad((*here, "countries", j), f"rules[{i}].countries: {c!r} {iso3166.country_problem(c)}")
    for j, c in enumerate(r.subdivisions or ()):
        if not iso3166.is_subdivision(c):
            bad((*here, "subdivisions", j), f"rules[{i}].subdivisions: {c!r} {iso3166.subdivision_problem(c)}")
    for j, c in enumerate(r.cidrs or ()):
        try:
            net = parse_network(c)
        except ValueError as e:
            bad((*here, "cidrs", j), f"rules[{i}].cidrs: {c!r}: {e}")
        else:
            if nets is not None:
                nets.append(net)
    for j, p in enumerate(r.paths or ()):
        problem = _path_pattern_problem(p)
        if problem:
            bad((*here, "paths", j), f"rules[{i}].paths: {p!r} {problem}")
    for key in ("models", "allow_models"):
        for j, m in enumerate(getattr(r, key) or ()):
            if not m or m == "*" or "*" in m[:-1]:
                bad(
                    (*here, key, j),
                    f"rules[{i}].{key}: {m!r}: write a model name ('gpt-4o') or a prefix ending in one '*' ('o1*')",
                )
    if r.action == ROUTE and r.upstream is None:
        bad((*here, "action"), f"rules[{i}] ({name}): action: route needs 'upstream: NAME' (which upstream to use)")
    if r.upstream is not None and r.action != ROUTE:
        bad((*here, "upstream"), f"rules[{i}] ({name}): 'upstream' goes with action: route (this rule is {r.action})")
    if r.allow_models is not None and r.action not in (ALLOW, ROUTE):
        bad(
            (*here, "allow_models"),
            f"rules[{i}] ({name}): allow_models limits what an allow or route rule lets through; "
            f"a {r.action} rule lets nothing through to limit",
        )
    for key in ("token_limit", "max_concurrent"):
        if getattr(r, key) is not None and r.action not in (ALLOW, ROUTE):
            bad(
                (*here, key),
                f"rules[{i}] ({name}): {key} limits what an allow or route rule lets through; "
                + (
                    "a deny rule lets nothing through to limit"
                    if r.action == DENY
                    else "a monitor rule only records what it matches (make it allow to limit it)"
                ),
            )
    for j, t in enumerate(r.token_limit or ()):
        if t.burst is not None and t.kind == "quota":
            bad(
                (*here, "token_limit", j, "burst"),
                f"rules[{i}].token_limit[{j}]: burst goes with kind: rate "
                "(a quota's whole budget may be spent at once)",
            )
    if r.token_reserve is not None and r.token_limit is None:
        bad((*here, "token_reserve"), f"rules[{i}] ({name}): token_reserve goes with token_limit (what it reserves in)")
    for key, fact in _NEEDS.items():
        if getattr(r, key) is not None and capabilities is not None and fact not in capabilities:
            bad(
                (*here, key),
                f"rules[{i}] ({name}) uses {key!r}, which needs {_DB_FOR[fact]}; none is configured (--geoip)",
            )
    return problems


def _budget_warnings(i: int, r: RuleSpec, spec: PolicySpec, doc: Document) -> list[Problem]:
    """What ``regiongate check`` warns about a rule's budget: valid, but likely not what was meant."""
    if r.token_limit is None and r.max_concurrent is None:
        return []
    out: list[Problem] = []
    name = r.name or f"rule-{i + 1}"
    here = ("rules", i)
    if r.mode == "monitor":
        what = " and ".join(k for k in ("token_limit", "max_concurrent") if getattr(r, k) is not None)
        out.append(
            Problem(
                doc.line_of(here),
                f"rules[{i}] ({name}) is mode: monitor, so it never decides and its {what} never applies "
                "(the rule or default that decides its requests counts them)",
            )
        )
    fold = spec.paths_case == "insensitive"
    known = [k.lower() if fold else k for k in KNOWN_PATHS]
    for j, p in enumerate(r.paths or () if r.token_limit is not None else ()):
        pattern = p.lower() if fold else p
        if pattern.endswith("*"):
            readable = any(k.startswith(pattern[:-1]) for k in known)
        else:
            readable = (pattern[:-1] if pattern.endswith("/") and len(pattern) > 1 else pattern) in known
        if not readable:
            out.append(
                Problem(
                    doc.line_of((*here, "paths", j)),
                    f"rules[{i}] ({name}): token_limit on {p!r}, a path whose answers the gateway cannot read "
                    f"usage from (it reads {', '.join(KNOWN_PATHS)}): its requests are charged an estimate, "
                    "flagged as one, never the provider's count",
                )
            )
    reserve = r.token_reserve or TokenReserveSpec()
    for j, t in enumerate(r.token_limit or ()):
        capacity = t.burst if t.burst is not None and t.kind == "rate" else t.tokens
        reserved = []
        if t.count != "input" and reserve.output > capacity:
            reserved.append(f"a request that names no max_tokens reserves {reserve.output} output tokens")
        if reserve.unreadable > capacity:
            reserved.append(f"a body that cannot be read reserves {reserve.unreadable}")
        if reserved:
            held = "burst" if t.burst is not None and t.kind == "rate" else "tokens"
            out.append(
                Problem(
                    doc.line_of((*here, "token_limit", j)),
                    f"rules[{i}] ({name}): token_limit[{j}] can never hold more than {capacity} tokens ({held}), "
                    f"but {' and '.join(reserved)}: such requests are refused as never fitting (429, not retried); "
                    "set token_reserve lower or the limit higher",
                )
            )
    return out


def _api_key_problems(spec: PolicySpec, doc: Document) -> list[Problem]:
    """``by: api_key`` (a rate_limit, a token_limit, max_concurrent) on a rule whose requests may reach an
    upstream that injects its own key, where no client key is required.

    The subject is then the caller's bearer token, and such an upstream never
    sees that token (``api_key_env`` replaces it), so a token made up per
    request is served with the operator's key on a fresh budget every time:
    the limit would limit nothing. The rule's upstream and every fallback after
    it count, since a failed-over request is served with the fallback's key.
    ``client_keys: required`` (on the rule, or on an upstream it may reach,
    which then requires it of every request) makes the subject a key the
    gateway issued, checked before the request goes anywhere.
    """
    problems = []
    for i, r in enumerate(spec.rules):
        limits: list[tuple[tuple[str | int, ...], str, str]] = []  # (where, what, other subjects)
        if r.rate_limit is not None and r.rate_limit.by == "api_key":
            limits.append((("rate_limit", "by"), "rate_limit", "ip, country, subdivision or asn"))
        for j, t in enumerate(r.token_limit or ()):
            if "api_key" in t.by:
                limits.append((("token_limit", j, "by"), f"token_limit[{j}]", _OTHER_SUBJECTS))
        if r.max_concurrent is not None and "api_key" in r.max_concurrent.by:
            limits.append((("max_concurrent", "by"), "max_concurrent", _OTHER_SUBJECTS))
        if not limits or r.client_keys == "required":
            continue
        if r.action == DENY and spec.mode != "monitor":  # refused, never served: no key is used
            continue
        reachable = [spec.upstreams[u] for u in _reachable(r.upstream or DEFAULT_UPSTREAM, spec.upstreams)]
        injecting = [u for u in reachable if u.api_key_env]
        if not injecting or any(u.client_keys == "required" for u in reachable):
            continue
        name = r.name or f"rule-{i + 1}"
        for where, what, others in limits:
            problems.append(
                Problem(
                    doc.line_of(("rules", i, *where)),
                    f"rules[{i}] ({name}): {what} by: api_key cannot limit these callers: their upstream sends "
                    f"its own key ({injecting[0].api_key_env}) in place of theirs, so a made-up key per request "
                    "would get a fresh budget. Require keys the gateway issues to its callers (client_keys: "
                    f"required, on this rule or its upstream; regiongate keys add), or limit by {others}",
                )
            )
    return problems


_OTHER_SUBJECTS = "ip, country, subdivision, asn, model or rule"


def _reachable(name: str, upstreams: dict[str, UpstreamSpec]) -> list[str]:
    """The upstream ``name`` and every fallback a request to it can reach, each once, in order."""
    out: list[str] = []
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop(0)
        if current in seen or current not in upstreams:  # --upstream's default carries no key
            continue
        seen.add(current)
        out.append(current)
        todo.extend(upstreams[current].fallback)
    return out


def _upstream_problems(upstreams: dict[str, UpstreamSpec], doc: Document) -> list[Problem]:
    """What a schema cannot check in ``upstreams``: one of url/urls, keys for auth, fallback chains.

    ``default`` may be named as a fallback without being defined here: ``--upstream`` provides it.
    """
    problems: list[Problem] = []

    def bad(path: tuple[str | int, ...], message: str) -> None:
        problems.append(Problem(doc.line_of(path), message))

    for name, up in upstreams.items():
        here = ("upstreams", name)
        if not name.replace("-", "").replace("_", "").isalnum():
            bad(here, f"upstream name {name!r}: use letters, digits, '-' and '_'")
        if (up.url is None) == (up.urls is None):
            bad(here, f"upstreams.{name}: give either url (one URL) or urls (a list tried in order), not both")
        if "auth" in up.model_fields_set and not up.api_key_env:
            bad((*here, "auth"), f"upstreams.{name}.auth: needs api_key_env, the variable holding the key")
        if up.health.max_backoff_seconds < up.health.backoff_seconds:
            bad((*here, "health", "max_backoff"), f"upstreams.{name}.health: max_backoff is shorter than backoff")
        for requested, sent in up.models.items():
            if not requested or not sent:
                bad((*here, "models"), f"upstreams.{name}.models: model names cannot be empty")
        for j, other in enumerate(up.fallback):
            where = (*here, "fallback", j)
            if other == name:
                bad(where, f"upstreams.{name}.fallback: {other!r} is this upstream itself")
            elif other not in upstreams and other != "default":
                bad(where, f"upstreams.{name}.fallback: no upstream named {other!r}")
            elif up.fallback.index(other) != j:
                bad(where, f"upstreams.{name}.fallback: {other!r} is listed twice")
    # A cycle through other upstreams (a -> b -> a) would try the same URLs forever.
    state: dict[str, int] = {}  # 1: being walked, 2: done

    def walk(name: str, trail: list[str]) -> None:
        state[name] = 1
        up = upstreams.get(name)
        for j, other in enumerate(up.fallback if up is not None else ()):
            if other == name:
                continue  # reported above
            if state.get(other) == 1:
                cycle = " -> ".join([*trail[trail.index(other) :], name, other])
                bad(("upstreams", name, "fallback", j), f"upstreams.{name}.fallback: a cycle: {cycle}")
            elif other not in state:
                walk(other, [*trail, name])
        state[name] = 2

    for name in upstreams:
        if name not in state:
            walk(name, [])
    return problems


def _test_problems(i: int, t: PolicyTest, rule_names: Container[str], doc: Document) -> list[Problem]:
    problems = []
    try:
        parse_address(t.ip)
    except AddressError as e:
        problems.append(Problem(doc.line_of(("tests", i, "ip")), f"tests[{i}].ip: {e}"))
    if t.rule is not None and t.rule not in rule_names and not t.rule.startswith("defaults."):
        problems.append(Problem(doc.line_of(("tests", i, "rule")), f"tests[{i}].rule: no rule named {t.rule!r}"))
    if t.expect == DENY and t.upstream is not None:
        where = doc.line_of(("tests", i, "upstream"))
        problems.append(Problem(where, f"tests[{i}].upstream: a denied request goes to no upstream"))
    return problems


def _path_pattern_problem(p: str) -> str | None:
    """Patterns are an exact path or a prefix ending in one '*' (see :class:`PathSet`)."""
    if not p.startswith("/"):
        return "must start with '/' (an exact path like '/v1/embeddings', or a prefix like '/v1/*')"
    if "*" in p[:-1]:
        return (
            "has a '*' before its end: '*' is allowed only as the last character, where it makes the "
            "pattern a prefix ('/v1/*' matches every path under /v1/); there are no wildcards inside a path"
        )
    if "?" in p or "#" in p:
        return "has a '?' or '#': paths are matched without the query string, so it could never match"
    base = p[:-1] if p.endswith("*") else p
    try:
        canon = canonical(base.encode())
    except BadPath as e:
        return f"could never match: a request with this path is refused ({e})"
    if canon != base:
        return f"could never match: requests are matched in canonical form, where this path is {canon!r}"
    return None


_DB_FOR = {
    geofacts.COUNTRY: "a Country, City or Enterprise database",
    geofacts.SUBDIVISIONS: "a City or Enterprise database",
    geofacts.ASN: "an ASN, ISP or Enterprise database",
    geofacts.ANONYMIZER: "an Anonymous-IP database",
    geofacts.REGISTERED_COUNTRY: "a Country, City or Enterprise database",
}


def _conditions(r: RuleSpec) -> dict[str, Any]:
    keys = ("countries", "subdivisions", "asns", "anonymizer", "cidrs", "paths", "models")
    return {k: getattr(r, k) for k in keys if getattr(r, k) is not None}


def _describe(key: str, values: list[Any]) -> str:
    if len(values) > 6:
        return f"{key} ({len(values)} values)"
    return f"{key} {', '.join(str(v) for v in values)}"


def _enforced_cover(a: Rule, b: Rule) -> bool:
    """Whether ``a`` makes ``b`` unreachable: it enforces (a shadow rule lets the walk go on) and subsumes it."""
    return not a.shadow and _subsumes(a, b)


def _subsumes(a: Rule, b: Rule) -> bool:
    """Whether every request ``b`` matches is matched by ``a`` too.

    Conservative: only compares a key with the same key, so it can miss an
    unreachable rule (``countries: [UA]`` before ``subdivisions: [UA-43]``)
    but never calls a reachable one unreachable.
    """
    for key in ("countries", "subdivisions", "asns", "anonymizer"):
        av, bv = getattr(a, key), getattr(b, key)
        if av is not None and (bv is None or not bv <= av):
            return False
    if a.cidrs is not None and (b.cidrs is None or not all(a.cidrs.covers(n) for n in b.cidrs.networks)):
        return False
    if a.models is not None and (
        b.models is None or not a.models.covers(b.models) or (b.unknown_matches and not a.unknown_matches)
    ):
        return False
    return a.paths is None or (b.paths is not None and a.paths.covers(b.paths))
