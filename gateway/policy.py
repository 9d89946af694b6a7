"""The policy: what operators write, what it compiles to, and the decision.

Three layers, each plain:

* ``PolicySpec`` and friends are the YAML's schema (pydantic, ``extra=forbid``),
  which is also what ``policies/policy.schema.json`` is generated from.
* :func:`compile_policy` checks what a schema cannot (ISO codes, CIDRs,
  rules that can never match, rules that need a database that is not
  configured) and turns the rules into frozensets, CIDR range tables and
  precomputed :class:`Decision` objects.
* :func:`decide` is a pure function of (policy, client, facts, path): a short
  loop over compiled rules that allocates nothing unless a shadow rule fires.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails

from . import geo as geofacts
from . import iso3166
from .cidrs import CidrSet, parse_network
from .clientip import INVALID, MISSING, PRIVATE, AddressError, ClientAddress, IPAddress, classify, parse_address
from .geo import GeoFacts
from .requestpath import BadPath, canonical
from .shared.ratelimit import RateLimit, parse_period
from .yamlfile import Document, FileError, Problem
from .yamlfile import load as load_yaml
from .yamlfile import read as read_yaml

Action = Literal["allow", "deny", "monitor"]
RuleAction = Literal["allow", "deny", "monitor", "route"]
ALLOW, DENY, MONITOR, ROUTE = "allow", "deny", "monitor", "route"
DEFAULT_UPSTREAM = "default"

DEFAULT_UPSTREAM_URL = "https://api.openai.com"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NonEmpty = Field(min_length=1)


class Timeouts(_Spec):
    """Seconds. ``first_byte`` is generous because a non-streamed completion
    sends nothing until the model has finished; ``idle`` bounds the silence
    between chunks of a stream."""

    connect: Annotated[float, Field(gt=0)] = 5.0
    first_byte: Annotated[float, Field(gt=0)] = 300.0
    idle: Annotated[float, Field(gt=0)] = 60.0
    total: Annotated[float, Field(gt=0)] = 900.0


def check_upstream_url(v: str) -> str:
    """An upstream base URL without its trailing '/', or ValueError saying what is wrong."""
    from yarl import URL

    # Messages never repeat the URL: it may hold a password.
    try:
        u = URL(v)
        host = u.host
    except (ValueError, TypeError):
        raise ValueError("is not a URL (http://host[:port][/base])") from None
    authority = re.split(r"[/?#]", v.partition("://")[2], maxsplit=1)[0]
    if u.raw_user is not None or u.raw_password is not None or "@" in authority:
        raise ValueError(
            "must not contain credentials (user:password@): put the key in an environment variable "
            "and name that variable in the upstream's api_key_env"
        )
    if u.scheme not in ("http", "https") or not host:
        raise ValueError("must be an http:// or https:// URL with a host")
    if u.query_string or u.fragment:
        raise ValueError("must not carry a query or fragment")
    return v.rstrip("/")


UpstreamURL = Annotated[str, AfterValidator(check_upstream_url)]


class AuthSpec(_Spec):
    """How the upstream's key is presented: it replaces the client's ``Authorization`` and
    any header of this name that the client sent."""

    header: str = Field("Authorization", description="Header that carries the key (Azure-style APIs: api-key).")
    format: str = Field("Bearer {key}", description="The header's value; '{key}' (once) stands for the key.")

    @field_validator("header")
    @classmethod
    def _header(cls, v: str) -> str:
        if not v or not all(c in _TOKEN_CHARS for c in v):
            raise ValueError("must be an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)")
        if v.lower() in _NOT_AUTH_HEADERS:
            raise ValueError(f"{v!r} describes the message or the caller, it cannot carry a key")
        return v

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v.count("{key}") != 1:
            raise ValueError("must contain '{key}' exactly once, where the key goes (e.g. 'Bearer {key}')")
        if any(c in v for c in "\r\n\0"):
            raise ValueError("must be one line")
        return v


class HealthSpec(_Spec):
    """Passive health, per URL: this many failures in a row (connect error or timeout, 502,
    503, 504) and the URL is skipped for ``backoff``, doubled at each new ejection up to
    ``max_backoff``; it comes back by itself, and one success resets it."""

    failures: Annotated[int, Field(ge=1, le=10**6)] = 3
    backoff: str | Annotated[float, Field(gt=0)] = Field("1s", description="First ejection: 500ms, 1s, 1m, or seconds.")
    max_backoff: str | Annotated[float, Field(gt=0)] = Field(
        "60s", description="The longest ejection (when left out: 60s, or backoff if that is longer)."
    )

    @field_validator("backoff", "max_backoff")
    @classmethod
    def _duration(cls, v: str | float) -> str | float:
        parse_period(v)
        return v

    @property
    def backoff_seconds(self) -> float:
        return parse_period(self.backoff)

    @property
    def max_backoff_seconds(self) -> float:
        given = parse_period(self.max_backoff)
        return given if "max_backoff" in self.model_fields_set else max(given, self.backoff_seconds)


class UpstreamSpec(_Spec):
    """An OpenAI-compatible API. Requests keep their path and query and are
    appended to ``url`` (or to each of ``urls``, tried in order); they can
    never go to any other host."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["url"]}, {"required": ["urls"]}]})

    url: str | None = None
    urls: Annotated[list[UpstreamURL], NonEmpty] | None = Field(
        None, description="Several base URLs of one API, tried in order (instead of url)."
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the key that replaces the client's Authorization."
    )
    auth: AuthSpec = AuthSpec()
    models: dict[str, str] = Field({}, description="Model names renamed for this upstream (requested: sent).")
    fallback: list[str] = Field(
        [],
        description="Other upstreams tried in order (and their own fallbacks) when this one fails before "
        "its answer started: connect error or timeout, 502, 503, 504, or a region refusal.",
    )
    client_address: Literal["forward", "drop"] = Field(
        "forward",
        description="'drop' keeps the caller's address from this upstream: no X-Forwarded-For and no "
        "X-Regiongate-Client-IP.",
    )
    health: HealthSpec = HealthSpec()
    timeouts: Timeouts = Timeouts()

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else check_upstream_url(v)

    @property
    def all_urls(self) -> list[str]:
        return self.urls if self.urls is not None else [self.url] if self.url is not None else []


