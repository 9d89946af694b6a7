"""What a policy change does, judged by the gateway's own ``decide()``.

Comparing YAML text says which lines moved, not who gains or loses access:
reordering two rules, or a new rule above an old one, can change decisions
with no country code touched. So both policies are compiled as the gateway
compiles them, and every kind of caller either policy can tell apart is put
to both:

* every ISO 3166-1 country (and a caller with no country), on every path;
* every subdivision either policy names, in its country;
* every named ASN and every anonymizer kind, alone and with each named
  country, one unnamed country standing for all the others, and no country
  (rules can combine keys, and a country no rule names behaves like any other
  unnamed one, so this set is complete for the keys it covers);
* the first, last and a middle address of every listed CIDR, likewise;
* invalid and private clients.

Paths are every exact path either policy names, each prefix pattern's
prefix, and ``/v1/chat/completions``. Any caller whose decision differs is a
change; grouped by what changed so a compliance owner reads "CN: deny
(defaults.action) -> allow (supported)", not thousands of rows.

:func:`replay` does the same for real traffic: addresses from a list or the
gateway's own access log, looked up in real geo data.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from . import iso3166
from .clientip import INVALID, PRIVATE, PUBLIC, AddressError, ClientAddress, IPAddress, classify, parse_address
from .geo import ANONYMIZER_FLAGS, NO_FACTS, Geo, GeoFacts
from .policy import Decision, Policy, decide, request_path
from .reports import (
    ChangeOut,
    CountryFlips,
    DiffOut,
    FlipOut,
    PolicyRef,
    ReplayOut,
    ReplaySkipped,
    RuleFlips,
    SettingOut,
    Summary,
    Verdict,
    dump,
)
from .requestpath import BadPath

GENERIC_PATH = "/v1/chat/completions"
OTHER = "other"  # the context standing for every country no rule names
NO_COUNTRY = "no country"


@dataclass(frozen=True, slots=True)
class Probe:
    """One synthetic caller. ``context`` is the country an ASN, anonymizer or
    CIDR probe was combined with (``other``, ``no country``, or a code)."""

    kind: str
    subject: str
    context: str | None
    address: str | None
    path: str
    client: ClientAddress
    facts: GeoFacts
    # The country probe this one adds a key to (its code, or "no country"): a change
    # that probe shows too is the country's, not this key's, and is not repeated.
    base: str | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """Callers of one subject whose decision moved the same way.

    ``countries``/``addresses``/``paths`` list where it happened, or are
    ``None`` when it happened for every one probed."""

    kind: str
    subject: str
    old_verdict: str
    old_rule: str
    new_verdict: str
    new_rule: str
    countries: tuple[str, ...] | None
    addresses: tuple[str, ...] | None
    paths: tuple[str, ...] | None

    def report(self) -> ChangeOut:
        return ChangeOut(
            kind=self.kind,
            subject=self.subject,
            from_=Verdict(decision=self.old_verdict, rule=self.old_rule),
            to=Verdict(decision=self.new_verdict, rule=self.new_rule),
            countries=list(self.countries) if self.countries is not None else None,
            addresses=list(self.addresses) if self.addresses is not None else None,
            paths=list(self.paths) if self.paths is not None else None,
        )


@dataclass(frozen=True, slots=True)
class SettingChange:
    key: str
    old: Any
    new: Any


@dataclass(frozen=True, slots=True)
class PolicyDiff:
    old_source: str
    old_sha256: str
    new_source: str
    new_sha256: str
    probes: int
    changes: tuple[Change, ...]  # the decision (allow/deny/monitor) differs
    rule_changes: tuple[Change, ...]  # same decision, made by another rule
    settings: tuple[SettingChange, ...]  # what a client sees besides the decision

    @property
    def changed(self) -> bool:
        """What a CI gate acts on: a caller is treated differently."""
        return bool(self.changes or self.settings)

    def report(self) -> DiffOut:
        """The diff as its report model: what ``diff --json`` prints and ``POST /admin/diff`` returns."""
        transitions = Counter(f"{c.old_verdict} -> {c.new_verdict}" for c in self.changes)
        return DiffOut(
            old=PolicyRef(path=self.old_source, sha256=self.old_sha256),
            new=PolicyRef(path=self.new_source, sha256=self.new_sha256),
            changed=self.changed,
            probes=self.probes,
            changes=[c.report() for c in self.changes],
            rule_changes=[c.report() for c in self.rule_changes],
            settings=[SettingOut(key=s.key, from_=s.old, to=s.new) for s in self.settings],
            summary=Summary(changes=len(self.changes), transitions=dict(sorted(transitions.items()))),
        )

    def as_dict(self) -> dict[str, Any]:
        return dump(self.report())


# --- the probe space -----------------------------------------------------------------


def _named(policies: Iterable[Policy], key: str) -> set[Any]:
    out: set[Any] = set()
    for p in policies:
        for r in p.rules:
            values = getattr(r, key)
            if values is not None:
                out |= set(values)
    return out


def _paths(policies: tuple[Policy, Policy]) -> list[str]:
    paths = {GENERIC_PATH}
    for p in policies:
        for r in p.rules:
            if r.paths is not None:
                paths |= set(r.paths.exact) | {prefix or "/" for prefix in r.paths.prefixes}
    return sorted(paths)


def _networks(policies: tuple[Policy, Policy]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = {n for p in policies for r in p.rules if r.cidrs is not None for n in r.cidrs.networks}
    return sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen))


def _covered(ip: IPAddress, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    return any(ip in n for n in nets)


def _neutral(nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network], kind: str) -> IPAddress:
    """An address of ``kind`` that no listed CIDR holds, so it sees only non-CIDR rules."""
    base = ipaddress.IPv4Address("198.18.0.1") if kind == PUBLIC else ipaddress.IPv4Address("10.0.0.1")
    for i in range(1 << 16):
        ip = base + (i << 8)
        if classify(ip) == kind and not _covered(ip, nets):
            return ip
    v6 = ipaddress.IPv6Address("2001:db8::1") if kind == PUBLIC else ipaddress.IPv6Address("fd00::1")
    for i in range(1 << 16):
        ip6 = v6 + (i << 80)
        if classify(ip6) == kind and not _covered(ip6, nets):
            return ip6
    raise ValueError("the policies' CIDRs cover every candidate address")  # pragma: no cover


def _representatives(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[tuple[str, IPAddress]]:
    first, last = net.network_address, net.broadcast_address
    inside = net.network_address + (net.num_addresses // 2)
    out: list[tuple[str, IPAddress]] = []
    for _label, ip in (("first", first), ("inside", inside), ("last", last)):
        if ip not in [x for _, x in out]:
            out.append((str(ip), ip))
    return out


def _client(ip: IPAddress) -> ClientAddress:
    return ClientAddress(ip, classify(ip), "probe", str(ip))


def _country_facts(cc: str | None, **extra: Any) -> GeoFacts:
    return GeoFacts(country=cc, registered_country=cc, **extra)


def probes(old: Policy, new: Policy) -> list[Probe]:
    pair = (old, new)
    paths = _paths(pair)
    nets = _networks(pair)
    public = _client(_neutral(nets, PUBLIC))
    private = _client(_neutral(nets, PRIVATE))
    all_countries = sorted(iso3166.countries())
    named = _named(pair, "countries")
    unnamed = next((c for c in all_countries if c not in named), None)
    contexts: list[tuple[str, str | None]] = [(c, c) for c in sorted(named)]
    if unnamed is not None:
        contexts.append((OTHER, unnamed))
    contexts.append((NO_COUNTRY, None))

    out: list[Probe] = []
    for path in paths:
        for cc in all_countries:
            out.append(Probe("country", cc, None, None, path, public, _country_facts(cc)))
        out.append(Probe("client", NO_COUNTRY, None, None, path, public, NO_FACTS))
        out.append(Probe("client", "private", None, None, path, private, NO_FACTS))
        out.append(Probe("client", "invalid", None, None, path, ClientAddress(None, INVALID, "probe", "?"), NO_FACTS))
        for sub in sorted(_named(pair, "subdivisions")):
            cc = sub.split("-")[0]
            facts = _country_facts(cc, subdivisions=(sub,))
            out.append(Probe("subdivision", sub, None, None, path, public, facts, cc))
        for asn in sorted(_named(pair, "asns")):
            for label, code in contexts:
                facts = _country_facts(code, asn=asn)
                out.append(Probe("asn", f"AS{asn}", label, None, path, public, facts, code or NO_COUNTRY))
        for flag in sorted(ANONYMIZER_FLAGS):
            for label, code in contexts:
                facts = _country_facts(code, anonymizer=frozenset({flag}))
                out.append(Probe("anonymizer", flag, label, None, path, public, facts, code or NO_COUNTRY))
        for net in nets:
            for text, ip in _representatives(net):
                client = _client(ip)
                if client.kind == PRIVATE:
                    out.append(Probe("cidr", str(net), None, text, path, client, NO_FACTS, "private"))
                    continue
                for label, code in contexts:
                    facts = _country_facts(code)
                    out.append(Probe("cidr", str(net), label, text, path, client, facts, code or NO_COUNTRY))
    return out


# --- comparing -----------------------------------------------------------------------


def _group(rows: list[tuple[Probe, Decision, Decision]], probed: dict[tuple[str, str], list[Probe]]) -> list[Change]:
    groups: dict[tuple[str, str, str, str, str, str], list[Probe]] = {}
    for probe, a, b in rows:
        key = (probe.kind, probe.subject, a.verdict, a.rule, b.verdict, b.rule)
        groups.setdefault(key, []).append(probe)
    out = []
    for (kind, subject, av, ar, bv, br), members in groups.items():
        space = probed[(kind, subject)]

        def where(attr: str, members: list[Probe] = members, space: list[Probe] = space) -> tuple[str, ...] | None:
            seen = list(dict.fromkeys(str(getattr(p, attr)) for p in members if getattr(p, attr) is not None))
            every = list(dict.fromkeys(str(getattr(p, attr)) for p in space if getattr(p, attr) is not None))
            return None if len(seen) == len(every) else tuple(seen)

        out.append(Change(kind, subject, av, ar, bv, br, where("context"), where("address"), where("path")))
    order = {"country": 0, "subdivision": 1, "client": 2, "asn": 3, "anonymizer": 4, "cidr": 5}
    return sorted(out, key=lambda c: (order.get(c.kind, 9), c.subject, c.old_verdict, c.new_verdict))


def _settings(old: Policy, new: Policy) -> list[SettingChange]:
    out = []
    for key in ("status", "code", "message", "type"):
        a, b = getattr(old.spec.block, key), getattr(new.spec.block, key)
        if a != b:
            out.append(SettingChange(f"block.{key}", a, b))
    if old.field != new.field:
        out.append(SettingChange("geo.field", old.field, new.field))
    if old.spec.paths_case != new.spec.paths_case:  # the probes spell paths one way: say it here
        out.append(SettingChange("paths_case", old.spec.paths_case, new.spec.paths_case))
    ups_a = {k: v.model_dump() for k, v in old.spec.upstreams.items()}
    ups_b = {k: v.model_dump() for k, v in new.spec.upstreams.items()}
    for name in sorted(set(ups_a) | set(ups_b)):
        if ups_a.get(name) != ups_b.get(name):
            out.append(SettingChange(f"upstreams.{name}", ups_a.get(name), ups_b.get(name)))
    if old.spec.redis.on_error != new.spec.redis.on_error:
        out.append(SettingChange("redis.on_error", old.spec.redis.on_error, new.spec.redis.on_error))
    limits_a = {r.name: _limits(r.decision) for r in old.rules}
    limits_b = {r.name: _limits(r.decision) for r in new.rules}
    for name in sorted(set(limits_a) & set(limits_b)):  # a rule added or removed shows as decision changes
        for key, a in limits_a[name].items():
            if a != limits_b[name][key]:
                out.append(SettingChange(f"rules.{name}.{key}", a, limits_b[name][key]))
    return out


def _limits(decision: Decision) -> dict[str, Any]:
    """A rule's limits as a diff shows them, each key compared on its own (None: the rule has none)."""
    budget = decision.budget
    tokens = budget.tokens if budget is not None else ()
    conc = budget.concurrency if budget is not None else None
    return {
        "rate_limit": _limit(decision),
        "token_limit": [
            {"tokens": t.tokens, "per": t.per, "by": list(t.by), "count": t.count, "kind": t.kind, "burst": t.burst}
            for t in tokens
        ]
        or None,
        "max_concurrent": {"streams": conc.streams, "by": list(conc.by)} if conc is not None else None,
        "token_reserve": (
            {"output": budget.output_default, "unreadable": budget.unreadable} if budget and tokens else None
        ),
        "client_keys": "required" if decision.client_keys else None,
    }


