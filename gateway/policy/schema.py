"""The policy file's schema: what operators write, and nothing it compiles to.

``PolicySpec`` and the models under it are pydantic, frozen and
``extra=forbid``, so a misspelt key is an error rather than a rule that
silently matches nothing. ``policies/policy.schema.json`` is generated from
them (:func:`json_schema`). What a schema cannot check (ISO codes, CIDRs,
unreachable rules, databases that are not configured) is :mod:`.compile`'s.
"""

from __future__ import annotations

import datetime
import re
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)

from .ratelimit import DURATION_PATTERN, parse_period

Action = Literal["allow", "deny", "monitor"]  # what a default may say
RuleAction = Literal["allow", "deny", "monitor", "route"]  # what a rule may say
ALLOW: Final = "allow"
DENY: Final = "deny"
MONITOR: Final = "monitor"
ROUTE: Final = "route"
DEFAULT_UPSTREAM = "default"
GeoField = Literal["country", "registered_country"]

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


ClientKeys = Literal["required", "off"]


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
    client_keys: ClientKeys = Field(
        "off",
        description="'required': every request that may reach this upstream (as a fallback too) must carry a "
        "key the gateway issued (regiongate keys add); a missing or unknown one gets OpenAI's 401 invalid_api_key.",
    )

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


# --- where a published list came from (policy-level provider/source/captured, a rule's source) --------

POLICY_SOURCE: Final = "policy"  # a rule's ``source: policy``: the policy's own source and date
MAX_SOURCES = 20  # URLs per source: key; a shipped list cites 1 to 7


def check_source_url(v: str) -> str:
    """A page a list was read from: an absolute http(s) URL with a host, or ValueError saying what is wrong."""
    from yarl import URL

    if not v or any(c.isspace() for c in v) or not v.isprintable():
        raise ValueError("must be a URL without spaces (https://host/path)")
    try:
        u = URL(v)
        host = u.host
    except (ValueError, TypeError):
        raise ValueError("is not a URL (https://host/path)") from None
    if u.scheme not in ("http", "https") or not host or not u.is_absolute():
        raise ValueError("must be an https:// (or http://) URL with a host")
    if u.raw_user is not None or u.raw_password is not None:
        raise ValueError("must not contain credentials (user:password@)")
    return v


def _one_line(v: str) -> str:
    if not v.isprintable() or v != v.strip():
        raise ValueError("must be one line of text, without leading or trailing spaces")
    return v


def _rule_source_item(v: str) -> str:
    return v if v == POLICY_SOURCE else check_source_url(v)


def _one_or_many(v: object) -> object:
    """``source: URL`` is ``source: [URL]``: a list of one."""
    return [v] if isinstance(v, str) else v


def _only_policy_alone(v: list[str]) -> list[str]:
    if POLICY_SOURCE in v and len(v) > 1:
        raise ValueError("'policy' stands alone: write source: policy, or list URLs")
    return v