# RFC 9110 token characters: what a header name may be made of.
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_NOT_AUTH_HEADERS = frozenset(
    {
        "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade",
        "expect", "content-type", "x-forwarded-for", "forwarded", "x-regiongate-client-ip",
    }
)  # fmt: skip


class GeoSpec(_Spec):
    field: Literal["country", "registered_country"] = Field(
        "country", description="Which country rules and defaults look at."
    )


class Defaults(_Spec):
    action: Action = Field("deny", description="Public address with a country that no rule matched.")
    unknown: Action = Field("deny", description="Public address the geo data has no country for.")
    private: Action = Field("allow", description="Loopback, RFC 1918, link-local and ULA clients.")
    invalid: Action = Field("deny", description="The client address could not be read (malformed header).")
    missing: Action = Field(
        "deny",
        description="A trusted proxy named no client (no or empty forwarding header, or only trusted hops in it). "
        "Rules are consulted first, so a cidrs rule can allow a proxy's own health checks.",
    )


class Block(_Spec):
    """The refusal, shaped like OpenAI's own so that SDKs surface it properly."""

    status: Annotated[int, Field(ge=400, le=599)] = 403
    code: str = "unsupported_country_region_territory"
    message: str = "Country, region, or territory not supported"
    type: str = "request_forbidden"


AnonymizerFlag = Literal[
    "anonymous", "anonymous_vpn", "hosting_provider", "public_proxy", "residential_proxy", "tor_exit_node"
]


class RateLimitSpec(_Spec):
    """A budget for the requests this rule lets through, shared by every replica (with --redis)."""

    requests: Annotated[int, Field(gt=0, le=10**9)] = Field(description="Requests let through per period.")
    per: str | Annotated[float, Field(gt=0)] = Field(description="The period: 10s, 1m, 1h, 1d, or seconds.")
    by: Literal["ip", "api_key", "country", "subdivision", "asn"] = Field(
        "ip", description="Who shares one budget: each client address, bearer token, country, subdivision or ASN."
    )
    burst: Annotated[int, Field(gt=0, le=10**9)] | None = Field(
        None, description="How many may arrive at once; default: requests."
    )

    @field_validator("per")
    @classmethod
    def _per(cls, v: str | float) -> str | float:
        parse_period(v)
        return v