def _limit(decision: Decision) -> dict[str, Any] | None:
    lim = decision.limit
    return None if lim is None else {"requests": lim.requests, "per": lim.per, "by": lim.by, "burst": lim.burst}


def diff(old: Policy, new: Policy) -> PolicyDiff:
    """Every probed caller judged by both policies; the ones that differ, grouped."""
    space = probes(old, new)
    probed: dict[tuple[str, str], list[Probe]] = {}
    changed: list[tuple[Probe, Decision, Decision]] = []
    moved: list[tuple[Probe, Decision, Decision]] = []
    baseline: dict[tuple[str, str], tuple[Decision, Decision]] = {}
    for probe in space:  # country and client probes come first on each path
        probed.setdefault((probe.kind, probe.subject), []).append(probe)
        a = decide(old, probe.client, probe.facts, probe.path)
        b = decide(new, probe.client, probe.facts, probe.path)
        if probe.base is None:
            baseline[(probe.subject, probe.path)] = (a, b)
        elif baseline.get((probe.base, probe.path)) == (a, b):
            continue  # the same change its country (or client kind) shows: not this key's doing
        if a.verdict != b.verdict:
            changed.append((probe, a, b))
        elif a.rule != b.rule:
            moved.append((probe, a, b))
    return PolicyDiff(
        old.source,
        old.sha256,
        new.source,
        new.sha256,
        len(space),
        tuple(_group(changed, probed)),
        tuple(_group(moved, probed)),
        tuple(_settings(old, new)),
    )


