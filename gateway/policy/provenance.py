"""Where a policy's lists came from: the published page behind each rule, and its date.

A policy may say which provider's list it follows (``provider:``), where it was
read (``source:``, URLs) and on which day (``captured:``); a rule cites that
source (``source: policy``) or pages of its own. This module reads those keys
and nothing else: :func:`rule_sources` gives, for each compiled rule that cites
a source, the :class:`Provenance` the evidence report prints beside its
refusals; :func:`source_problems` finds what the schema cannot see alone (a
source with no date, a rule citing a policy source that is not there), each
with its line. All of it is pure: the age of a list against today's date is
:func:`age_days`, given the day by the caller.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from ..yamlfile import Document, Problem
from .compiled import Policy
from .schema import POLICY_SOURCE, PolicySpec


@dataclass(frozen=True, slots=True)
class Provenance:
    """The list behind a policy or a rule: who publishes it, the pages read, the day they were read."""

    provider: str | None
    urls: tuple[str, ...]
    captured: datetime.date

    def label(self) -> str:
        """One line for a report: ``Anthropic, captured 2026-12-03: https://...``."""
        who = f"{self.provider}, captured" if self.provider else "captured"
        return f"{who} {self.captured.isoformat()}: {', '.join(self.urls)}"


def policy_provenance(spec: PolicySpec) -> Provenance | None:
    """The policy's own ``provider:``/``source:``/``captured:``, or None when it declares none."""
    if spec.source is None or spec.captured is None:
        return None
    return Provenance(spec.provider, tuple(spec.source), spec.captured)


def rule_sources(policy: Policy) -> dict[str, Provenance]:
    """Compiled rule name -> the list behind it, for the rules that cite one (``source:``).

    The names are those decisions, audit entries and counts carry (``name:`` or ``rule-N``).
    A rule's own URLs are dated by the policy's ``captured:``: one file, one day of reading.
    """
    own = policy_provenance(policy.spec)
    out: dict[str, Provenance] = {}
    if own is None:  # source_problems refuses a rule source without the policy's date
        return out
    for i, rule in enumerate(policy.spec.rules):
        if rule.source is None:
            continue
        cited = own if rule.source == [POLICY_SOURCE] else Provenance(own.provider, tuple(rule.source), own.captured)
        out[rule_name(rule.name, i)] = cited
    return out


def rule_name(name: str | None, index: int) -> str:
    """The name a rule is known by once compiled: its ``name:``, or ``rule-N`` (1-based) as compile names it."""
    return name or f"rule-{index + 1}"


def source_problems(spec: PolicySpec, doc: Document) -> list[Problem]:
    """What the source keys say that cannot stand: each needs the others it relies on."""
    problems = []

    def bad(path: tuple[str | int, ...], message: str) -> None:
        problems.append(Problem(doc.line_of(path), message))

    if spec.source is not None and spec.captured is None:
        bad(("source",), "source: needs captured: YYYY-MM-DD, the day the list was read (a source with no date)")
    if spec.captured is not None and spec.source is None:
        bad(("captured",), "captured: needs source:, the URL(s) the list was read from (a date of nothing)")
    if spec.provider is not None and spec.source is None:
        bad(("provider",), "provider: needs source:, the URL(s) of the provider's published list")
    for i, rule in enumerate(spec.rules):
        if rule.source is None:
            continue
        name = rule_name(rule.name, i)
        if rule.source == [POLICY_SOURCE] and spec.source is None:
            bad(
                ("rules", i, "source"),
                f"rules[{i}] ({name}): source: policy cites the policy's source:, which this policy does not have",
            )
        elif rule.source != [POLICY_SOURCE] and spec.captured is None and spec.source is not None:
            continue  # reported once, at the policy's source:
        elif rule.source != [POLICY_SOURCE] and spec.captured is None:
            bad(
                ("rules", i, "source"),
                f"rules[{i}] ({name}): a rule's source URLs are dated by the policy's captured: YYYY-MM-DD, "
                "which this policy does not have",
            )
    return problems


def age_days(captured: datetime.date, today: datetime.date) -> int:
    """Whole days from the capture to ``today`` (negative for a date still to come)."""
    return (today - captured).days
