"""The text cards and tables the subcommands print: explain's card, diff's table, replay's summary,
the shipped policies' table.

What ``--json`` prints is the report itself; these are its words for a
terminal, and nothing here decides anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .. import georecords
from ..explain import Explanation
from ..geo import Geo
from ..policy import Policy, rule_sources
from ..policy.overrides import printable

# explain computes its report from files; only /admin/explain asks a running gateway.
LOCAL_NOTE = (
    "decided here from the files above, not asked of a running gateway; "
    "compare the policy's sha256 with the gateway's /readyz"
)


def print_explain(ip: str, result: Explanation, policy: Policy, geo: Geo) -> None:
    """The explain card: decision, rule, reason, facts, sources; then records and trace when asked for."""
    report = result.report
    path = report["path"]
    if report["rule_line"]:
        where = f" (line {report['rule_line']})"
    elif report["rule_conditions"] is None and report["rule"].startswith("defaults."):
        where = f" (not in the file: the built-in default, {report['action']})"
    else:
        where = ""
    print(f"{ip} {path}: {report['decision'].upper()}")
    if report["normalized"] is not None and report["normalized"] != ip:
        print(f"  address:   {ip} is {report['normalized']}")
    print(f"  client:    {report['kind']}" + (f" ({report['problem']})" if report["problem"] else ""))
    print(f"  rule:      {report['rule']}{where}")
    cited = rule_sources(policy).get(report["rule"])
    if cited is not None:  # the published list behind the rule (its source:)
        print(f"  list:      {printable(cited.label())}")
    print(f"  reason:    {printable(report['reason'])}")  # an override's reason and author are in it
    if report["upstream"] is not None and report["decision"] != "deny":
        print(f"  upstream:  {report['upstream']}")
    if report["model"] is not None or "allow_models" in report or uses_models(policy):
        print(
            f"  model:     {report['model'] or 'unknown (--model not given)'}"
            + (f"; allowed here: {', '.join(report['allow_models'])}" if "allow_models" in report else "")
        )
    if "override" in report:
        o = report["override"]
        print(
            f"  override:  {o['id']} by {printable(o['by']) or 'unknown'}: {o['action']} {o['kind']} {o['value']} "
            "(runtime override from Redis, evaluated before the policy's rules)"
        )
    if "rate_limit" in report:
        lim = report["rate_limit"]
        print(f"  limit:     {lim['requests']} requests per {lim['per']:g}s by {lim['by']} (burst {lim['burst']})")
    for line in budget_lines(report):
        print(f"  {line}")
    for line in report["why"]:
        print(f"  because:   {line}")
    if report["shadow"]:
        print(f"  shadow:    {', '.join(report['shadow'])} (matched, mode: monitor, not enforced)")
    f = report["facts"]
    print(f"  country:   {f['country'] or '-'}   registered: {f['registered_country'] or '-'}")
    if f["subdivisions"]:
        print(f"  subdivisions: {', '.join(f['subdivisions'])}")
    if f["asn"] is not None:
        print(f"  asn:       AS{f['asn']} {f['as_org'] or ''}".rstrip())
    if f["anonymizer"]:
        print(f"  anonymizer: {', '.join(f['anonymizer'])}")
    if f["network"]:
        print(f"  network:   {f['network']}")
    print(f"  policy:    {policy.source} (sha256:{policy.sha256[:12]}, mode {policy.spec.mode})")
    for src in geo.sources:
        print(f"  geo:       {src.type} {src.path or '(' + src.description + ')'}, built {src.build_date or 'unknown'}")
    print(f"  note:      {LOCAL_NOTE}")
    if result.records:
        print("what the databases say:")
        for record in result.records:
            for line in georecords.render(record):
                print(f"  {line}")
    if result.trace is not None:
        print("trace (rules in order, first enforcing match wins):")
        for line in result.trace.lines():
            print(f"  {line}")


def budget_lines(report: dict[str, Any]) -> list[str]:
    """The explain card's lines for client keys, token limits, concurrency and a request's reservation."""
    out = []
    if "client_keys" in report:
        out.append("keys:      client key required (regiongate keys add); a missing or unknown one gets 401")
    asked = report.get("reservation")
    if asked is not None:
        if not asked["readable"]:
            out.append(f"request:   unreadable body: {asked['output']} tokens reserved under every limit")
        else:
            given = "not given" if asked["input"] is None else f"~{asked['input']} (estimate"
            if asked["input"] is not None:
                given += f", {asked.get('estimate_model') or 'unknown model'})"
            out.append(f"request:   input {given}, output {asked['output']} ({asked['output_from']})")
    for t in report.get("token_limit", ()):
        text = f"tokens:    [{t['index']}] {t['tokens']} {t['count']} tokens per {period(t['per'])} by "
        text += f"{'+'.join(t['by'])} ({t['kind']}"
        text += f", burst {t['burst']})" if t.get("burst") not in (None, t["tokens"]) else ")"
        if "reserves" in t:
            text += f": reserves {t['reserves']}"
            if asked is not None and asked["input"] is None and t["count"] != "output" and asked["readable"]:
                text += " + the body's input"
            if not t["fits"]:
                text += ", more than it can ever hold (429, not retried)"
        out.append(text)
    if "max_concurrent" in report:
        c = report["max_concurrent"]
        out.append(f"in flight: at most {c['streams']} at once by {'+'.join(c['by'])}")
    if "token_reserve" in report:
        r = report["token_reserve"]
        out.append(
            f"reserve:   {r['output']} output tokens without max_tokens; {r['unreadable']} for an unreadable body"
        )
    if "redis_on_error" in report:
        said = report["redis_on_error"]
        out.append(
            f"redis:     on_error {said}: while Redis cannot be asked, "
            + ("let through, counted" if said == "open" else "503, counted")
        )
    return out


def period(seconds: float) -> str:
    """60.0 -> '1m', 86400.0 -> '1d', 90.0 -> '90s': a period as a policy would write it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def uses_models(policy: Any) -> bool:
    return any(r.models is not None or r.decision.allow_models is not None for r in policy.rules)


