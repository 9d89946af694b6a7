"""The report models: one per record, what ``--json`` prints, the admin API returns and its OpenAPI document describes.

Each record the operator tools produce (an explain report and its trace, an
override as shown, a policy diff, a replay, a reload result, the file
watcher's health, readiness) exists once, here, as a frozen pydantic model whose field
order is the order of its JSON keys. The code that builds a record
(:mod:`gateway.explain`, :mod:`gateway.trace`, :mod:`gateway.diff`,
:mod:`gateway.live.reload`, :mod:`gateway.runtime`) fills the model from its
own frozen dataclasses; ``regiongate ... --json`` prints :func:`dump` of it,
and the admin API (:mod:`gateway.control.schemas` re-exports these) declares
it as its response model, so the two can never drift apart.

The models live in this neutral module, not in :mod:`gateway.control`,
because the decision side builds them and may not import the control plane;
and not each beside its builder, because the control plane would then import
every decision module to describe its answers. This module imports nothing
from ``gateway``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Report(BaseModel):
    """A record as JSON: frozen, keys in field order, ``from`` spelled ``from_`` in Python."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)


def dump(report: Report) -> dict[str, Any]:
    """The record as the JSON object ``--json`` prints and the admin API returns (keys in field order)."""
    return report.model_dump(by_alias=True, exclude_unset=True)


# --- trace (explain --trace) --------------------------------------------------------------


class KeyCheckOut(Report):
    key: str
    matched: bool
    detail: str


class RuleStepOut(Report):
    index: int
    name: str
    line: int | None
    action: str
    mode: str
    matched: bool
    reached: bool
    checks: list[KeyCheckOut]


class DecisionOut(Report):
    verdict: str
    action: str
    rule: str
    reason: str
    shadow: list[str]


class TraceOut(Report):
    client_kind: str
    address: str | None
    path: str
    geo_field: str
    country: str | None
    rules_consulted: bool
    rules: list[RuleStepOut]
    default: str | None
    decision: DecisionOut


# --- explain ------------------------------------------------------------------------------


class OverrideOut(Report):
    id: str
    action: str
    kind: str = Field(description="api_key, cidr, subdivision or country")
    value: str = Field(description="The block or code; for api_key 'hmac-sha256:' and the hash's first 16 hex digits.")
    reason: str
    by: str
    created_at: float
    expires_at: float | None
    rule: str = Field(description="The rule name its decisions carry: override:<id>.")


class RecordOut(Report):
    database_type: str
    path: str
    found: bool
    network: str | None
    fields: dict[str, Any]
    error: str | None


class TokenLimitOut(Report):
    index: int = Field(description="Its place in the rule's token_limit list (part of its budget's key).")
    tokens: int
    per: float = Field(description="Seconds.")
    by: list[str] = Field(description="The keys whose values make one subject, in order.")
    count: str = Field(description="input, output or total.")
    kind: str = Field(description="rate (refills steadily) or quota (empties; whole again when its window ends).")
    burst: int | None = Field(None, description="kind: rate: the most tokens spent at once (default: tokens).")
    reserves: int | None = Field(
        None, description="What the request given (body, max_tokens) reserves here before it is forwarded."
    )
    fits: bool | None = Field(
        None, description="Whether that reservation can ever fit (false: refused with a 429 that is not retried)."
    )


class ConcurrencyOut(Report):
    streams: int
    by: list[str]


class TokenReserveOut(Report):
    output: int = Field(description="Output tokens reserved for a request that names no max_tokens.")
    unreadable: int = Field(description="Tokens reserved under every limit for a body that cannot be read.")


class ReservationOut(Report):
    """What the request given to explain would reserve: its input estimate plus its output cap."""

    readable: bool = Field(description="false: the body is not a JSON object (or too large): the unreadable reserve.")
    input: int | None = Field(
        description="Estimated input tokens of the body (bytes per token for the model's family); null: no body given."
    )
    output: int = Field(description="Output tokens reserved: the request's max_tokens, else token_reserve.output.")
    output_from: str = Field(
        description="max_tokens (the body's, or the one given to explain), token_reserve.output or unreadable."
    )
    estimate_model: str | None = Field(None, description="The model whose bytes-per-token ratio made the estimate.")