class RedisPolicy(_Spec):
    on_error: Literal["open", "closed"] = Field(
        "open",
        description="When the rate limiter cannot be asked (Redis down): 'open' lets the request through, "
        "'closed' answers 503.",
    )


class BodySpec(_Spec):
    """How much of a request the gateway reads to learn its model, and what it does when it cannot.

    The body is read only for a request whose decision needs the model (a
    rule with ``models``, ``allow_models``, or an upstream with a model map),
    only when it is ``application/json``, and only up to ``max_bytes``;
    anything else streams through untouched with its model unknown.
    """

    max_bytes: Annotated[int, Field(ge=1, le=64 * 1024 * 1024)] = Field(
        1024 * 1024, description="The most of a JSON body read to find its model; a larger one is streamed untouched."
    )
    unknown_model: Literal["deny", "allow"] = Field(
        "deny",
        description='A request whose model a rule needs but cannot be read (not JSON, too large, no "model" '
        "string). 'deny': the model conditions are taken the restrictive way (a deny rule's models match it, an "
        "allow or route rule's do not, allow_models refuses it). 'allow': the permissive way.",
    )


class RuleSpec(_Spec):
    """Keys in one rule AND together; values within one key OR together."""

    name: str | None = None
    countries: Annotated[list[str], NonEmpty] | None = None
    subdivisions: Annotated[list[str], NonEmpty] | None = None
    asns: Annotated[list[Annotated[int, Field(ge=0, lt=2**32)]], NonEmpty] | None = None
    anonymizer: Annotated[list[AnonymizerFlag], NonEmpty] | None = None
    cidrs: Annotated[list[str], NonEmpty] | None = None
    paths: Annotated[list[str], NonEmpty] | None = Field(
        None,
        description="Exact request paths (each also matches with one trailing '/'); a trailing '*' makes a "
        "prefix ('/v1/*'). Case-sensitive unless paths_case is 'insensitive'.",
    )
    models: Annotated[list[str], NonEmpty] | None = Field(
        None,
        description="The \"model\" of a JSON request body: exact names, or a prefix ending in '*' ('o1*'). "
        "The body is read only when a rule like this is reached.",
    )
    action: RuleAction = Field(description="allow, deny, monitor, or route (to the upstream named in 'upstream').")
    upstream: str | None = Field(None, description="For action: route, the upstream that serves these callers.")
    allow_models: Annotated[list[str], NonEmpty] | None = Field(
        None,
        description="On an allow or route rule: the only models these callers may use (exact or prefix*); any "
        "other gets OpenAI's 403 with code model_not_allowed_in_region.",
    )
    mode: Literal["enforce", "monitor"] = Field(
        "enforce", description="'monitor' shadows this rule: record when it matches, then carry on."
    )
    rate_limit: RateLimitSpec | None = Field(
        None, description="Requests this rule lets through are counted; over the limit they get OpenAI's 429."
    )


class PolicyTest(_Spec):
    ip: str
    path: str = "/v1/chat/completions"
    model: str | None = Field(None, description="The request body's model; left out: the model is unknown.")
    missing: bool = Field(
        False, description="Judge a request from trusted proxy 'ip' that named no client (defaults.missing)."
    )
    expect: RuleAction
    rule: str | None = Field(None, description="If given, the rule that must make the decision.")
    upstream: str | None = Field(None, description="If given, the upstream the request must go to.")


class PolicySpec(_Spec):
    version: Literal[1]
    revision: str | None = Field(
        None,
        description="Your own label for this edition of the policy (a date, a tag); shown in /readyz and "
        "regiongate_policy_info. The content hash stands in when it is absent.",
    )
    description: str | None = None
    metadata: dict[str, Any] | None = Field(None, description="Free-form: source, date taken, owner.")
    upstreams: dict[str, UpstreamSpec] = {}
    geo: GeoSpec = GeoSpec()
    defaults: Defaults = Defaults()
    mode: Literal["enforce", "monitor"] = "enforce"
    block: Block = Block()
    rules: list[RuleSpec] = []
    tests: list[PolicyTest] = []
    redis: RedisPolicy = RedisPolicy()
    body: BodySpec = BodySpec()
    paths_case: Literal["sensitive", "insensitive"] = Field(
        "sensitive",
        description="How rules' paths match: 'insensitive' also matches /V1/Files to /v1/files (as an "
        "upstream with case-insensitive routing, such as ASP.NET, serves it); use it with deny-lists of paths.",
    )


