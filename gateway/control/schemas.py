"""The admin API's request and response models, used by the routes and the OpenAPI document.

The report models (explain and its trace, override, diff, replay, reload,
the watcher's health) are :mod:`gateway.reports`', re-exported here: the
decision side builds them and ``regiongate ... --json`` prints them, so the
CLI, the admin API and its OpenAPI document share one model per record. The
models defined here are the admin API's own: what it takes (an override),
what only it answers (the override list, the policy documents, errors), and
the reload answer around a report (with its pid and the shadow's result).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..policy.clientkeys import (
    MAX_META,
    META_KEY_PATTERN,
    META_VALUE_PATTERN,
    NAME_PATTERN,
    ClientKeyError,
    check_meta,
    check_name,
)
from ..policy.overrides import KINDS, MAX_TEXT, OverrideError, check_text, new_override
from ..reports import (
    CandidateTests,
    ChangeOut,
    ClientKeyOut,
    CountryFlips,
    DecisionOut,
    DiffOut,
    ExplainOut,
    FlipOut,
    KeyCheckOut,
    OverrideOut,
    PolicyFileResult,
    PolicyRef,
    RecordOut,
    ReplayOut,
    ReplaySkipped,
    RuleFlips,
    RuleStepOut,
    SettingOut,
    Summary,
    TraceOut,
    Verdict,
    WatcherOut,
)

__all__ = [
    "ActivePolicies",
    "CandidateError",
    "CandidateTests",
    "ChangeOut",
    "ClientKeyIn",
    "ClientKeyIssued",
    "ClientKeyList",
    "ClientKeyOut",
    "ClientKeyRevoked",
    "CountryFlips",
    "DecisionOut",
    "DiffOut",
    "ErrorBody",
    "ExplainOut",
    "FlipOut",
    "KeyCheckOut",
    "OverrideIn",
    "OverrideList",
    "OverrideOut",
    "OverrideRemoved",
    "PolicyDocument",
    "PolicyFileResult",
    "PolicyRef",
    "RecordOut",
    "ReloadResponse",
    "ReplayOut",
    "ReplaySkipped",
    "RuleFlips",
    "RuleStepOut",
    "SettingOut",
    "Summary",
    "TraceOut",
    "Verdict",
    "WatcherOut",
]


class ErrorBody(BaseModel):
    detail: str


class CandidateError(BaseModel):
    error: str
    problems: list[str] = Field(description="One 'file:line: problem' per problem.")


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


class OverrideList(BaseModel):
    backend: str = Field(description="memory (this process) or redis (every replica)")
    overrides: list[OverrideOut]


class OverrideRemoved(BaseModel):
    removed: str


class ClientKeyIn(BaseModel):
    """A key to issue; its token is made by the gateway and returned once."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        ...,
        pattern=NAME_PATTERN,
        description="Who holds it: letters, digits, . _ @ - (starting with a letter or digit); unique among live keys.",
    )
    expires_in: float | None = Field(
        None, ge=1, le=10 * 365 * 86400, description="Seconds until it expires; none: never."
    )
    meta: dict[Annotated[str, Field(pattern=META_KEY_PATTERN)], Annotated[str, Field(pattern=META_VALUE_PATTERN)]] = (
        Field(
            default_factory=dict,
            max_length=MAX_META,
            description="Labels kept with the key (one line each).",
            json_schema_extra={"additionalProperties": False},  # a key outside the pattern is refused
        )
    )

    @model_validator(mode="after")
    def _checked(self) -> ClientKeyIn:
        try:
            check_name(self.name)
            check_meta(self.meta)
        except ClientKeyError as e:
            raise ValueError(str(e)) from None
        return self


class ClientKeyIssued(BaseModel):
    key: ClientKeyOut
    token: str = Field(description="The key's token (rg-...): shown this once; only its keyed hash is kept.")
    warning: str


class ClientKeyList(BaseModel):
    backend: str = Field(description="off (no store), file (--keys-file) or redis (every replica)")
    keys: list[ClientKeyOut] = Field(description="Every key, revoked and expired ones too, oldest first.")


class ClientKeyRevoked(BaseModel):
    revoked: ClientKeyOut


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