class ExplainOut(Report):
    """What ``regiongate explain --json`` prints and ``GET /admin/explain`` returns (with ``trace``).

    The keys after ``geo`` are there only when they apply: ``override`` when a
    runtime override decides, ``rate_limit``, ``allow_models``, ``client_keys``,
    ``token_limit``, ``max_concurrent`` and ``token_reserve`` when the deciding
    rule has them (with ``redis_on_error``), ``reservation`` when a body or
    max_tokens was given to a rule with token limits, ``trace`` when asked for.
    """

    ip: str
    normalized: str | None
    kind: str
    problem: str | None
    path: str
    model: str | None = Field(None, description="The model judged (query 'model'); null: judged as unknown.")
    decision: str
    action: str
    rule: str
    rule_line: int | None
    rule_conditions: dict[str, Any] | None
    reason: str
    why: list[str]
    shadow: list[str]
    upstream: str | None = Field(None, description="Where the request would go (null when refused).")
    status: int | None
    facts: dict[str, Any]
    records: list[RecordOut]
    policy: dict[str, Any]
    geo: list[dict[str, Any]]
    override: OverrideOut | None = Field(None, description="The runtime override that decides, before any rule.")
    rate_limit: dict[str, Any] | None = Field(
        None, description="The deciding rule's rate_limit (per: seconds); a request within it goes on."
    )
    allow_models: list[str] | None = Field(None, description="The deciding rule's allow_models.")
    client_keys: str | None = Field(
        None,
        description="'required': the request must carry a key the gateway issued (the rule or an upstream it may "
        "reach requires one), else OpenAI's 401 invalid_api_key.",
    )
    token_limit: list[TokenLimitOut] | None = Field(None, description="The deciding rule's token limits, in order.")
    max_concurrent: ConcurrencyOut | None = Field(None, description="The deciding rule's max_concurrent.")
    token_reserve: TokenReserveOut | None = Field(
        None, description="What a request reserves where it does not say (the rule's token_reserve or the defaults)."
    )
    redis_on_error: str | None = Field(
        None,
        description="The policy's redis.on_error, shown with the rule's rate_limit, token_limit or max_concurrent: "
        "what each of them does while Redis cannot be asked (open: let through; closed: 503), every time counted.",
    )
    reservation: ReservationOut | None = Field(
        None, description="What the request given (query max_tokens; the CLI's --body) reserves before it is forwarded."
    )
    trace: TraceOut | None = Field(None, description="Every rule in order (explain --trace; always in the admin API).")


# --- diff and replay ------------------------------------------------------------------------


class Verdict(Report):
    decision: str
    rule: str


class ChangeOut(Report):
    kind: str = Field(description="country, subdivision, client, asn, anonymizer or cidr")
    subject: str
    from_: Verdict = Field(alias="from")
    to: Verdict
    countries: list[str] | None = Field(description="Countries it happens with; null: every one probed.")
    addresses: list[str] | None = Field(description="CIDR addresses it happens at; null: every one probed.")
    paths: list[str] | None = Field(description="Paths it happens on; null: every one probed.")


class SettingOut(Report):
    key: str
    from_: Any = Field(alias="from")
    to: Any


class PolicyRef(Report):
    path: str
    sha256: str


class Summary(Report):
    changes: int
    transitions: dict[str, int]


class CandidateTests(Report):
    passed: int
    failed: list[str]


class DiffOut(Report):
    old: PolicyRef
    new: PolicyRef
    changed: bool
    probes: int
    changes: list[ChangeOut]
    rule_changes: list[ChangeOut]
    settings: list[SettingOut]
    summary: Summary
    candidate_tests: CandidateTests | None = Field(
        None, description="The candidate's own tests (the admin API only: the CLI's diff does not run them)."
    )
    replay: ReplayOut | None = Field(None, description="diff --replay only (the CLI): recorded requests that flip.")


