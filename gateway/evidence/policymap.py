"""What a policy does to each country, and what a policy change does, as a world map.

The promise: each country's colour is what the gateway's own
:func:`~gateway.policy.decide` says of a public caller located there (no
subdivision, ASN or anonymizer fact) on ``/v1/chat/completions``, so the map
cannot disagree with the running gateway; what a country's colour cannot
show is listed beside the map in words: each subdivision a rule names whose
callers are treated otherwise than their country's, and each rule whose
conditions are not a place (ASNs, CIDRs, anonymizers, paths, models).
Classes: ``rg-allow``, ``rg-deny``, ``rg-monitor`` (let through only because
of monitoring), ``rg-limited`` (allowed under a rate limit), ``rg-route-N``
(routed to the N-th named upstream, in ``data-upstream``); a diff map's are
``rg-same``, ``rg-now-allowed``, ``rg-now-refused`` and ``rg-changed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath

import pycountry

from .. import iso3166
from ..clientip import PUBLIC, ClientAddress
from ..geo import GeoFacts
from ..policy import Decision, Policy, decide
from .worldmap import Country, Shade, render

PATH = "/v1/chat/completions"
# A public caller with no address: no CIDR rule can match it, so only places decide.
_CLIENT = ClientAddress(None, PUBLIC, "map", "")

POLICY_SHADES = (
    Shade("rg-allow", "#2f9e6b", "allowed"),
    Shade("rg-limited", "#9ccc65", "allowed, rate-limited"),
    Shade("rg-deny", "#d64545", "refused"),
    Shade("rg-monitor", "#f0a202", "let through only because of monitoring (would be refused)"),
)
# Upstreams get these in the order the policy names them; a ninth reuses the first.
ROUTE_FILLS = ("#3d7bd9", "#8e5bd0", "#1aa3a3", "#c2569b", "#5c6ac4", "#2b8cbe", "#7b6d8d", "#b5651d")
DIFF_SHADES = (
    Shade("rg-same", "#cfd6de", "no change"),
    Shade("rg-now-allowed", "#2f9e6b", "now allowed (was refused)"),
    Shade("rg-now-refused", "#d64545", "now refused (was allowed)"),
    Shade("rg-changed", "#3d7bd9", "treated otherwise (rule, upstream, limit or monitoring)"),
)


@dataclass(frozen=True, slots=True)
class Treatment:
    """What the policy does to callers of one place: the map's class, in words, and the deciding rule."""

    css: str
    words: str
    rule: str
    upstream: str | None


@dataclass(frozen=True, slots=True)
class PolicyMap:
    source: str
    sha256: str
    countries: dict[str, Treatment]
    carve_outs: tuple[str, ...]  # subdivisions treated otherwise than their country, in words
    not_shown: tuple[str, ...]  # rules whose conditions are not a place, in words

    def shades(self) -> list[Shade]:
        routes = sorted({t.css for t in self.countries.values() if t.css.startswith("rg-route-")}, key=_route_index)
        named = {t.css: t.upstream for t in self.countries.values()}
        extra = [
            Shade(css, ROUTE_FILLS[_route_index(css) % len(ROUTE_FILLS)], f"routed to {named[css]}") for css in routes
        ]
        return [*POLICY_SHADES, *extra]

    def svg(self, title: str | None = None) -> str:
        countries = {
            code: Country(t.css, f"{code} {country_name(code)}: {t.words} ({t.rule})", _data(t))
            for code, t in self.countries.items()
        }
        notes = [*self.carve_outs, *self.not_shown]
        # The file's name, not its path: a path of any length ran off the map's 1,600 px title line, and
        # where the file lay on the machine that drew the map is no part of what the policy does.
        name = PurePath(self.source).name or self.source
        heading = title or f"{name}: what the policy does to a caller from each country ({PATH})"
        return render(countries, self.shades(), heading, notes)


def _route_index(css: str) -> int:
    return int(css.rsplit("-", 1)[1])


def _data(t: Treatment) -> tuple[tuple[str, str], ...]:
    return (("rule", t.rule),) + ((("upstream", t.upstream),) if t.upstream else ())


