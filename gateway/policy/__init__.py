"""The policy: what operators write, what it compiles to, and the decision.

One idea per module, each plain:

* :mod:`.schema`: ``PolicySpec`` and friends, the YAML's schema (pydantic,
  ``extra=forbid``), which is also what ``policies/policy.schema.json`` is
  generated from.
* :mod:`.compile`: :func:`compile_policy` checks what a schema cannot (ISO
  codes, CIDRs, rules that can never match, rules that need a database that
  is not configured) and builds the compiled form, :mod:`.compiled`:
  frozensets, CIDR range tables and precomputed :class:`Decision` objects.
* :mod:`.index`: the rules as lookup tables (address intervals, dicts of
  countries, ASNs and names), which give the first matching rule without
  trying each one, and the earlier rules that could cover a later one.
* :mod:`.decide`: :func:`decide` is a pure function of (policy, client,
  facts, path): lookups in the index, at a cost that does not grow with the
  number of rules, allocating nothing unless a shadow rule fires.
* :mod:`.messages`: validation errors in plain words; :mod:`.load`: the only
  file I/O; :mod:`.selftest`: the policy's own ``tests:``.
* :mod:`.provenance`: the published list behind a policy and each rule
  (``provider:``, ``source:``, ``captured:``), for the evidence report.
* :mod:`.ratelimit` and :mod:`.tokenlimit`: the pure halves of request and
  token budgets (whose budget, what a request costs, GCRA and quota windows).

The package imports nothing from the data plane, the proxy, ``shared``,
``control``, ``live`` or the CLI: it is the decision, without the bytes.
Callers import from here (``from gateway.policy import decide``).
"""

from __future__ import annotations

from .compile import block_body, compile_policy
from .compiled import NEEDS_MODEL, UNREAD, Decision, PathSet, Patterns, Policy, Rule, Unread, Verdict
from .decide import decide, decide_model, model_refusal, request_path
from .load import load_policy, parse_policy
from .messages import plain_error
from .provenance import Provenance, age_days, policy_provenance, rule_sources
from .schema import (
    ALLOW,
    DEFAULT_UPSTREAM,
    DEFAULT_UPSTREAM_URL,
    DENY,
    MONITOR,
    ROUTE,
    Action,
    AuthSpec,
    Block,
    BodySpec,
    ConcurrencySpec,
    Defaults,
    GeoField,
    GeoSpec,
    HealthSpec,
    PolicySpec,
    PolicyTest,
    RateLimitSpec,
    RedisPolicy,
    RuleAction,
    RuleSpec,
    Timeouts,
    TokenLimitSpec,
    TokenReserveSpec,
    UpstreamSpec,
    check_upstream_url,
    json_schema,
)
from .selftest import TestResult, judge_ip, run_tests

__all__ = [
    "ALLOW",
    "DEFAULT_UPSTREAM",
    "DEFAULT_UPSTREAM_URL",
    "DENY",
    "MONITOR",
    "NEEDS_MODEL",
    "ROUTE",
    "UNREAD",
    "Action",
    "AuthSpec",
    "Block",
    "BodySpec",
    "ConcurrencySpec",
    "Decision",
    "Defaults",
    "GeoField",
    "GeoSpec",
    "HealthSpec",
    "PathSet",
    "Patterns",
    "Policy",
    "PolicySpec",
    "PolicyTest",
    "Provenance",
    "RateLimitSpec",
    "RedisPolicy",
    "Rule",
    "RuleAction",
    "RuleSpec",
    "TestResult",
    "Timeouts",
    "TokenLimitSpec",
    "TokenReserveSpec",
    "Unread",
    "UpstreamSpec",
    "Verdict",
    "age_days",
    "block_body",
    "check_upstream_url",
    "compile_policy",
    "decide",
    "decide_model",
    "json_schema",
    "judge_ip",
    "load_policy",
    "model_refusal",
    "parse_policy",
    "plain_error",
    "policy_provenance",
    "request_path",
    "rule_sources",
    "run_tests",
]
