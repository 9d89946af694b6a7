"""The evidence report's data: what the audit stream says about one period, as one model.

The promise: :func:`build` is a pure function of the evidence (the stream's
entries, the policy texts, the hourly counts), the period, and the chain
check's result; everything the HTML and PDF show is in the
:class:`~gateway.reports.EvidenceReportOut` it returns (the JSON), so the
three formats cannot disagree. Where a figure comes from is part of it:
country totals from the hourly counts (every decision, no sampling), the
breakdowns by subdivision, ASN and model from the requests stored one by one
(refusals; sampled per source, and the sampled-out count is stated).
The evidence comes from :func:`.exportfile.load_export` or, through the CLI, Redis.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import yaml

from ..reports import (
    ChainCheckOut,
    CountOut,
    CountryOut,
    EvidenceReportOut,
    FailModeOut,
    GapOut,
    GatewayOut,
    GeoipOut,
    OverrideEventOut,
    PeriodOut,
    PolicyLoadOut,
    PolicyVersionOut,
    RuleSourceOut,
    SummaryOut,
    VerificationOut,
)
from .chain import Verification
from .entries import (
    CountsEntry,
    EntryError,
    GapEntry,
    GeoipEntry,
    OverrideEntry,
    PolicyEntry,
    RequestEntry,
    StartEntry,
    StopEntry,
    parse_entry,
)
from .policymap import country_name

STATEMENT = (
    "Supporting evidence, not a certification: this report shows what Regiongate's own records say "
    "the gateway was configured to do and did over the period. It does not certify compliance with any "
    "law, sanction or contract; that judgement is the reader's."
)
REFUSED = frozenset({"deny", "rate_limited"})
NOWHERE = ("unknown", "invalid", "missing")  # the country label of callers with no usable location
TOP = 50  # rows per breakdown table: the JSON has them all, the pages would not

LIMITATIONS = (
    "IP geolocation places a network, not a person. Country accuracy of commercial databases is high for "
    "fixed lines (vendors state about 99% at country level) and lower for mobile carriers, satellite links "
    "and networks that move between countries; subdivision accuracy is markedly lower (vendors state "
    "roughly 60-80% within 50 km for cities).",
    "A caller can hide behind a VPN, proxy, hosting provider or Tor. Regiongate sees such callers as "
    "anonymizers only when an anonymizer database (for example GeoIP2 Anonymous IP) is loaded and a rule "
    "names them; without one, a VPN exit in an allowed country is judged as that country.",
    "Some obligations cannot be expressed by an IP address at all: who owns the calling company (for "
    "example Anthropic's rule on companies majority-owned from unsupported regions), the nationality or "
    "residence of a person, or a sanctions-list match on a name. This report says nothing about those.",
    "Private and loopback addresses are judged by the policy's defaults.private; a gateway behind a proxy "
    "it does not trust sees the proxy's address, not the caller's (see the trusted proxies in force).",
    "Counts are as complete as the evidence: minutes listed under evidence gaps, or outside any gateway's "
    "chain, have no record. A chain that does not verify (section Verification) may have been altered.",
)


class Evidence(Protocol):
    """What the report is built from: an export file read (:class:`.exportfile.Export`) or Redis read."""

    @property
    def items(self) -> list[tuple[str, Any]]: ...  # (stream id, decoded entry) in stream order
    @property
    def policy_texts(self) -> dict[str, str]: ...  # sha256 -> text
    @property
    def hourly(self) -> list[dict[str, Any]]: ...  # {hour, country, subdivision, decision, rule, n}: Redis's hashes


def parse_time(text: str) -> datetime:
    """An ISO time (a date alone is its midnight UTC); naive times are UTC."""
    when = datetime.fromisoformat(text)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")


def _hour_start(hour: str) -> datetime:
    return datetime.strptime(hour, "%Y-%m-%dT%H").replace(tzinfo=UTC)


def _entries(evidence: Evidence, since: datetime, until: datetime) -> Iterator[tuple[str, Any]]:
    """(stream id, parsed entry) of the period; entries that do not parse are counted by verify, not here."""
    for sid, raw in evidence.items:
        try:
            entry = parse_entry(raw)
            when = parse_time(entry.time)
        except (EntryError, ValueError, TypeError):
            continue
        if since <= when < until:
            yield sid, entry


def _top(counter: Counter[str], n: int = TOP) -> list[CountOut]:
    return [CountOut(key=k, n=v) for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def _document(text: str | None) -> dict[str, Any] | None:
    """The policy text as YAML data, read for what the report names (the gateway validated it when it loaded it)."""
    if text is None:
        return None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return doc if isinstance(doc, dict) else None


def _on_error(doc: dict[str, Any] | None) -> str | None:
    if doc is None:
        return None
    redis = doc.get("redis")
    return str(redis.get("on_error", "open")) if isinstance(redis, dict) else "open"


def _urls(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [str(u) for u in value] if isinstance(value, list) else []


def _sources(doc: dict[str, Any] | None) -> list[RuleSourceOut]:
    """Each rule's ``source:`` (its own URLs, or ``policy`` for the policy's ``source:``), dated by ``captured:``."""
    if doc is None or not isinstance(doc.get("rules"), list):
        return []
    provider = doc.get("provider")
    captured = doc.get("captured")
    out = []
    for i, rule in enumerate(doc["rules"], 1):
        if not isinstance(rule, dict) or rule.get("source") is None:
            continue
        cited = rule["source"]
        urls = _urls(doc.get("source")) if cited == "policy" else _urls(cited)
        out.append(
            RuleSourceOut(
                rule=str(rule.get("name") or f"rule-{i}"),
                provider=str(provider) if provider is not None else None,
                urls=urls,
                captured=str(captured) if captured is not None else None,
            )
        )
    return out


def build(
    evidence: Evidence,
    since: datetime,
    until: datetime,
    verification: Verification | None,
    *,
    now: datetime,
    source: str,
) -> EvidenceReportOut:
    """The report over ``[since, until)``; ``verification`` is the chain check (None: no key given)."""
    entries = list(_entries(evidence, since, until))
    gateways: dict[str, dict[str, Any]] = {}
    policies: dict[tuple[str, str], list[PolicyEntry]] = {}
    geoip: dict[str, GeoipEntry] = {}
    overrides: list[OverrideEntry] = []
    gaps: list[GapOut] = []
    chain_counts: list[tuple[str, list[Any]]] = []
    sampled = 0
    refused_by_policy: dict[str, Counter[str]] = {}
    by_sub: Counter[str] = Counter()
    by_asn: Counter[str] = Counter()
    by_rule: Counter[str] = Counter()
    by_model: Counter[str] = Counter()
    would: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    for _sid, e in entries:
        chain = e.chain or "(unchained)"
        seen = gateways.setdefault(chain, {"first": e.time, "last": e.time, "stopped": False})
        seen["last"] = e.time
        if isinstance(e, StartEntry):
            seen.update(host=e.host, pid=e.pid, version=e.version, audit=e.audit)
        elif isinstance(e, StopEntry):
            seen["stopped"] = True
        elif isinstance(e, PolicyEntry):
            policies.setdefault((e.role, e.sha256), []).append(e)
        elif isinstance(e, GeoipEntry):
            geoip.setdefault(e.sha256, e)
        elif isinstance(e, OverrideEntry):
            overrides.append(e)
        elif isinstance(e, GapEntry):
            gaps.append(GapOut(chain=chain, from_=e.from_, to=e.to, lost=e.lost, reasons=e.reasons))
        elif isinstance(e, CountsEntry):
            chain_counts.extend((e.hour, row) for row in e.rows)
            sampled += e.sampled
        elif isinstance(e, RequestEntry):
            if e.decision in REFUSED:
                refused_by_policy.setdefault(e.policy, Counter())[e.rule] += 1
                by_rule[e.rule] += 1
                by_sub.update(e.subdivisions)
                if e.asn is not None:
                    by_asn[f"AS{e.asn}"] += 1
                by_model[e.model or "(unknown)"] += 1
            elif e.decision == "monitor":
                would[e.rule] += 1
            if e.usage is not None:  # a forwarded request whose tokens were read (--audit all)
                tokens[e.country or "(unknown)"] += e.usage["input"] + e.usage["output"]
            if e.shadow_decision == "deny" and e.decision not in REFUSED:
                would[f"shadow: {e.shadow_rule}"] += 1  # the shadow policy would have refused it

    rows, counts_from = _counts(chain_counts, evidence.hourly, since, until)
    countries: dict[str, dict[str, int]] = {}
    refused_rule: Counter[str] = Counter()
    for cc, _sub, decision, rule, n in rows:
        c = countries.setdefault(cc, {"allowed": 0, "refused": 0, "monitored": 0})
        if decision in REFUSED:
            c["refused"] += n
            refused_rule[rule] += n
        elif decision == "monitor":
            c["monitored"] += n
        else:
            c["allowed"] += n
    judged = sum(n for *_, n in rows)
    refused = sum(c["refused"] for c in countries.values())
    monitored = sum(c["monitored"] for c in countries.values())

    texts = evidence.policy_texts
    ordered = sorted(policies.items(), key=lambda kv: (kv[1][0].time, kv[0]))
    replaced: dict[tuple[str, str], str] = {}
    for (role, sha), _ in ordered:
        later = [
            loads[0].time for (r, s), loads in ordered if r == role and loads[0].time > policies[(role, sha)][0].time
        ]
        if later:
            replaced[(role, sha)] = min(later)
    docs = {sha: _document(texts.get(sha)) for _, sha in policies}
    versions = [
        PolicyVersionOut(
            sha256=sha,
            role=role,
            version=loads[0].version,
            first_loaded=loads[0].time,
            replaced_at=replaced.get((role, sha)),
            loads=[PolicyLoadOut(time=x.time, chain=x.chain or "", trigger=x.trigger, path=x.path) for x in loads],
            on_error=_on_error(docs[sha]),
            sources=_sources(docs[sha]),
            text=texts.get(sha),
            refused_by=_top(refused_by_policy.get(sha, Counter())),
        )
        for (role, sha), loads in ordered
    ]
    return EvidenceReportOut(
        title=f"Regiongate evidence report, {_iso(since)[:10]} to {_iso(until)[:10]}",
        statement=STATEMENT,
        generated_at=_iso(now),
        source=source,
        period=PeriodOut(since=_iso(since), until=_iso(until)),
        summary=SummaryOut(
            gateways=len(gateways),
            judged=judged,
            allowed=judged - refused - monitored,
            refused=refused,
            monitored=monitored,
            refused_by_rule=_top(refused_rule),
            counts_from=counts_from,
            sampled=sampled,
        ),
        gateways=[
            GatewayOut(
                chain=name,
                host=g.get("host"),
                pid=g.get("pid"),
                version=g.get("version"),
                audit=g.get("audit"),
                first=g["first"],
                last=g["last"],
                stopped=g["stopped"],
            )
            for name, g in sorted(gateways.items(), key=lambda kv: kv[1]["first"])
        ],
        policies=versions,
        countries=[
            CountryOut(country=cc, name=country_name(cc), **c)
            for cc, c in sorted(countries.items(), key=lambda kv: (-kv[1]["refused"] - kv[1]["allowed"], kv[0]))
        ],
        refusals_by_subdivision=_top(by_sub),
        refusals_by_asn=_top(by_asn),
        refusals_by_rule=_top(by_rule),
        refusals_by_model=_top(by_model),
        tokens_by_country=_top(tokens),
        would_refuse_by_rule=_top(would),
        clients={label: sum(n for cc, *_, n in rows if cc == label) for label in NOWHERE},
        fail_modes=_fail_modes(gaps, versions),
        geoip=[
            GeoipOut(
                path=g.path,
                type=g.type,
                build=g.build,
                sha256=g.sha256,
                loaded=g.time,
                age_days=_age_days(g.build, until),
            )
            for g in sorted(geoip.values(), key=lambda g: g.time)
        ],
        overrides=[
            OverrideEventOut(
                time=o.time,
                action=o.action,
                id=o.id,
                override=o.override,
                match=o.match,
                value=o.value,
                by=o.by,
                reason=o.reason,
                ttl=o.ttl,
            )
            for o in overrides
        ],
        gaps=sorted(gaps, key=lambda g: g.from_),
        limitations=_limitations(list(geoip.values())),
        verification=_verification(verification),
    )


def _counts(
    chained: list[tuple[str, list[Any]]],
    hashes: list[dict[str, Any]],
    since: datetime,
    until: datetime,
) -> tuple[list[tuple[str, str, str, str, int]], str]:
    """Rows (country, subdivision, decision, rule, n) of the hours in the period: the chained counts when
    there are any (tamper-evident), else Redis's hourly hashes (summed over gateways, not chained)."""

    def within(hour: str) -> bool:
        try:
            return since <= _hour_start(hour) < until
        except ValueError:
            return False

    if chained:
        out = []
        for hour, row in chained:
            if within(hour) and len(row) == 5 and isinstance(row[4], int):
                out.append((str(row[0]), str(row[1]), str(row[2]), str(row[3]), row[4]))
        return out, "chain"
    if hashes:
        rows = []
        for h in hashes:
            n = h.get("n")
            if within(str(h.get("hour"))) and isinstance(n, int):
                rows.append(
                    (str(h.get("country")), str(h.get("subdivision")), str(h.get("decision")), str(h.get("rule")), n)
                )
        return rows, "hashes"
    return [], "none"