def country_name(code: str) -> str:
    """The ISO short name ('Kosovo' for the vendors' XK); other labels (unknown, private) as they are."""
    found = pycountry.countries.get(alpha_2=code) if len(code) == 2 else None
    return "Kosovo" if code == "XK" else (str(found.name) if found is not None else code)


def treatment(policy: Policy, decision: Decision) -> Treatment:
    upstreams = list(policy.spec.upstreams)
    if decision.verdict == "deny":
        return Treatment("rg-deny", "refused", decision.rule, None)
    if decision.verdict == "monitor":
        return Treatment("rg-monitor", "would be refused; let through by monitoring", decision.rule, decision.upstream)
    if decision.verdict == "route" and decision.upstream in upstreams:
        i = upstreams.index(decision.upstream)
        return Treatment(f"rg-route-{i}", f"routed to {decision.upstream}", decision.rule, decision.upstream)
    if decision.limit is not None:
        lim = decision.limit
        words = f"allowed, at most {lim.requests} per {lim.per:g} s by {lim.by}"
        return Treatment("rg-limited", words, decision.rule, decision.upstream)
    return Treatment("rg-allow", "allowed", decision.rule, decision.upstream)


def _judge(policy: Policy, country: str, subdivisions: tuple[str, ...] = ()) -> Treatment:
    facts = GeoFacts(country=country, registered_country=country, subdivisions=subdivisions)
    return treatment(policy, decide(policy, _CLIENT, facts, PATH, None))


def _not_shown(policy: Policy) -> list[str]:
    out = []
    for rule in policy.rules:
        other = {k: v for k, v in rule.conditions().items() if k not in ("countries", "subdivisions")}
        if other:
            keys = "; ".join(
                f"{k}: {', '.join(map(str, v[:6]))}{' ...' if len(v) > 6 else ''}" for k, v in other.items()
            )
            mode = " (monitor only)" if rule.shadow else ""
            out.append(f"Not on the map: rule {rule.name!r}{mode} ({rule.action}) applies where {keys}.")
    return out


def _some(values: list[object], shown: int = 6) -> str:
    return ", ".join(map(str, values[:shown])) + (" ..." if len(values) > shown else "")


def policy_map(policy: Policy) -> PolicyMap:
    countries = {cc: _judge(policy, cc) for cc in sorted(iso3166.countries())}
    carve_outs = []
    named = sorted({s for r in policy.rules if r.subdivisions is not None for s in r.subdivisions})
    for sub in named:
        cc = sub.split("-")[0]
        inside, whole = _judge(policy, cc, (sub,)), countries.get(cc)
        if whole is None or inside.words != whole.words or inside.rule != whole.rule:
            carve_outs.append(
                f"{sub} ({country_name(cc)}): {inside.words} ({inside.rule}); the rest of {cc}: "
                f"{whole.words if whole else '-'} ({whole.rule if whole else '-'})"
            )
    return PolicyMap(policy.source, policy.sha256, countries, tuple(carve_outs), tuple(_not_shown(policy)))


def _allowed(t: Treatment) -> bool:
    return t.css != "rg-deny"


def diff_svg(old: Policy, new: Policy) -> str:
    """Each country by what the change does to it; the carve-outs of both policies listed."""
    a, b = policy_map(old), policy_map(new)
    countries = {}
    for code, before in a.countries.items():
        after = b.countries[code]
        if (before.words, before.rule) == (after.words, after.rule):
            css = "rg-same"
        elif _allowed(before) != _allowed(after):
            css = "rg-now-allowed" if _allowed(after) else "rg-now-refused"
        else:
            css = "rg-changed"
        title = f"{code} {country_name(code)}: {before.words} ({before.rule}) -> {after.words} ({after.rule})"
        countries[code] = Country(css, title, (("from", before.words), ("to", after.words)))
    notes = _diff_notes(a.carve_outs, b.carve_outs, "subdivision") + _diff_notes(a.not_shown, b.not_shown, "rule")
    title = f"{old.source} -> {new.source}: what changes for a caller from each country ({PATH})"
    return render(countries, DIFF_SHADES, title, notes)


def _diff_notes(old: Sequence[str], new: Sequence[str], what: str) -> list[str]:
    gone = [f"Before only: {n}" for n in old if n not in new]
    added = [f"After only: {n}" for n in new if n not in old]
    return gone + added