class ReplaySkipped(Report):
    redacted: int
    unreadable: int


class CountryFlips(Report):
    country: str
    flips: int


class RuleFlips(Report):
    rules: str
    flips: int


class FlipOut(Report):
    line: int
    client: str
    path: str
    country: str
    from_: Verdict = Field(alias="from")
    to: Verdict


class ReplayOut(Report):
    lines: int
    replayed: int
    skipped: ReplaySkipped
    flipped: int
    transitions: dict[str, int]
    top_countries: list[CountryFlips]
    top_rules: list[RuleFlips]
    examples: list[FlipOut]


# --- reload and the file watcher ------------------------------------------------------------


class PolicyFileResult(Report):
    ok: bool
    changed: bool
    path: str
    sha256: str
    version: str
    error: str | None
    candidate_sha256: str | None


class WatcherOut(Report):
    enabled: bool
    running: bool
    restarts: int
    last_error: str | None
    failed_at: float | None


# --- readiness (/readyz) --------------------------------------------------------------------


class ReloadStatusOut(Report):
    attempted_at: float | None = Field(description="When the file was last read, in epoch seconds; null: never.")
    error: str | None = Field(description="Why the candidate on disk was refused; the previous one serves.")


class PolicyInForce(Report):
    path: str
    sha256: str
    version: str
    loaded_at: float
    rules: int
    mode: str
    reload: ReloadStatusOut


class ShadowInForce(Report):
    path: str
    sha256: str
    version: str
    loaded_at: float
    reload: ReloadStatusOut


class AuditCounts(Report):
    mode: str
    dropped: int
    written: int


class ClientKeyOut(Report):
    """One client key as ``keys list`` and ``GET /admin/keys`` show it: never its token or hash."""

    id: str = Field(description="ck_ and 16 hex digits: what `keys revoke` and DELETE /admin/keys/{id} take.")
    name: str = Field(description="What budgets, rate limits, overrides, logs and the audit stream call the caller.")
    state: str = Field(description="active, expired or revoked")
    created: float = Field(description="Seconds since the epoch.")
    expires: float | None = Field(description="Seconds since the epoch; null: never.")
    revoked: float | None = Field(description="When it was revoked; null: it was not.")
    meta: dict[str, str] = Field(description="Labels given when it was issued.")


class ReadyOut(Report):
    """What ``/readyz`` answers (200 when ``ready``, else 503)."""

    ready: bool
    pid: int
    policy: PolicyInForce
    shadow_policy: ShadowInForce | None
    geo: list[dict[str, Any]] = Field(description="Each GeoIP source; age_seconds for a file.")
    geo_stale: bool
    watcher: WatcherOut
    embedded_geo: bool
    upstreams: dict[str, Any]
    trusted_proxies: list[str]
    client_ip_header: str
    overrides: dict[str, Any] = Field(description="The override store: backend, and for Redis its state.")
    client_keys: dict[str, Any] = Field(
        description="The client key store: backend (off, file, redis) and keys by state; never a name, token or hash."
    )
    audit: AuditCounts
    warnings: list[str]


# --- shipped policies (regiongate policies) -----------------------------------------------


class ShippedPolicyOut(Report):
    """One policy shipped with Regiongate, and the published list it follows (``regiongate policies``)."""

    file: str = Field(description="Its path under the shipped policies directory (examples/ for examples).")
    path: str = Field(description="Where it is on this machine: what --policy takes.")
    description: str | None
    provider: str | None = Field(description="Who publishes the list it follows (provider:).")
    source: list[str] = Field(description="Where the list was read (source:); empty for a policy with no list.")
    captured: str | None = Field(description="The day it was read, YYYY-MM-DD (captured:).")
    age_days: int | None = Field(description="Days from captured to today.")
    rules: int


# --- evidence report (regiongate report) ----------------------------------------------------


class PeriodOut(Report):
    since: str
    until: str