# --- replay --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flip:
    line: int
    client: str
    path: str
    country: str
    old_verdict: str
    old_rule: str
    new_verdict: str
    new_rule: str


@dataclass(frozen=True, slots=True)
class ReplayReport:
    lines: int
    replayed: int
    skipped_redacted: int  # hashed or truncated clients: no address to look up
    skipped_unreadable: int
    flipped: int
    transitions: tuple[tuple[str, int], ...]
    top_countries: tuple[tuple[str, int], ...]
    top_rules: tuple[tuple[str, int], ...]
    examples: tuple[Flip, ...]

    def report(self) -> ReplayOut:
        """The replay as its report model: what ``diff --replay --json`` prints under ``replay``."""
        return ReplayOut(
            lines=self.lines,
            replayed=self.replayed,
            skipped=ReplaySkipped(redacted=self.skipped_redacted, unreadable=self.skipped_unreadable),
            flipped=self.flipped,
            transitions=dict(self.transitions),
            top_countries=[CountryFlips(country=c, flips=n) for c, n in self.top_countries],
            top_rules=[RuleFlips(rules=r, flips=n) for r, n in self.top_rules],
            examples=[
                FlipOut(
                    line=f.line,
                    client=f.client,
                    path=f.path,
                    country=f.country,
                    from_=Verdict(decision=f.old_verdict, rule=f.old_rule),
                    to=Verdict(decision=f.new_verdict, rule=f.new_rule),
                )
                for f in self.examples
            ],
        )