def _date(v: object) -> object:
    """``2026-12-03`` (YAML reads it as a date) or ``"2026-12-03"``; nothing vaguer, nothing finer."""
    if isinstance(v, datetime.datetime):  # a subclass of date: a time of day says more than was measured
        raise ValueError("must be a date without a time, written YYYY-MM-DD (e.g. 2026-12-03)")
    if isinstance(v, datetime.date):
        return v
    if isinstance(v, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
        try:
            return datetime.date.fromisoformat(v)
        except ValueError:
            raise ValueError(f"{v} is not a day of the calendar") from None
    raise ValueError("must be a date written YYYY-MM-DD (e.g. 2026-12-03)")


_URL_SCHEMA = {"type": "string", "pattern": "^https?://[^\\s]+$"}
_URLS = Annotated[list[Annotated[str, AfterValidator(check_source_url)]], Field(min_length=1, max_length=MAX_SOURCES)]
PolicySources = Annotated[
    _URLS,
    BeforeValidator(_one_or_many),
    WithJsonSchema({"anyOf": [_URL_SCHEMA, {"type": "array", "items": _URL_SCHEMA, "minItems": 1}]}),
]
RuleSources = Annotated[
    list[Annotated[str, AfterValidator(_rule_source_item)]],
    Field(min_length=1, max_length=MAX_SOURCES),
    AfterValidator(_only_policy_alone),
    BeforeValidator(_one_or_many),
    WithJsonSchema(
        {
            "anyOf": [
                {"const": POLICY_SOURCE},
                _URL_SCHEMA,
                {"type": "array", "items": _URL_SCHEMA, "minItems": 1},
            ]
        }
    ),
]
Captured = Annotated[
    datetime.date,
    BeforeValidator(_date),
    WithJsonSchema({"type": "string", "format": "date", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"}),
]


class GeoSpec(_Spec):
    field: GeoField = Field("country", description="Which country rules and defaults look at.")


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


# --- token budgets and concurrency (a rule's token_limit, max_concurrent, token_reserve) -------------

TOKEN_BY: Final = ("ip", "api_key", "country", "subdivision", "asn", "model", "rule")
MAX_TOKENS = 10**12  # per limit: far above any month of any provider's tier, and exact in a double (Lua)
MAX_TOKEN_PERIOD = 366 * 86400.0  # a year: the longest quota window that makes sense
MIN_TOKEN_PERIOD = 1.0  # a second: shorter windows than one request takes limit nothing
MAX_STREAMS = 10**6
MAX_RESERVE = 10**9
MAX_TOKEN_LIMITS = 16  # entries per rule: each is one more key a request reserves in


def _by_list(v: object) -> object:
    """``by: api_key`` is ``by: [api_key]``: a list of one."""
    if v == []:
        raise ValueError(f"must name at least one of {', '.join(TOKEN_BY)}")
    return [v] if isinstance(v, str) else v


def _no_repeats(v: list[str]) -> list[str]:
    for i, item in enumerate(v):
        if item in v[:i]:
            raise ValueError(f"lists {item!r} twice: each key counts once in the subject")
    return v


_BY_ITEM = {"enum": list(TOKEN_BY)}
TokenBySpec = Annotated[
    list[Literal["ip", "api_key", "country", "subdivision", "asn", "model", "rule"]],
    Field(min_length=1, max_length=len(TOKEN_BY)),
    AfterValidator(_no_repeats),
    BeforeValidator(_by_list),
    WithJsonSchema(
        {
            "anyOf": [
                _BY_ITEM,
                {"type": "array", "items": _BY_ITEM, "minItems": 1, "maxItems": len(TOKEN_BY), "uniqueItems": True},
            ]
        }
    ),
]
_BY_HELP = (
    "Who shares one budget: one of ip, api_key, country, subdivision, asn, model, rule, or a list of them "
    "that make one composite subject ([country, model]: a budget per country per model). api_key is the "
    "client key's name when client keys are required, else the bearer token's keyed hash; rule: one budget "
    "for everyone the rule lets through."
)


class TokenLimitSpec(_Spec):
    """One budget of tokens: ``tokens`` per ``per``, counted as ``count``, one per subject (``by``)."""

    tokens: Annotated[int, Field(gt=0, le=MAX_TOKENS)] = Field(description="Tokens per period.")
    per: Annotated[
        str | Annotated[float, Field(ge=MIN_TOKEN_PERIOD, le=MAX_TOKEN_PERIOD)],
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "pattern": DURATION_PATTERN},
                    {"type": "number", "minimum": MIN_TOKEN_PERIOD, "maximum": MAX_TOKEN_PERIOD},
                ]
            }
        ),
    ] = Field(
        description="The period: 1m, 1h, 1d, 30d, or seconds (1s to 366d). A quota's windows are aligned to "
        "the Unix epoch (1d: from 00:00 UTC)."
    )
    by: TokenBySpec = Field(description=_BY_HELP)
    count: Literal["input", "output", "total"] = Field(
        "total",
        description="Which tokens are spent: input (prompt, cached included), output (completion, reasoning "
        "included), or total (both), as the provider reports them.",
    )
    kind: Literal["rate", "quota"] = Field(
        "rate",
        description="'rate': refills steadily (GCRA); over it, OpenAI's 429 rate_limit_exceeded with retry-after. "
        "'quota': a budget that empties and is whole again when its window ends; over it, 429 insufficient_quota, "
        "which SDKs do not retry.",
    )
    burst: Annotated[int, Field(gt=0, le=MAX_TOKENS)] | None = Field(
        None, description="kind: rate only: the most tokens that may be spent at once; default: tokens."
    )

    @field_validator("per", mode="before")
    @classmethod
    def _per(cls, v: object) -> object:
        # Before the union is tried, so that a bad period gets one message, not one per type.
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise ValueError("must be a duration (1m, 1h, 1d, 30d) or seconds")
        seconds = parse_period(v)
        if not MIN_TOKEN_PERIOD <= seconds <= MAX_TOKEN_PERIOD:
            raise ValueError("must be from 1s to 366d")
        return v

    @property
    def seconds(self) -> float:
        return parse_period(self.per)


