"""The decision service's settings, checked at load: which header carries the client per contract, and
which contracts send the request body.

The defaults are the headers each proxy writes itself when configured as in
``deploy/edges``: Traefik, Caddy and nginx append the address they saw to
``X-Forwarded-For`` (walked from the right, so what a client wrote there
counts for nothing); Envoy's ext_authz HTTP mode sends its own address as the
last ``X-Forwarded-For`` hop (envoyproxy/envoy#21519), so its client is
``x-envoy-external-address``, which Envoy sets itself at the edge.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..policy import Policy
from .query import CONTRACTS, Contract

# The contracts the HTTP listener speaks (the gRPC one has its own port and options).
HTTP_CONTRACTS: tuple[Contract, ...] = ("forward", "nginx", "envoy_http")
DEFAULT_CLIENT_HEADERS: dict[Contract, str] = {
    "forward": "x-forwarded-for",
    "nginx": "x-forwarded-for",
    "envoy_http": "x-envoy-external-address",
    "envoy_grpc": "x-envoy-external-address",
    "haproxy": "x-forwarded-for",
}
# nginx's auth_request subrequest never has a body.
NEVER_BODIES: frozenset[Contract] = frozenset({"nginx"})


@dataclass(frozen=True, slots=True)
class AuthzConfig:
    client_headers: dict[Contract, str]
    bodies: frozenset[Contract]


def _contract(name: str, what: str) -> Contract:
    text = name.strip().lower().replace("-", "_")
    for c in CONTRACTS:
        if c == text:
            return c
    raise ValueError(f"{what}: {name[:40]!r} is not a contract (one of {', '.join(CONTRACTS)})")


def contracts(names: Iterable[str], flag: str) -> frozenset[Contract]:
    """Contract names as given on the command line, or ValueError naming ``flag``."""
    return frozenset(_contract(n, flag) for n in names)


def parse_config(client_headers: Iterable[str], bodies: Iterable[str]) -> AuthzConfig:
    """``--authz-client-header CONTRACT=HEADER`` and ``--authz-body CONTRACT``, or ValueError naming the flag."""
    headers = dict(DEFAULT_CLIENT_HEADERS)
    for item in client_headers:
        name, sep, header = item.partition("=")
        if not sep:
            raise ValueError(f"--authz-client-header: {item[:60]!r} is not CONTRACT=HEADER")
        value = header.strip().lower()
        if not value or not all(c.isascii() and (c.isalnum() or c == "-") for c in value):
            raise ValueError(f"--authz-client-header: {header[:60]!r} is not a header name")
        headers[_contract(name, "--authz-client-header")] = value
    sending = contracts(bodies, "--authz-body")
    for c in sending & NEVER_BODIES:
        raise ValueError(f"--authz-body: {c} cannot send the body (nginx's auth_request subrequest has none)")
    return AuthzConfig(headers, sending)


def blind_rules(policy: Policy, contracts: Iterable[Contract]) -> list[str]:
    """One warning (file:line) per rule that reads the model, for the given contracts that send no body."""
    if not (blind := sorted(set(contracts))):
        return []
    unknown = policy.spec.body.unknown_model
    out = []
    for rule in policy.rules:
        if rule.models is None and rule.decision.allow_models is None:
            continue
        where = f"{policy.source}:{rule.line}" if rule.line is not None else policy.source
        out.append(
            f"{where}: rule {rule.name!r} reads the request's model, which the contracts without a request body "
            f"({', '.join(blind)}) cannot see: their requests are judged with an unknown model "
            f"(body.unknown_model: {unknown})"
        )
    return out


def unenforced_budgets(policy: Policy, contracts: Iterable[Contract]) -> list[str]:
    """One warning (file:line) per rule with token_limit or max_concurrent, when the policy is served
    through a decision service: it answers allow or deny before the request is sent and never sees the
    answer, so it can count requests (rate_limit) but not tokens, and cannot hold a request in flight."""
    if not (served := sorted(set(contracts))):
        return []
    out = []
    for rule in policy.rules:
        budget = rule.decision.budget
        if budget is None:
            continue
        what = " and ".join(k for k, v in (("token_limit", budget.tokens), ("max_concurrent", budget.concurrency)) if v)
        where = f"{policy.source}:{rule.line}" if rule.line is not None else policy.source
        out.append(
            f"{where}: rule {rule.name!r} has {what}, which the decision service ({', '.join(served)}) does not "
            "enforce: it never sees the answer, so it cannot count tokens or requests in flight (it enforces "
            "rate_limit); serve these callers through the gateway's own proxy port to have them counted"
        )
    return out
