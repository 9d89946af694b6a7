"""The admin API's request and response models: one per record, used by the routes and the OpenAPI document.

The reports themselves (explain, trace, diff, replay, reload) are built by
the decision-side modules; the models here describe them as the admin API
returns them, and ``regiongate ... --json`` prints the same shapes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..shared.overrides import KINDS, MAX_TEXT, OverrideError, check_text, new_override


class ErrorBody(BaseModel):
    detail: str


class CandidateError(BaseModel):
    error: str
    problems: list[str] = Field(description="One 'file:line: problem' per problem.")


class Verdict(BaseModel):
    decision: str
    rule: str


class ChangeOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    kind: str = Field(description="country, subdivision, client, asn, anonymizer or cidr")
    subject: str
    from_: Verdict = Field(alias="from")
    to: Verdict
    countries: list[str] | None = Field(description="Countries it happens with; null: every one probed.")
    addresses: list[str] | None = Field(description="CIDR addresses it happens at; null: every one probed.")
    paths: list[str] | None = Field(description="Paths it happens on; null: every one probed.")


class SettingOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    key: str
    from_: Any = Field(alias="from")
    to: Any


class PolicyRef(BaseModel):
    path: str
    sha256: str


class Summary(BaseModel):
    changes: int
    transitions: dict[str, int]


class CandidateTests(BaseModel):
    passed: int
    failed: list[str]


class DiffOut(BaseModel):
    old: PolicyRef
    new: PolicyRef
    changed: bool
    probes: int
    changes: list[ChangeOut]
    rule_changes: list[ChangeOut]
    settings: list[SettingOut]
    summary: Summary
    candidate_tests: CandidateTests


class KeyCheckOut(BaseModel):
    key: str
    matched: bool
    detail: str


class RuleStepOut(BaseModel):
    index: int
    name: str
    line: int | None
    action: str
    mode: str
    matched: bool
    reached: bool
    checks: list[KeyCheckOut]


class DecisionOut(BaseModel):
    verdict: str
    action: str
    rule: str
    reason: str
    shadow: list[str]


class TraceOut(BaseModel):
    client_kind: str
    address: str | None
    path: str
    geo_field: str
    country: str | None
    rules_consulted: bool
    rules: list[RuleStepOut]
    default: str | None
    decision: DecisionOut


class RecordOut(BaseModel):
    database_type: str
    path: str
    found: bool
    network: str | None
    fields: dict[str, Any]
    error: str | None


class ExplainOut(BaseModel):
    """The same report as ``regiongate explain --trace --json``."""

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
    allow_models: list[str] | None = Field(None, description="The deciding rule's allow_models.")
    status: int | None
    facts: dict[str, Any]
    records: list[RecordOut]
    policy: dict[str, Any]
    geo: list[dict[str, Any]]
    trace: TraceOut
    override: OverrideOut | None = Field(None, description="The runtime override that decides, before any rule.")
    rate_limit: dict[str, Any] | None = Field(
        None, description="The deciding rule's rate_limit (per: seconds); a request within it goes on."
    )


class OverrideIn(BaseModel):
    """Exactly one of cidr, api_key, country, subdivision."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["allow", "deny"]
    cidr: str | None = Field(None, max_length=64, description="An IPv4 or IPv6 block, e.g. 203.0.113.0/24.")
    api_key: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="A caller's bearer token; only its keyed hash (HMAC-SHA256) is kept, never the token.",
    )
    country: str | None = Field(None, pattern="^[A-Za-z]{2}$", description="ISO 3166-1 alpha-2, e.g. CN.")
    subdivision: str | None = Field(
        None, pattern="^[A-Za-z]{2}-[A-Za-z0-9]{1,3}$", description="ISO 3166-2, e.g. GB-ENG."
    )
    reason: str = Field(..., max_length=MAX_TEXT)
    by: str = Field("", max_length=MAX_TEXT, description="Who set it.")
    ttl: float | None = Field(None, gt=0, le=10 * 365 * 86400, description="Seconds until it expires; none: never.")
    id: str | None = Field(None, pattern="^[A-Za-z0-9_.-]{1,64}$", description="Chosen id; none: a random one.")

    @model_validator(mode="after")
    def _one_subject(self) -> OverrideIn:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of cidr, api_key, country, subdivision")
        kind = given[0]
        try:
            check_text(self.reason, self.by)
            if kind != "api_key":  # the key is hashed with the store's key, which only the store knows
                new_override(self.action, kind, getattr(self, kind), self.reason, self.by)
        except OverrideError as e:
            raise ValueError(str(e)) from None
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)


class OverrideOut(BaseModel):
    id: str
    action: str
    kind: str = Field(description="api_key, cidr, subdivision or country")
    value: str = Field(description="The block or code; for api_key 'hmac-sha256:' and the hash's first 16 hex digits.")
    reason: str
    by: str
    created_at: float
    expires_at: float | None
    rule: str = Field(description="The rule name its decisions carry: override:<id>.")


class OverrideList(BaseModel):
    backend: str = Field(description="memory (this process) or redis (every replica)")
    overrides: list[OverrideOut]


class OverrideRemoved(BaseModel):
    removed: str


class PolicyFileResult(BaseModel):
    ok: bool
    changed: bool
    path: str
    sha256: str
    version: str
    error: str | None
    candidate_sha256: str | None


class ReloadResponse(PolicyFileResult):
    """The main policy's result at the top level; the shadow policy's, if one is configured, under ``shadow``."""

    pid: int
    shadow: PolicyFileResult | None = None


class PolicyDocument(BaseModel):
    path: str
    source: str
    sha256: str
    version: str
    loaded_at: str
    text: str


class ActivePolicies(PolicyDocument):
    shadow: PolicyDocument | None = None