def _country_name(code: str) -> str:
    import pycountry

    c = pycountry.countries.get(alpha_2=code)
    return str(c.name) if c is not None else ("Kosovo" if code == "XK" else "")


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _change_rows(changes: Sequence[Any]) -> list[str]:
    rows = [["KIND", "SUBJECT", "FROM", "TO", "WHERE"]]
    for c in changes:
        subject = f"{c.subject} {_country_name(c.subject)}".strip() if c.kind == "country" else c.subject
        where = []
        if c.countries is not None:
            shown = ", ".join(c.countries[:12]) + (f", … ({len(c.countries)} in all)" if len(c.countries) > 12 else "")
            where.append("with " + shown)
        if c.addresses is not None:
            where.append("at " + ", ".join(c.addresses))
        if c.paths is not None:
            where.append("on " + ", ".join(c.paths))
        rows.append(
            [
                c.kind,
                subject,
                f"{c.old_verdict} ({c.old_rule})",
                f"{c.new_verdict} ({c.new_rule})",
                "; ".join(where) or "everywhere probed",
            ]
        )
    return _table(rows)


def print_diff(result: Any) -> None:
    print(
        f"{result.old_source} (sha256:{result.old_sha256[:12]}) -> {result.new_source} "
        f"(sha256:{result.new_sha256[:12]}): {len(result.changes)} decision changes, "
        f"{result.probes} callers probed"
    )
    if result.changes:
        print()
        for line in _change_rows(result.changes):
            print(line)
    if result.settings:
        print()
        print("settings that change what a client sees:")
        for s in result.settings:
            print(f"  {s.key}: {s.old!r} -> {s.new!r}")
    if result.rule_changes:
        print()
        print("same decision, made by another rule (not a change):")
        for line in _change_rows(result.rule_changes):
            print(f"  {line}")
    if not result.changed:
        print("no caller is treated differently")


def print_replay(source: str, r: Any) -> None:
    print()
    skipped = r.skipped_redacted + r.skipped_unreadable
    print(
        f"replay of {source}: {r.replayed} requests replayed, {skipped} skipped "
        f"({r.skipped_redacted} with hashed or truncated addresses, {r.skipped_unreadable} unreadable); "
        f"{r.flipped} decisions flip"
    )
    for transition, n in r.transitions:
        print(f"  {transition}: {n}")
    if r.top_countries:
        print("  top countries: " + ", ".join(f"{c} {n}" for c, n in r.top_countries))
    if r.top_rules:
        print("  top rules:     " + ", ".join(f"{rules} {n}" for rules, n in r.top_rules))


def print_shipped(directory: Any, policies: Sequence[Any]) -> None:
    """``regiongate policies``: one line per shipped file, then where each list was read."""
    rows = [["FILE", "PROVIDER", "CAPTURED", "AGE", "RULES"]]
    for p in policies:
        age = f"{p.age_days}d" if p.age_days is not None else "-"
        rows.append([p.file, p.provider or "-", p.captured or "-", age, str(p.rules)])
    print(f"shipped policies in {directory}:")
    for line in _table(rows):
        print(f"  {line}")
    for p in policies:
        if p.source:
            print(f"\n{p.file}: {p.description or ''}".rstrip())
            for url in p.source:
                print(f"  source: {url}")
