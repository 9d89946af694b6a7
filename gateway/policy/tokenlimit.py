"""Token budgets and concurrent-request limits, the pure half: what a rule sets, and whose budget a request spends.

A rule's ``token_limit`` entries and its ``max_concurrent`` compile into one
:class:`Budget`, held by the rule's :class:`~.compiled.Decision`. Asking Redis
or memory (reserve, settle, refund; acquire, release) is
:mod:`gateway.shared.budgets`'; reading usage from a response is
:mod:`gateway.usage`'. No I/O here.

Interface fixed for the token-budget work (issue 19); bodies to be filled in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Who shares one budget: several make one composite subject ([country, model]: one budget per
# country per model).
TokenBy = Literal["ip", "api_key", "country", "subdivision", "asn", "model", "rule"]
Count = Literal["input", "output", "total"]
Kind = Literal["rate", "quota"]


@dataclass(frozen=True, slots=True)
class TokenLimit:
    """One ``token_limit`` entry of a rule: ``tokens`` per ``per`` seconds, counted as ``count``."""

    rule: str
    index: int  # its place in the rule's list: part of its key, so two entries never share a budget
    tokens: int
    per: float  # seconds
    by: tuple[TokenBy, ...]
    count: Count = "total"
    kind: Kind = "rate"  # rate: GCRA, refills steadily; quota: a window that empties, reset when it ends
    burst: int | None = None  # rate only: tokens that may be spent at once (default: tokens)


@dataclass(frozen=True, slots=True)
class Concurrency:
    """A rule's ``max_concurrent``: at most ``streams`` requests in flight per subject, across replicas."""

    rule: str
    streams: int
    by: tuple[TokenBy, ...]


@dataclass(frozen=True, slots=True)
class Budget:
    """Everything about tokens and concurrency that a deciding rule asks of a request it lets through."""

    rule: str
    tokens: tuple[TokenLimit, ...] = ()
    concurrency: Concurrency | None = None
    output_default: int = 4096  # reserved for the output when the request names no max_tokens
    unreadable: int = 8192  # charged in full for a body that cannot be read (not JSON, too large)