class ConcurrencySpec(_Spec):
    """Requests in flight (streams included), counted across replicas; each is released when its answer
    ends, fails or its client leaves, and one a crashed replica held expires by itself."""

    streams: Annotated[int, Field(gt=0, le=MAX_STREAMS)] = Field(description="The most requests in flight per subject.")
    by: TokenBySpec = Field(description=_BY_HELP)


class TokenReserveSpec(_Spec):
    """What a request reserves before it is forwarded, where the request does not say."""

    output: Annotated[int, Field(gt=0, le=MAX_RESERVE)] = Field(
        4096,
        description="Output tokens reserved for a request that names no max_tokens (max_completion_tokens, "
        "max_output_tokens); replaced by the provider's count when the answer ends.",
    )
    unreadable: Annotated[int, Field(gt=0, le=MAX_RESERVE)] = Field(
        8192,
        description="Tokens reserved, and charged unless the provider reports usage, for a body that cannot be "
        "read (not JSON, larger than body.max_bytes).",
    )


class RedisPolicy(_Spec):
    on_error: Literal["open", "closed"] = Field(
        "open",
        description="When a rate limit, token limit or max_concurrent cannot be asked (Redis down or slow): "
        "'open' lets the request through, 'closed' answers 503. Every such fallback is counted.",
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
    token_limit: Annotated[list[TokenLimitSpec], Field(min_length=1, max_length=MAX_TOKEN_LIMITS)] | None = Field(
        None,
        description="On an allow or route rule: token budgets for what it lets through. Each request reserves its "
        "estimated input plus its output cap in every one before it is forwarded (all or none), and the "
        "reservation is replaced by the provider's usage when the answer ends.",
    )
    max_concurrent: ConcurrencySpec | None = Field(
        None, description="On an allow or route rule: the most requests in flight at once per subject."
    )
    token_reserve: TokenReserveSpec | None = Field(
        None, description="With token_limit: what a request reserves where it does not say (defaults 4096, 8192)."
    )
    client_keys: ClientKeys = Field(
        "off",
        description="'required': the requests this rule lets through must carry a key the gateway issued "
        "(regiongate keys add); a missing or unknown one gets OpenAI's 401 invalid_api_key.",
    )
    source: RuleSources | None = Field(
        None,
        description="The published list behind this rule, for the evidence report: 'policy' (the policy's "
        "source: and captured:) or one URL or a list of URLs of its own (dated by the policy's captured:).",
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
    metadata: dict[str, Any] | None = Field(None, description="Free-form: owner, ticket, anything of your own.")
    provider: Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_one_line)] | None = Field(
        None, description="Who publishes the list this policy follows (Anthropic, OpenAI, OFAC); needs source:."
    )
    source: PolicySources | None = Field(
        None, description="Where the list was read: one URL or a list of URLs; needs captured:."
    )
    captured: Captured | None = Field(
        None,
        description="The day the list at source: was read, written YYYY-MM-DD; regiongate check --max-age "
        "warns when it is older than that.",
    )
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