class GatewayOut(Report):
    chain: str = Field(description="host/pid/start-ms: one per gateway worker process")
    host: str | None
    pid: int | None
    version: str | None
    audit: str | None = Field(description="The gateway's --audit mode: refusals or all")
    first: str
    last: str
    stopped: bool = Field(description="Its stop entry is in the period: it shut down cleanly")


class CountOut(Report):
    key: str
    n: int


class PolicyLoadOut(Report):
    time: str
    chain: str
    trigger: str
    path: str


class RuleSourceOut(Report):
    rule: str
    provider: str | None
    urls: list[str]
    captured: str | None = Field(description="The day the published list was read (the policy's captured:)")


class PolicyVersionOut(Report):
    sha256: str
    role: str = Field(description="policy or shadow")
    version: str
    first_loaded: str
    replaced_at: str | None = Field(description="When the next version of this role was first loaded; null: none was")
    loads: list[PolicyLoadOut]
    on_error: str | None = Field(description="The policy's redis.on_error: open or closed; null: text not stored")
    text: str | None = Field(description="The full policy text as loaded; null: not in the evidence")
    refused_by: list[CountOut] = Field(description="Refusals recorded one by one under this version, by rule")
    sources: list[RuleSourceOut] = Field(description="The published list and date behind each rule that cites one")


class CountryOut(Report):
    country: str = Field(description="ISO code, or unknown, invalid, missing, private")
    name: str
    allowed: int
    refused: int
    monitored: int = Field(description="Let through only because of monitoring: would have been refused")


class GeoipOut(Report):
    path: str
    type: str
    build: str | None
    sha256: str
    loaded: str
    age_days: float | None = Field(description="The database's age at the period's end, from its build date")


class OverrideEventOut(Report):
    time: str
    action: str
    id: str
    override: str
    match: str
    value: str
    by: str
    reason: str
    ttl: int | None


class GapOut(Report):
    chain: str
    from_: str = Field(alias="from")
    to: str
    lost: int
    reasons: dict[str, int]


class FailModeOut(Report):
    from_: str = Field(alias="from")
    to: str
    chain: str
    what: str
    effect: str


class ChainCheckOut(Report):
    chain: str
    ok: bool
    entries: int
    first_seq: int
    last_seq: int
    problems: list[str]
    notices: list[str]


class VerificationOut(Report):
    checked: bool = Field(description="false: no key was given, the MACs were not checked")
    ok: bool
    chains: list[ChainCheckOut]
    unchained: int
    malformed: int


class SummaryOut(Report):
    gateways: int
    judged: int
    allowed: int
    refused: int
    monitored: int
    refused_by_rule: list[CountOut]
    counts_from: str = Field(description="chain: the chained hourly counts; hashes: Redis's hourly hashes; none")
    sampled: int = Field(description="Refusals counted but not stored one by one (per-source sampling)")


class EvidenceReportOut(Report):
    """What ``regiongate report --format json`` writes: the evidence over one period, the HTML and PDF's data."""

    title: str
    statement: str
    generated_at: str
    source: str
    period: PeriodOut
    summary: SummaryOut
    gateways: list[GatewayOut]
    policies: list[PolicyVersionOut]
    countries: list[CountryOut]
    refusals_by_subdivision: list[CountOut]
    refusals_by_asn: list[CountOut]
    refusals_by_rule: list[CountOut]
    refusals_by_model: list[CountOut]
    would_refuse_by_rule: list[CountOut] = Field(
        description="Requests let through that a monitor rule, or the shadow policy (as 'shadow: RULE'), would refuse"
    )
    clients: dict[str, int] = Field(
        description="Decisions on callers with no usable location: unknown, invalid, missing"
    )
    tokens_by_country: list[CountOut] = Field(
        default_factory=list,
        description="Tokens (input and output) used by the requests stored one by one (--audit all), by country",
    )
    fail_modes: list[FailModeOut]
    geoip: list[GeoipOut]
    overrides: list[OverrideEventOut]
    gaps: list[GapOut]
    limitations: list[str]
    verification: VerificationOut