_REDACTED, _UNREADABLE = "redacted", "unreadable"


def read_line(line: str) -> tuple[ClientAddress, str] | str | None:
    """One replay input line: an address (optionally followed by a path), or an
    access-log JSON record. Returns the client and path, a reason to skip, or
    ``None`` for a blank or comment line."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if text.startswith("{"):
        try:
            rec = orjson.loads(text)
        except orjson.JSONDecodeError:
            return _UNREADABLE
        if not isinstance(rec, dict):
            return _UNREADABLE
        raw, path = rec.get("client"), rec.get("path")
        path = path if isinstance(path, str) and path.startswith("/") else GENERIC_PATH
        if raw is None and rec.get("client_problem"):
            return ClientAddress(None, INVALID, "log", "", str(rec["client_problem"])), path
        if not isinstance(raw, str):
            return _UNREADABLE
        if raw.startswith("h:") or "/" in raw:
            return _REDACTED
    else:
        parts = text.split()
        raw = parts[0]
        path = parts[1] if len(parts) > 1 and parts[1].startswith("/") else GENERIC_PATH
    try:
        ip = parse_address(raw)
    except AddressError:
        return _UNREADABLE
    return ClientAddress(ip, classify(ip), "log", raw), path


def replay(old: Policy, new: Policy, geo: Geo, lines: Iterable[str], top: int = 10, examples: int = 20) -> ReplayReport:
    """Both policies' decisions for each recorded request, with real geo facts."""
    counts: Counter[str] = Counter()
    transitions: Counter[str] = Counter()
    countries: Counter[str] = Counter()
    rules: Counter[str] = Counter()
    flips: list[Flip] = []
    n = 0
    for n, line in enumerate(lines, 1):
        read = read_line(line)
        if read is None:
            continue
        if isinstance(read, str):
            counts[read] += 1
            continue
        client, raw_path = read
        try:
            path = request_path(raw_path)
        except BadPath:
            counts[_UNREADABLE] += 1  # the proxy answers it with a 400 before any policy
            continue
        facts = geo.lookup(client.ip) if client.kind == PUBLIC and client.ip is not None else NO_FACTS
        counts["replayed"] += 1
        a = decide(old, client, facts, path)
        b = decide(new, client, facts, path)
        if a.verdict == b.verdict:
            continue
        counts["flipped"] += 1
        country = facts.country or (client.kind if client.kind != PUBLIC else "unknown")
        transitions[f"{a.verdict} -> {b.verdict}"] += 1
        countries[country] += 1
        rules[f"{a.rule} -> {b.rule}"] += 1
        if len(flips) < examples:
            shown = str(client.ip) if client.ip is not None else "(invalid)"
            flips.append(Flip(n, shown, path, country, a.verdict, a.rule, b.verdict, b.rule))
    return ReplayReport(
        lines=n,
        replayed=counts["replayed"],
        skipped_redacted=counts[_REDACTED],
        skipped_unreadable=counts[_UNREADABLE],
        flipped=counts["flipped"],
        transitions=tuple(sorted(transitions.items())),
        top_countries=tuple(countries.most_common(top)),
        top_rules=tuple(rules.most_common(top)),
        examples=tuple(flips),
    )