def _age_days(build: str | None, until: datetime) -> float | None:
    if build is None:
        return None
    try:
        return round((until - parse_time(build)).total_seconds() / 86400, 1)
    except ValueError:
        return None


def _fail_modes(gaps: list[GapOut], versions: list[PolicyVersionOut]) -> list[FailModeOut]:
    """Each minute Redis was away, and what the policy in force said to do then (rate limits open or closed)."""
    modes = {v.on_error for v in versions if v.role == "policy" and v.on_error is not None}
    effect = {
        frozenset({"open"}): "fail open: rate limits were not enforced; geo decisions went on as usual",
        frozenset({"closed"}): "fail closed: requests under a rate limit were refused with 503",
    }.get(frozenset(modes), "the policies in force differ on redis.on_error; see each version")
    out = []
    for g in gaps:
        if g.reasons.get("redis"):
            what = f"Redis unavailable: {g.lost} audit entries could not be written"
            out.append(FailModeOut(from_=g.from_, to=g.to, chain=g.chain, what=what, effect=effect))
    return out


def _limitations(databases: list[GeoipEntry]) -> list[str]:
    kinds = sorted({g.type for g in databases})
    loaded = (
        f"GeoIP databases loaded in the period: {', '.join(kinds)}."
        if kinds
        else "No GeoIP database swap is recorded in the period: the gateway used its embedded country data "
        "(country only, no subdivisions, ASNs or anonymizers) or databases loaded before the period."
    )
    anonymizer = any("anonymous" in k.lower() or "anonymizer" in k.lower() for k in kinds)
    vpn = (
        "An anonymizer database was loaded: VPN and proxy callers could be recognised where it lists them."
        if anonymizer
        else "No anonymizer database was loaded in the period: VPN and proxy exits were judged by their location."
    )
    return [loaded, vpn, *LIMITATIONS]


def _verification(v: Verification | None) -> VerificationOut:
    if v is None:
        return VerificationOut(checked=False, ok=False, chains=[], unchained=0, malformed=0)
    chains = [
        ChainCheckOut(
            chain=c.chain,
            ok=c.ok,
            entries=c.entries,
            first_seq=c.first_seq,
            last_seq=c.last_seq,
            problems=[f"{p.what} at seq {p.seq} ({p.time}, stream id {p.stream_id}): {p.detail}" for p in c.problems],
            notices=c.notices(),
        )
        for c in v.chains
    ]
    return VerificationOut(checked=True, ok=v.ok, chains=chains, unchained=v.unchained, malformed=len(v.malformed))


def hourly_map_counts(report: EvidenceReportOut) -> tuple[Mapping[str, int], Mapping[str, int]]:
    """Refusals and allowed decisions per ISO country, for the report's two maps."""
    refused = {c.country: c.refused for c in report.countries if len(c.country) == 2}
    allowed = {c.country: c.allowed + c.monitored for c in report.countries if len(c.country) == 2}
    return refused, allowed