def json_schema() -> dict[str, Any]:
    """The policy's JSON Schema, for editors (``# yaml-language-server: $schema=...``)."""
    schema = PolicySpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Regiongate policy"
    return schema


# --- compiled form -----------------------------------------------------------------


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
    """

    verdict: str
    action: str
    rule: str
    reason: str
    upstream: str | None = DEFAULT_UPSTREAM
    shadow: tuple[str, ...] = ()
    limit: RateLimit | None = None  # the deciding rule's rate limit
    allow_models: Patterns | None = None
    model_refused: bool = False

    @property
    def allowed(self) -> bool:
        return self.verdict != DENY


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


class _Unread:
    """The model before the body was read: a rule that needs it stops the decision there."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNREAD"


UNREAD: Any = _Unread()
# What decide() returns when the first rule that could decide looks at the model and the body
# has not been read: the proxy reads it (bounded) and asks again with the model.
NEEDS_MODEL = Decision("needs_model", "needs_model", "needs_model", "the decision needs the request's model", None)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    line: int | None
    action: str
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


@dataclass(frozen=True, slots=True)
class Policy:
    spec: PolicySpec
    source: str
    sha256: str
    rules: tuple[Rule, ...]
    field: str
    on_default: Decision
    on_unknown: Decision
    on_private: Decision
    on_invalid: Decision
    on_missing: Decision
    block_body: bytes
    test_lines: tuple[int | None, ...]
    default_lines: dict[str, int | None] = dataclasses.field(default_factory=dict)
    unknown_model_allowed: bool = False  # body.unknown_model: allow

    @property
    def upstreams(self) -> dict[str, UpstreamSpec]:
        return self.spec.upstreams


def _decision(action: str, rule: str, reason: str, monitor_mode: bool, upstream: str | None = None) -> Decision:
    verdict = action
    if action == MONITOR or (action == DENY and monitor_mode):
        verdict = MONITOR
    return Decision(verdict, action, rule, reason, None if verdict == DENY else upstream or DEFAULT_UPSTREAM)


def _with_limit(decision: Decision, spec: RateLimitSpec | None) -> Decision:
    if spec is None or decision.action not in (ALLOW, ROUTE):
        return decision
    limit = RateLimit(decision.rule, spec.by, spec.requests, parse_period(spec.per), spec.burst or spec.requests)
    return dataclasses.replace(decision, limit=limit)


def decide(policy: Policy, client: ClientAddress, facts: GeoFacts, path: str, model: Any = UNREAD) -> Decision:
    """The decision for one request. Pure: no I/O, no clock, no globals.

    ``model`` is the request body's model: :data:`UNREAD` until the body was
    read (a rule that looks at the model then returns :data:`NEEDS_MODEL`,
    so that only requests that reach such a rule pay for reading it), ``None``
    when it is unknown (``body.unknown_model`` says which way that goes).
    The deciding rule's ``allow_models`` is :func:`model_refusal`'s.
    """
    kind = client.kind
    if kind == INVALID:
        return policy.on_invalid
    country = facts.country if policy.field == "country" else facts.registered_country
    shadow: list[str] | None = None
    ip = client.ip
    for rule in policy.rules:
        if rule.matches(ip, country, facts, path):
            if rule.models is not None:
                if model is UNREAD:
                    return NEEDS_MODEL
                if not rule.model_matches(model):
                    continue
            if not rule.shadow:
                decision = rule.decision
                break
            if shadow is None:
                shadow = []
            shadow.append(rule.name)
    else:
        if kind == MISSING:
            decision = policy.on_missing
        elif kind == PRIVATE:
            decision = policy.on_private
        elif country is None:
            decision = policy.on_unknown
        else:
            decision = policy.on_default
    if shadow:
        return dataclasses.replace(decision, shadow=tuple(shadow))
    return decision


