"""The evidence report as one self-contained HTML page (and, printed by Chromium, the PDF).

The promise: the page is the report's model (:class:`~gateway.reports.EvidenceReportOut`)
and nothing else, every value escaped; it loads nothing (styles inline, maps
inline SVG, no script, no font file, no image link), so it opens offline and
prints the same everywhere; its sections follow the model's order, each a
printed page where it is long, with the statement that it is supporting evidence and
not a certification at the top and on the verification page.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

from ..reports import CountOut, EvidenceReportOut
from .report import hourly_map_counts
from .worldmap import count_shades, render

REFUSED_COLOURS = ("#fcd5ce", "#f4a492", "#e76f51", "#c0392b", "#7f1d1d")
ALLOWED_COLOURS = ("#d8f3dc", "#95d5b2", "#52b788", "#2d6a4f", "#1b4332")

STYLE = """
@page { size: A4; margin: 14mm 12mm; }
body { font: 10.5pt/1.4 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2933;
       margin: 0 auto; max-width: 1000px; padding: 12px; }
h1 { font-size: 20pt; margin: 0 0 4px; } h2 { font-size: 14pt; margin: 22px 0 6px; border-bottom: 2px solid #cbd2d9; }
h3 { font-size: 11.5pt; margin: 14px 0 4px; }
.statement { border-left: 4px solid #e0a800; background: #fff8e1; padding: 6px 10px; }
table { border-collapse: collapse; width: 100%; margin: 4px 0 10px; font-size: 9.5pt; }
th, td { border-bottom: 1px solid #e4e7eb; padding: 3px 6px; text-align: left; vertical-align: top;
         overflow-wrap: break-word; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font: 8.5pt/1.35 ui-monospace, "DejaVu Sans Mono", Menlo, monospace; }
pre { background: #f5f7fa; padding: 6px; white-space: pre-wrap; word-break: break-all; }
.ok { color: #1b7f4b; font-weight: 600; } .bad { color: #b42318; font-weight: 600; } .muted { color: #616e7c; }
section.page { break-before: page; } svg.rg-map { width: 100%; height: auto; }
.figures td { font-size: 11pt; } code.hash { white-space: nowrap; font-size: 8pt; }
"""


def _table(head: Sequence[str], rows: Iterable[Sequence[object]], numeric: Sequence[int] = ()) -> str:
    out = ["<table><thead><tr>"]
    out += [f'<th class="n">{escape(h)}</th>' if i in numeric else f"<th>{escape(h)}</th>" for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    count = 0
    for row in rows:
        count += 1
        cells = []
        for i, v in enumerate(row):
            text = f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else escape("" if v is None else str(v))
            cells.append(f'<td class="n">{text}</td>' if i in numeric else f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    if not count:
        out.append(f'<tr><td colspan="{len(head)}" class="muted">none in the period</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def _counts(title: str, rows: list[CountOut], what: str) -> str:
    return f"<h3>{escape(title)}</h3>" + _table([what, "refusals"], ((c.key, c.n) for c in rows), (1,))


def _tokens(rows: list[CountOut]) -> str:
    """Tokens by country, when the stream holds requests with their usage (``--audit all``): else nothing."""
    if not rows:
        return ""
    return (
        "<h2>Tokens by country</h2>"
        '<p class="muted">Input and output tokens of the forwarded requests stored one by one, as the '
        "provider reported them or estimated (the top countries).</p>"
        + _table(["country", "tokens"], ((c.key, c.n) for c in rows), (1,))
    )


def maps(report: EvidenceReportOut) -> dict[str, str]:
    """The report's two maps as SVG, by file name: refusals, and allowed volume, per country."""
    refused, allowed = hourly_map_counts(report)
    period = f"{report.period.since[:10]} to {report.period.until[:10]}"
    c1, s1 = count_shades(refused, REFUSED_COLOURS, "refused")
    c2, s2 = count_shades(allowed, ALLOWED_COLOURS, "allowed")
    return {
        "map-refusals.svg": render(c1, s1, f"Refusals per country, {period}", css_id="map-refusals"),
        "map-allowed.svg": render(c2, s2, f"Allowed requests per country, {period}", css_id="map-allowed"),
    }


def render_html(report: EvidenceReportOut, files: Sequence[tuple[str, str]] = ()) -> str:
    """The page; ``files`` are (name, sha256) of the pack's other files, listed under Verification."""
    s = report.summary
    v = report.verification
    figures = [
        ("Period", f"{report.period.since} to {report.period.until} (UTC, end excluded)"),
        ("Gateways seen", f"{s.gateways:,}"),
        ("Requests judged", f"{s.judged:,}"),
        ("Allowed", f"{s.allowed:,}"),
        ("Refused", f"{s.refused:,}"),
        ("Monitored (would be refused)", f"{s.monitored:,}"),
        (
            "Counts taken from",
            {
                "chain": "the chained hourly counts",
                "hashes": "Redis's hourly counts (not chained)",
                "none": "no hourly counts in the evidence",
            }.get(s.counts_from, s.counts_from),
        ),
        ("Refusals counted but not stored one by one", f"{s.sampled:,}"),
        ("Evidence gaps", f"{len(report.gaps):,}"),
        ("Chain check", "not run: no key given" if not v.checked else ("OK" if v.ok else "FAILED")),
    ]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        f"<title>{escape(report.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(report.title)}</h1>",
        f'<p class="muted">Generated {escape(report.generated_at)} from {escape(report.source)}.</p>',
        f'<p class="statement">{escape(report.statement)}</p>',
        "<h2>Summary</h2>",
        '<table class="figures"><tbody>',
        *(f"<tr><th>{escape(k)}</th><td>{escape(val)}</td></tr>" for k, val in figures),
        "</tbody></table>",
        _counts("Refusals by rule (hourly counts)", s.refused_by_rule, "rule"),
        "<h3>Gateways</h3>",
        _table(
            ["process (host/pid/start)", "version", "audit", "first entry", "last entry", "stopped cleanly"],
            ((g.chain, g.version, g.audit, g.first, g.last, "yes" if g.stopped else "no") for g in report.gateways),
        ),
        '<section class="page"><h2>Policy versions in force</h2>',
        _table(
            ["role", "version", "sha256", "in force from", "until"],
            (
                (p.role, p.version, p.sha256[:16] + "...", p.first_loaded, p.replaced_at or "the end of the period")
                for p in report.policies
            ),
        ),
    ]
    for p in report.policies:
        version = escape(p.version or "(no version)")
        out.append(f"<h3>{escape(p.role)} {version} &middot; sha256 <code>{escape(p.sha256)}</code></h3>")
        out.append(
            _table(["loaded at", "process", "trigger", "path"], ((x.time, x.chain, x.trigger, x.path) for x in p.loads))
        )
        out.append(f"<p>redis.on_error: {escape(p.on_error or 'unknown (text not in the evidence)')}</p>")
        out.append(_counts("Refusals recorded under this version, by rule", p.refused_by, "rule"))
        if p.sources:
            out.append("<h3>Published lists behind its rules</h3>")
            rows = ((x.rule, x.provider, " ".join(x.urls), x.captured) for x in p.sources)
            out.append(_table(["rule", "provider", "source", "captured"], rows))
        if p.text is not None:
            out.append(f"<details open><summary>Policy text</summary><pre>{escape(p.text)}</pre></details>")
        else:
            out.append('<p class="bad">The text of this version is not in the evidence.</p>')
    if not report.policies:
        out.append('<p class="bad">No policy load is recorded in the period.</p>')
    out.append("</section>")
    svgs = maps(report)
    out += [
        '<section class="page"><h2>Refusals and allowed volume by country</h2>',
        svgs["map-refusals.svg"],
        svgs["map-allowed.svg"],
        '</section><section class="page"><h2>By country</h2>',
        _table(
            ["country", "name", "allowed", "refused", "monitored (would be refused)"],
            ((c.country, c.name, c.allowed, c.refused, c.monitored) for c in report.countries),
            (2, 3, 4),
        ),
        "<h2>Refusals recorded one by one</h2>",
        '<p class="muted">From the requests stored in the audit stream (refusals, sampled per client network '
        "under load; the number sampled out is in the summary).</p>",
        _counts("By subdivision", report.refusals_by_subdivision, "subdivision"),
        _counts("By ASN", report.refusals_by_asn, "ASN"),
        _counts("By rule", report.refusals_by_rule, "rule"),
        _counts("By model", report.refusals_by_model, "model"),
        "<h3>Would-be refusals (monitor rules, and the shadow policy's as <i>shadow: rule</i>) by rule</h3>",
        _table(["rule", "let through"], ((c.key, c.n) for c in report.would_refuse_by_rule), (1,)),
        _tokens(report.tokens_by_country),
        "<h2>Callers with no usable location</h2>",
        _table(["kind", "decisions"], sorted(report.clients.items()), (1,)),
        '</section><section class="page"><h2>Fail-open and fail-closed moments</h2>',
        _table(
            ["from", "to", "process", "what", "effect"],
            ((f.from_, f.to, f.chain, f.what, f.effect) for f in report.fail_modes),
        ),
        "<h2>GeoIP databases in force</h2>",
        _table(
            ["loaded", "type", "build", "age at period end (days)", "path", "sha256"],
            (
                (g.loaded, g.type, g.build, "" if g.age_days is None else f"{g.age_days:g}", g.path, g.sha256)
                for g in report.geoip
            ),
        ),
        "<h2>Overrides applied</h2>",
        _table(
            ["time", "event", "id", "does", "matches", "value", "by", "reason", "ttl (s)"],
            ((o.time, o.action, o.id, o.override, o.match, o.value, o.by, o.reason, o.ttl) for o in report.overrides),
        ),
        "<h2>Evidence gaps</h2>",
        _table(
            ["from", "to", "process", "entries lost", "why"],
            (
                (g.from_, g.to, g.chain, g.lost, ", ".join(f"{k}: {n}" for k, n in sorted(g.reasons.items())))
                for g in report.gaps
            ),
            (3,),
        ),
        '</section><section class="page"><h2>Limitations</h2><ul>',
        *(f"<li>{escape(x)}</li>" for x in report.limitations),
        "</ul><h2>Verification</h2>",
        f'<p class="statement">{escape(report.statement)}</p>',
    ]
    if not v.checked:
        out.append(
            '<p class="bad">The chain was not checked: no key was given (REGIONGATE_AUDIT_KEY or --key-file).</p>'
        )
    else:
        verdict = '<span class="ok">OK</span>' if v.ok else '<span class="bad">FAILED</span>'
        out.append(
            f"<p>Chain check: {verdict}; {v.unchained:,} entries from before the chain; {v.malformed:,} malformed.</p>"
        )
        out.append(
            _table(
                ["process", "result", "entries", "seq", "problems and notices"],
                (
                    (
                        c.chain,
                        "OK" if c.ok else "FAILED",
                        c.entries,
                        f"{c.first_seq}-{c.last_seq}",
                        "; ".join(c.problems + c.notices),
                    )
                    for c in v.chains
                ),
                (2,),
            )
        )
    out += [
        "<p>To check it yourself: <code>regiongate audit verify --file EXPORT</code> with the audit key, and "
        "<code>sha256sum -c SHA256SUMS</code> in the pack's folder (it covers this page and the PDF too).</p>",
        "<table><thead><tr><th>sha256</th><th>file</th></tr></thead><tbody>",
        *(f'<tr><td><code class="hash">{escape(h)}</code></td><td>{escape(n)}</td></tr>' for n, h in files),
        "</tbody></table>",
        "</section></body></html>",
    ]
    return "\n".join(out) + "\n"
