"""The compiled policy: frozen, precomputed, and all that :func:`~.decide.decide` reads.

:func:`~.compile.compile_policy` builds these once per load: rules hold
frozensets, CIDR range tables and pattern sets, the policy holds the rules'
lookup tables (:mod:`.index`), and every outcome a rule or default can have
is a :class:`Decision` made in advance, so that deciding allocates nothing
unless a shadow rule fires.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from ..addresses import IPAddress
from ..cidrs import CidrSet
from ..geo import GeoFacts
from ..yamlfile import Problem
from .ratelimit import RateLimit
from .schema import DEFAULT_UPSTREAM, DENY, MONITOR, GeoField, PolicySpec, RuleAction, UpstreamSpec
from .tokenlimit import Budget

# What a decision says: a rule's action (or a default's); that the decision cannot
# be made before the request's model is read (NEEDS_MODEL); or, recorded by the proxy,
# that the request was refused before the policy was asked (bad method or path).
Verdict = Literal["allow", "deny", "monitor", "route", "needs_model", "rejected"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What the gateway does with one request, and why.

    ``verdict`` is what happens and the metrics label: ``allow``, ``deny``,
    ``route`` (let through to the rule's own upstream), or ``monitor`` (let
    through, but only because of monitoring: an ``action: monitor`` rule, or a
    denial under ``mode: monitor``). ``action`` is what the policy itself
    said. ``shadow`` names ``mode: monitor`` rules that matched on the way
    and were not enforced. ``allow_models`` is checked once the model is
    known (:func:`model_refusal`); ``model_refused`` marks the refusal that
    check makes, answered with OpenAI's model error rather than the block.
    Both are ``needs_model`` in :data:`NEEDS_MODEL`. ``budget`` is the
    deciding rule's token limits and concurrency (allow and route rules only);
    ``client_keys`` says the request must carry a key the gateway issued,
    because the rule or an upstream it may reach requires one.
    """

    verdict: Verdict
    action: Verdict
    rule: str
    reason: str
    upstream: str | None = DEFAULT_UPSTREAM
    shadow: tuple[str, ...] = ()
    limit: RateLimit | None = None  # the deciding rule's rate limit
    allow_models: Patterns | None = None
    model_refused: bool = False
    budget: Budget | None = None  # the deciding rule's token_limit and max_concurrent
    client_keys: bool = False  # a key the gateway issued is required (the rule's or a reachable upstream's)

    @property
    def allowed(self) -> bool:
        return self.verdict != DENY

    @property
    def needs_body(self) -> bool:
        """Whether the request path holds the JSON body before going on: for ``allow_models``, or for
        a budget that estimates tokens or counts by model. (:data:`NEEDS_MODEL` is the other case:
        the decision itself is not made yet.)"""
        return self.allow_models is not None or (self.budget is not None and self.budget.needs_body)


class Patterns:
    """Exact names and prefixes (a pattern ending in '*'): request paths, model names."""

    __slots__ = ("exact", "prefixes")

    def __init__(self, patterns: Sequence[str]) -> None:
        self.exact = frozenset(p for p in patterns if not p.endswith("*"))
        self.prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))

    def __contains__(self, path: str) -> bool:
        return path in self.exact or path.startswith(self.prefixes)

    def covers(self, other: Patterns) -> bool:
        return all(p in self for p in other.exact) and all(
            any(q.startswith(p) for p in self.prefixes) for q in other.prefixes
        )

    def listed(self) -> list[str]:
        return sorted(self.exact) + [p + "*" for p in self.prefixes]


class PathSet(Patterns):
    """Request paths (canonical, :mod:`.requestpath`): an exact path matches with or without one
    trailing '/', since upstream routers (Express, Spring, many others) serve ``/v1/files/`` as
    ``/v1/files``; with ``ignore_case`` (``paths_case: insensitive``) paths match in any case, as
    ASP.NET's routing does, so ``/V1/files`` cannot pass a ``/v1/files`` rule."""

    __slots__ = ("ignore_case",)

    def __init__(self, patterns: Sequence[str], ignore_case: bool = False) -> None:
        self.ignore_case = ignore_case
        folded = [p.lower() for p in patterns] if ignore_case else list(patterns)
        super().__init__([_without_trailing_slash(p) for p in folded])

    def __contains__(self, path: str) -> bool:
        if self.ignore_case:
            path = path.lower()
        return (
            path in self.exact
            or path.startswith(self.prefixes)
            or (path.endswith("/") and len(path) > 1 and path[:-1] in self.exact)
        )


def _without_trailing_slash(pattern: str) -> str:
    return pattern[:-1] if pattern.endswith("/") and len(pattern) > 1 else pattern