def model_refusal(policy: Policy, decision: Decision, model: str | None) -> Decision | None:
    """The refusal for a model outside the deciding rule's ``allow_models``, else None. Pure.

    Under ``mode: monitor`` the refusal is recorded and not enforced, like
    any other denial.
    """
    allowed = decision.allow_models
    if allowed is None:
        return None
    if model is None:
        if policy.unknown_model_allowed:
            return None
        reason = f"rule {decision.rule!r}: the request's model could not be read and allow_models needs it"
    elif model in allowed:
        return None
    else:
        reason = f"rule {decision.rule!r}: model {model[:200]!r} is not in allow_models"
    refusal = _decision(DENY, decision.rule, reason, policy.spec.mode == "monitor", decision.upstream)
    return dataclasses.replace(refusal, model_refused=True, shadow=decision.shadow)


def decide_model(policy: Policy, client: ClientAddress, facts: GeoFacts, path: str, model: str | None) -> Decision:
    """The whole decision for a request whose model is known (or known to be unknown: None),
    ``allow_models`` included: what the proxy ends with once it has read the body."""
    decision = decide(policy, client, facts, path, model)
    return model_refusal(policy, decision, model) or decision


def request_path(path: str) -> str:
    """A path as rules see it: the canonical form the proxy judges and forwards.

    Raises :class:`requestpath.BadPath` for a path the proxy refuses with a
    400 before any policy is asked.
    """
    return canonical(path.encode("utf-8"))


def block_body(block: Block) -> bytes:
    import orjson

    return orjson.dumps({"error": {"message": block.message, "type": block.type, "param": None, "code": block.code}})


# --- loading and compiling -----------------------------------------------------------

_NEEDS = {
    "subdivisions": geofacts.SUBDIVISIONS,
    "asns": geofacts.ASN,
    "anonymizer": geofacts.ANONYMIZER,
}


