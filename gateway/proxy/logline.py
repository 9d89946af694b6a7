"""The access-log line of one request, built on the log's writer thread from the facts the record handed over.

:meth:`.record.Record.write` runs on the proxy's loop once per request; it
hands :class:`gateway.accesslog.AccessLog` one tuple of values it already
holds (:data:`Facts`: the clock as an integer, the client's address object,
the decision, sizes, the policy's tag) and :func:`request_line` turns it into
the line on the writer thread: the time in ISO 8601, the address as
``--log-address`` writes it, the scrubbed problem text, the JSON. What costs
(a datetime, ``str(ip)`` or a keyed hash, a 17-key dict, orjson) no longer
runs on the loop.

The line is a contract with log pipelines: the same keys in the same order,
the same number formats, byte for byte what the record wrote itself before
(``tests/proxy/test_record_compat.py`` compares the two). Everything in the
tuple is immutable or no longer changed once the exchange is recorded.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import orjson

from ..clientip import ClientAddress
from ..dataplane.failover import Failover
from ..dataplane.upstream import Upstream
from ..evidence.entries import usage_fields
from ..geo import GeoFacts
from ..policy import DENY, Decision
from ..usage import Usage

if TYPE_CHECKING:
    from ..accesslog import AddressRedactor

# Handed over per request, in this order (see Record.write):
#   time.time_ns(), request id, method, path judged (None: refused before the policy), the raw path,
#   client, decision, geo facts, target (the URL that answered or was tried last), status,
#   seconds (request to last byte), bytes sent, policy tag, model, the shadow decision when it
#   disagrees, the shadow policy's tag, attempts, ttfb seconds, error, failovers, via (the contract:
#   "proxy" on the proxy port, else a decision service's, gateway.authz), caller (the client key's
#   name when client keys were in force), usage (the tokens used, when a usage tap measured them).
Facts = tuple[
    int, str, str, str | None, bytes,
    ClientAddress, Decision, GeoFacts, Upstream | None, int,
    float, int, str, str | None, Decision | None,
    str | None, int, float | None, str | None, list[Failover] | None,
    str, str | None, Usage | None,
]  # fmt: skip
# A client key's name and a model are the operator's or the client's words: bounded in the line.
NAME_CHARS = 256


@lru_cache(maxsize=4)
def _second(epoch: int) -> str:
    """``2026-12-03T16:10:02``: one second's prefix, made once for all the lines of that second."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")[:-6]


def iso_time(ns: int) -> str:
    """``datetime.now(UTC).isoformat(timespec="milliseconds")`` at ``ns`` (``time.time_ns()``).

    ``datetime.now`` floors the clock to the microsecond and ``isoformat``
    cuts that to the millisecond: flooring ``ns`` to the millisecond is the
    same string.
    """
    epoch, rest = divmod(ns, 1_000_000_000)
    return f"{_second(epoch)}.{rest // 1_000_000:03d}+00:00"


def request_line(facts: Facts, redact: AddressRedactor) -> bytes:
    """One JSON line (with its newline), keys in the order the access log has always had."""
    (
        now_ns, request_id, method, path, raw_path, client, decision, geo, target, status,
        seconds, sent, tag, model, shadow, shadow_tag, attempts, ttfb, error, failovers,
        via, caller, usage,
    ) = facts  # fmt: skip
    entry: dict[str, Any] = {
        "time": iso_time(now_ns),
        "request_id": request_id,
        "method": method[:32],
        # The path as judged and forwarded; a refused one as the client sent it.
        "path": path if path is not None else raw_path[:2048].decode("latin-1"),
        "client": redact(client.ip),
        "client_via": client.via,
        "decision": decision.verdict,
        "action": decision.action,
        "rule": decision.rule,
        "country": geo.country,
        "upstream": decision.upstream if decision.verdict != DENY else None,
        "target": target.label if target is not None else None,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
        "bytes": sent,
        "policy": tag,
    }
    if via != "proxy":
        entry["via"] = via  # a decision service's contract (gateway.authz); proxy lines stay as they were
    if model is not None:
        entry["model"] = model[:NAME_CHARS]
    if geo.subdivisions:
        entry["subdivisions"] = geo.subdivisions
    if geo.asn is not None:
        entry["asn"] = geo.asn
    if geo.anonymizer:
        entry["anonymizer"] = sorted(geo.anonymizer)
    if client.problem:
        entry["client_problem"] = redact.text(client.problem)
    if decision.shadow:
        entry["shadow"] = decision.shadow
    if shadow is not None:
        entry["shadow_decision"] = {"decision": shadow.verdict, "rule": shadow.rule, "policy": shadow_tag}
    if attempts:
        entry["attempts"] = attempts
    if ttfb is not None:
        entry["ttfb_ms"] = round(ttfb * 1000, 3)
    if error:
        entry["error"] = error
    if failovers:
        entry["failovers"] = [{"from": f.source.label, "to": f.dest.label, "reason": f.reason} for f in failovers]
    # Last, and only when present: a line with neither is byte for byte what it was before them.
    if caller is not None:
        entry["caller"] = caller[:NAME_CHARS]  # the client key's name, never its token or hash
    if usage is not None:
        entry["usage"] = usage_fields(usage)  # nested like shadow_decision: usage.input, usage.source, ...
    return orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)