class Unread(enum.Enum):
    """The model before the body was read: a rule that needs it stops the decision there.

    A one-member enum rather than ``object()`` so that ``model is UNREAD`` narrows
    ``str | None | Unread`` to the model a rule can match.
    """

    UNREAD = "UNREAD"

    def __repr__(self) -> str:
        return "UNREAD"


UNREAD: Final = Unread.UNREAD
# What decide() returns when the first rule that could decide looks at the model and the body
# has not been read: the proxy reads it (bounded) and asks again with the model.
NEEDS_MODEL = Decision("needs_model", "needs_model", "needs_model", "the decision needs the request's model", None)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    line: int | None
    action: RuleAction
    shadow: bool
    countries: frozenset[str] | None
    subdivisions: frozenset[str] | None
    asns: frozenset[int] | None
    anonymizer: frozenset[str] | None
    cidrs: CidrSet | None
    paths: PathSet | None
    decision: Decision
    models: Patterns | None = None
    unknown_matches: bool = False  # what models says of a request whose model is unknown (body.unknown_model)

    def matches(self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str) -> bool:
        """Every key but ``models`` (which needs the body: :meth:`model_matches`)."""
        if self.countries is not None and country not in self.countries:
            return False
        if self.subdivisions is not None and self.subdivisions.isdisjoint(facts.subdivisions):
            return False
        if self.asns is not None and facts.asn not in self.asns:
            return False
        if self.anonymizer is not None and self.anonymizer.isdisjoint(facts.anonymizer):
            return False
        if self.cidrs is not None and (ip is None or ip not in self.cidrs):
            return False
        return self.paths is None or path in self.paths

    def model_matches(self, model: str | None) -> bool:
        if self.models is None:
            return True
        return self.unknown_matches if model is None else model in self.models

    def why(self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str) -> list[str]:
        """Which fact satisfied each condition, for ``explain`` (not on the request path)."""
        out = []
        if self.countries is not None:
            out.append(f"country {country} is in countries")
        if self.subdivisions is not None:
            out.append(
                f"subdivision {', '.join(sorted(self.subdivisions.intersection(facts.subdivisions)))} "
                "is in subdivisions"
            )
        if self.asns is not None:
            out.append(f"AS{facts.asn} is in asns")
        if self.anonymizer is not None:
            out.append(f"anonymizer {', '.join(sorted(self.anonymizer & facts.anonymizer))} is in anonymizer")
        if self.cidrs is not None and ip is not None:
            nets = [str(n) for n in self.cidrs.networks if ip in n]
            out.append(f"{ip} is in {', '.join(nets)}")
        if self.paths is not None:
            out.append(f"path {path} is in paths")
        return out or ["the rule has no conditions"]

    def conditions(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("countries", "subdivisions", "asns", "anonymizer"):
            value = getattr(self, key)
            if value is not None:
                out[key] = sorted(value)
        if self.cidrs is not None:
            out["cidrs"] = [str(n) for n in self.cidrs.networks]
        if self.paths is not None:
            out["paths"] = self.paths.listed()
        if self.models is not None:
            out["models"] = self.models.listed()
        return out


class RuleLookup(Protocol):
    """What :func:`~.decide.decide` asks of the rules' lookup tables (:class:`~.index.RuleIndex`):
    the position of the first rule a request matches, and of every one in order."""

    def first(
        self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: str | Unread | None
    ) -> int | None: ...

    def matching(
        self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: str | Unread | None
    ) -> Iterator[int]: ...


@dataclass(frozen=True, slots=True)
class Policy:
    spec: PolicySpec
    source: str
    sha256: str
    rules: tuple[Rule, ...]
    index: RuleLookup = dataclasses.field(compare=False, repr=False)  # the rules as lookup tables (.index)
    field: GeoField
    on_default: Decision
    on_unknown: Decision
    on_private: Decision
    on_invalid: Decision
    on_missing: Decision
    block_body: bytes
    test_lines: tuple[int | None, ...]
    default_lines: dict[str, int | None] = dataclasses.field(default_factory=dict)
    unknown_model_allowed: bool = False  # body.unknown_model: allow
    client_keys_required: frozenset[str] = frozenset()  # upstreams with client_keys: required
    # What regiongate check warns about: valid, loaded, but likely not what was meant (token limits
    # on paths whose usage cannot be read, on rules that never decide, smaller than a reservation).
    warnings: tuple[Problem, ...] = ()

    @property
    def upstreams(self) -> dict[str, UpstreamSpec]:
        return self.spec.upstreams


def make_decision(
    action: RuleAction, rule: str, reason: str, monitor_mode: bool, upstream: str | None = None
) -> Decision:
    """The decision a rule or default with ``action`` makes (``mode: monitor`` turns a deny into monitor)."""
    verdict: Verdict = action
    if action == MONITOR or (action == DENY and monitor_mode):
        verdict = MONITOR
    return Decision(verdict, action, rule, reason, None if verdict == DENY else upstream or DEFAULT_UPSTREAM)