def _fmt_loc(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_ASN_ERRORS = frozenset({"int_parsing", "int_type", "int_from_float", "greater_than_equal", "less_than"})
# pydantic's wording for the errors a policy can have, in plain words.
_PLAIN = {
    "greater_than_equal": "must be {ge} or more",
    "greater_than": "must be more than {gt}",
    "less_than_equal": "must be {le} or less",
    "less_than": "must be less than {lt}",
    "too_short": "must list at least one value (leave the key out to match anything)",
    "string_type": "must be text (put it in quotes)",
    "int_parsing": "must be a whole number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "list_type": "must be a list ([a, b] or one '- item' per line)",
    "dict_type": "must be a mapping (key: value)",
    "model_type": "must be a mapping (key: value)",
    "model_attributes_type": "must be a mapping (key: value)",
}


def plain_error(err: ErrorDetails) -> str:
    """One pydantic error in plain words, never repeating the value (it may be a secret)."""
    if err["type"] == "literal_error":
        return f"must be one of {err.get('ctx', {}).get('expected', '')}"
    if err["type"] == "value_error":
        return str(err.get("ctx", {}).get("error", err["msg"]))
    template = _PLAIN.get(err["type"])
    return template.format(**err.get("ctx", {})) if template else err["msg"]


def _validation_problems(doc: Document, err: ValidationError) -> list[Problem]:
    problems = []
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and (p.startswith("function-") or "[" in p))]
        where = _fmt_loc(loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key {loc[-1]!r}" if loc else "unknown key"
            where = _fmt_loc(loc[:-1])
        elif e["type"] == "missing":
            msg = f"missing required key {loc[-1]!r}" if loc else msg
            where = _fmt_loc(loc[:-1])
        elif e["type"] == "literal_error":
            msg = f"{e['input']!r} is not one of {e.get('ctx', {}).get('expected', '')}"
        elif e["type"] == "value_error":
            msg = str(e.get("ctx", {}).get("error", msg))
        elif "asns" in loc and e["type"] in _ASN_ERRORS:
            msg = f"{e['input']!r} is not an AS number: write a whole number from 0 to {2**32 - 1} (4837, not AS4837)"
        else:
            msg = plain_error(e)
        problems.append(Problem(doc.line_of(loc), f"{where}: {msg}" if where else msg))
    return problems


def load_policy(path: str, capabilities: frozenset[str] | None = None) -> Policy:
    """Read, validate and compile a policy file. Raises :class:`FileError`."""
    return parse_policy(read_yaml(path), path, capabilities)


def parse_policy(text: str, filename: str, capabilities: frozenset[str] | None = None) -> Policy:
    """Validate and compile policy text. ``capabilities`` are the geo facts the
    configured sources provide; ``None`` skips that check (schema-only use)."""
    doc = load_yaml(text, filename)
    if not isinstance(doc.data, dict):
        raise FileError(filename, [Problem(doc.line_of(()), "a policy must be a mapping at the top level")])
    try:
        spec = PolicySpec.model_validate(doc.data)
    except ValidationError as e:
        problems = _validation_problems(doc, e) + _salvaged_problems(doc, capabilities)
        raise FileError(filename, sorted(problems, key=lambda p: p.line or 0)) from None
    policy = compile_policy(spec, doc, capabilities)
    return dataclasses.replace(policy, sha256=hashlib.sha256(text.encode()).hexdigest())


def _salvaged_problems(doc: Document, capabilities: frozenset[str] | None) -> list[Problem]:
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
    problems += _rate_limit_problems(spec, doc)

    rules: list[Rule] = []
    names: dict[str, int] = {}
    for i, r in enumerate(spec.rules):
        here = ("rules", i)
        name = r.name or f"rule-{i + 1}"
        if name in names:
            bad((*here, "name"), f"rules[{i}]: duplicate rule name {name!r} (also rules[{names[name]}])")
        names[name] = i
        problems.extend(_rule_problems(i, r, doc, capabilities))
        nets = []
        for c in r.cidrs or ():
            with contextlib.suppress(ValueError):  # reported by _rule_problems
                nets.append(parse_network(c))
        desc = "; ".join(_describe(k, v) for k, v in _conditions(r).items()) or "matches everything"
        reason = f"rule {name!r}: {desc}"
        if r.upstream is not None and r.upstream != DEFAULT_UPSTREAM and r.upstream not in spec.upstreams:
            known = ", ".join(sorted({DEFAULT_UPSTREAM, *spec.upstreams}))
            bad((*here, "upstream"), f"rules[{i}] ({name}): no upstream named {r.upstream!r} (upstreams: {known})")
        decision = _decision(r.action, name, reason, monitor_mode, r.upstream)
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
                decision=_with_limit(decision, r.rate_limit),
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

    for later_i, later in enumerate(rules):
        for earlier in rules[:later_i]:
            if not earlier.shadow and _subsumes(earlier, later):
                bad(
                    ("rules", later_i),
                    f"rules[{later_i}] ({later.name}) can never match: rule {earlier.name!r} "
                    f"(line {earlier.line}) matches everything it does",
                )
                break

    for i, t in enumerate(spec.tests):
        problems.extend(_test_problems(i, t, names, doc))

    if problems:
        raise FileError(doc.filename, problems)

    d = spec.defaults
    return Policy(
        spec=spec,
        source=doc.filename,
        sha256="",
        rules=tuple(rules),
        field=spec.geo.field,
        on_default=_decision(d.action, "defaults.action", "no rule matched", monitor_mode),
        on_unknown=_decision(d.unknown, "defaults.unknown", "no country for this address", monitor_mode),
        on_private=_decision(d.private, "defaults.private", "private, loopback or link-local address", monitor_mode),
        on_invalid=_decision(d.invalid, "defaults.invalid", "client address could not be read", monitor_mode),
        on_missing=_decision(d.missing, "defaults.missing", "a trusted proxy sent no client address", monitor_mode),
        block_body=block_body(spec.block),
        test_lines=tuple(doc.line_of(("tests", i)) for i in range(len(spec.tests))),
        # Only where the file says it: a default left out has no line.
        default_lines={f"defaults.{k}": doc.lines.get(("defaults", k)) for k in type(d).model_fields},
        unknown_model_allowed=spec.body.unknown_model == "allow",
    )


def _rule_problems(i: int, r: RuleSpec, doc: Document, capabilities: frozenset[str] | None) -> list[Problem]:
    """What a schema cannot check in one rule. Run on every rule that has a usable
    shape even when other parts of the file do not, so that one pass reports it all."""
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
            parse_network(c)
        except ValueError as e:
            bad((*here, "cidrs", j), f"rules[{i}].cidrs: {c!r}: {e}")
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
    for key, fact in _NEEDS.items():
        if getattr(r, key) is not None and capabilities is not None and fact not in capabilities:
            bad(
                (*here, key),
                f"rules[{i}] ({name}) uses {key!r}, which needs {_DB_FOR[fact]}; none is configured (--geoip)",
            )
    return problems


def _rate_limit_problems(spec: PolicySpec, doc: Document) -> list[Problem]:
    """``rate_limit: {by: api_key}`` on a rule whose requests may reach an upstream that injects its own key.

    The budget is the caller's bearer token, and such an upstream never sees
    that token (``api_key_env`` replaces it), so a token made up per request
    is served with the operator's key on a fresh budget every time: the limit
    would limit nothing. The rule's upstream and every fallback after it
    count, since a failed-over request is served with the fallback's key.
    It can be allowed once the gateway issues its callers' keys itself.
    """
    problems = []
    for i, r in enumerate(spec.rules):
        if r.rate_limit is None or r.rate_limit.by != "api_key":
            continue
        if r.action == DENY and spec.mode != "monitor":  # refused, never served: no key is used
            continue
        injecting = [u for u in _reachable(r.upstream or DEFAULT_UPSTREAM, spec.upstreams) if u.api_key_env]
        if not injecting:
            continue
        name = r.name or f"rule-{i + 1}"
        problems.append(
            Problem(
                doc.line_of(("rules", i, "rate_limit", "by")),
                f"rules[{i}] ({name}): rate_limit by: api_key cannot limit these callers: their upstream sends "
                f"its own key ({injecting[0].api_key_env}) in place of theirs, so a made-up key per request would "
                "get a fresh budget. Limit by ip, country, subdivision or asn (by: api_key needs keys the gateway "
                "issues to its callers, which it does not yet)",
            )
        )
    return problems


def _reachable(name: str, upstreams: dict[str, UpstreamSpec]) -> list[UpstreamSpec]:
    """The upstream ``name`` and every fallback a request to it can reach, each once, in order."""
    out: list[UpstreamSpec] = []
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop(0)
        if current in seen or current not in upstreams:  # --upstream's default carries no key
            continue
        seen.add(current)
        out.append(upstreams[current])
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


# --- policy tests --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TestResult:
    index: int
    line: int | None
    test: PolicyTest
    decision: Decision
    facts: GeoFacts
    passed: bool
    problem: str | None


def judge_ip(
    policy: Policy, geo: geofacts.Geo, ip_text: str, path: str, missing: bool = False, model: str | None = None
) -> tuple[ClientAddress, GeoFacts, Decision]:
    """Decide for an address given as text, as ``explain`` and policy tests do.

    ``missing``: the address is a trusted proxy's that sent no client address.
    ``model``: the request body's model; None judges it as unknown.
    """
    try:
        ip = parse_address(ip_text)
    except AddressError as e:
        client = ClientAddress(None, INVALID, "argument", ip_text, str(e))
    else:
        if missing:
            client = ClientAddress(ip, MISSING, "argument", ip_text, "a trusted proxy that named no client")
        else:
            client = ClientAddress(ip, classify(ip), "argument", ip_text)
    public = client.ip is not None and client.kind not in (PRIVATE, MISSING)
    facts = geo.lookup(client.ip) if public else geofacts.NO_FACTS  # type: ignore[arg-type]
    return client, facts, decide_model(policy, client, facts, path, model)


def run_tests(policy: Policy, geo: geofacts.Geo) -> list[TestResult]:
    results = []
    for i, t in enumerate(policy.spec.tests):
        _client, facts, decision = judge_ip(policy, geo, t.ip, t.path, t.missing, t.model)
        problem = None
        if decision.verdict != t.expect:
            problem = f"expected {t.expect}, got {decision.verdict} ({decision.reason})"
        elif t.rule is not None and decision.rule != t.rule:
            problem = f"expected rule {t.rule!r}, got {decision.rule!r}"
        elif t.upstream is not None and decision.upstream != t.upstream:
            problem = f"expected upstream {t.upstream!r}, got {decision.upstream!r}"
        results.append(TestResult(i, policy.test_lines[i], t, decision, facts, problem is None, problem))
    return results
