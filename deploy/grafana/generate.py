#!/usr/bin/env python3
"""Regiongate's Grafana dashboard, as code: writes deploy/grafana/dashboards/regiongate.json.

Built with Grafana's own builders (PyPI ``grafana-foundation-sdk``, pinned in
the test extras), so the JSON is what Grafana's schema expects rather than
hand-kept. The committed file must equal this script's output; a test checks
that, and another test evaluates every query below against a real Prometheus
scraping a real gateway, so every panel here must read a metric the gateway
exports. The routing panels (route decisions, model refusals, failovers,
upstream region refusals) read the metrics of routing (issue 8); that test
requires their data whenever the gateway it starts can route.

    python deploy/grafana/generate.py            # rewrite the JSON
    python deploy/grafana/generate.py -o -       # print it
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, common, dashboard, geomap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT = Path(__file__).resolve().parent / "dashboards" / "regiongate.json"
UID = "regiongate"

DS = dashboard_models.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every query selects the chosen gateways; $instance is a regex of them (All: every one).
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.95, 0.99)
# Gateways that use Redis: regiongate_redis_up is 0 on one without --redis too, but only a gateway
# with Redis has calls that succeeded or failed.
USES_REDIS = (
    f"(sum by (instance) (regiongate_redis_latency_seconds_count{{{SEL}}}) > 0"
    f" or sum by (instance) (regiongate_redis_errors_total{{{SEL}}}) > 0)"
)


def query(expr: str, legend: str = "__auto", ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS).range()


def instant_table(expr: str, ref: str = "A") -> prometheus.Dataquery:
    """One row per series over the dashboard's whole time range: for maps, top lists and info series."""
    return prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS).instant().format(PromQueryFormat.TABLE)


def legend_table() -> common.VizLegendOptions:
    return (
        common.VizLegendOptions()
        .show_legend(True)
        .display_mode(common_models.LegendDisplayMode.TABLE)
        .placement(common_models.LegendPlacement.RIGHT)
        .calcs(["mean", "max"])
    )


def series(title: str, description: str, unit: str, *targets: prometheus.Dataquery) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .line_width(1)
        .fill_opacity(10)
        .legend(legend_table())
        .height(8)
        .span(12)
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def percentiles(metric: str, by: str, description: str, title: str) -> timeseries.Panel:
    targets = [
        query(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
            f"p{round(q * 100)} {{{{{by}}}}}",
            chr(ord("A") + i),
        )
        for i, q in enumerate(QUANTILES)
    ]
    return series(title, description, "s", *targets)


def up_stat(title: str, description: str, target: prometheus.Dataquery) -> stat.Panel:
    """A yes/no state per gateway: red at 0, green at 1."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .with_target(target)
        .thresholds(
            dashboard.ThresholdsConfig()
            .mode(dashboard_models.ThresholdsMode.ABSOLUTE)
            .steps(
                [
                    dashboard_models.Threshold(value=None, color="red"),
                    dashboard_models.Threshold(value=1, color="green"),
                ]
            )
        )
        .color_mode(common_models.BigValueColorMode.BACKGROUND)
        .height(8)
    )


def country_map(
    title: str,
    description: str,
    selector: str,
    color: str,
    scheme: dashboard_models.FieldColorModeId,
    metric: str = "regiongate_decisions_total",
) -> geomap.Panel:
    """Circles on each country's centroid, sized and coloured by its count of ``metric`` over the time range.

    The layer's ``config`` (marker style) is an untyped object in the SDK's
    model, so it is given as a dict: the SDK has no builder for it.
    """
    layer = (
        common.MapLayerOptions()
        .type("markers")
        .name(title)
        .location(
            common.FrameGeometrySource()
            .mode(common_models.FrameGeometrySourceMode.LOOKUP)
            .lookup("country")
            .gazetteer("public/gazetteer/countries.json")
        )
        .config(
            {
                "showLegend": True,
                "style": {
                    "size": {"field": "Value", "fixed": 5, "min": 4, "max": 40},
                    "color": {"field": "Value", "fixed": color},
                    "opacity": 0.6,
                    "text": {"field": "country", "mode": "field"},
                    "textConfig": {"fontSize": 10, "offsetY": -12, "textAlign": "center"},
                },
            }
        )
        .tooltip(True)
    )
    return (
        geomap.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .with_target(instant_table(f"sum by (country) (increase({metric}{{{selector}}}[$__range]))"))
        .basemap(common.MapLayerOptions().type("default").name("Basemap"))
        .layers([layer])
        .view(geomap.MapViewConfig().id("coords").lat(20).lon(0).zoom(1))
        .controls(geomap.ControlsOptions().show_zoom(True).mouse_wheel_zoom(False))
        .color_scheme(dashboard.FieldColor().mode(scheme))
        .height(11)
        .span(12)
    )


def build() -> dashboard.Dashboard:
    d = (
        dashboard.Dashboard("Regiongate")
        .uid(UID)
        .description("Where requests come from, what the policy decided, how the upstreams answered.")
        .tags(["regiongate", "generated"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .readonly()
        .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            dashboard.QueryVariable("instance")
            .label("Gateway")
            .description("Gateways (their control-plane scrape targets) to show.")
            .datasource(DS)
            .query("label_values(regiongate_policy_info, instance)")
            .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(dashboard_models.VariableOption(selected=True, text="All", value="$__all"))
        )
    )

    # --- Where requests come from and what was decided --------------------------------------
    d = (
        d.with_row(dashboard.Row("Decisions"))
        .with_panel(
            country_map(
                "Requests by country",
                "Every judged request over the time range, by the client's ISO 3166-1 country "
                "(the `country` label; addresses with no country are not on the map).",
                SEL,
                "blue",
                dashboard_models.FieldColorModeId.CONTINUOUS_BL_PU,
            )
        )
        .with_panel(
            country_map(
                "Refusals by country",
                "Requests refused by the policy (decision=deny) over the time range, by country.",
                f'{SEL}, decision="deny"',
                "red",
                dashboard_models.FieldColorModeId.CONTINUOUS_YL_RD,
            )
        )
        .with_panel(
            series(
                "Decisions by decision and rule",
                "Requests per second by decision (allow, deny, monitor) and the rule that decided.",
                "reqps",
                query(
                    f"sum by (decision, rule) (rate(regiongate_decisions_total{{{SEL}}}[{RATE}]))",
                    "{{decision}} · {{rule}}",
                ),
            ).span(16)
        )
        .with_panel(
            bargauge.Panel()
            .title("Top refused countries")
            .description(
                "The ten countries with the most refusals over the time range. Subdivisions "
                "(e.g. UA-43) are not a metric label, to keep the series count bounded: find them "
                "in the access log's `subdivision` field or with `regiongate explain`."
            )
            .datasource(DS)
            .with_target(
                prometheus.Dataquery()
                .expr(
                    "topk(10, sum by (country) "
                    f'(increase(regiongate_decisions_total{{{SEL}, decision="deny"}}[$__range])))'
                )
                .legend_format("{{country}}")
                .ref_id("A")
                .datasource(DS)
                .instant()
            )
            .orientation(common_models.VizOrientation.HORIZONTAL)
            .display_mode(common_models.BarGaugeDisplayMode.BASIC)
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
            .unit("short")
            .decimals(0)
            .height(8)
            .span(8)
        )
        .with_panel(
            series(
                "Route decisions by rule and upstream",
                "Requests per second sent by an `action: route` rule to an upstream other than "
                "`default` (e.g. an EU endpoint, or a provider that serves the caller's region), by the "
                "rule and, where the metric has it, the target upstream.",
                "reqps",
                query(
                    f'sum by (rule, upstream) (rate(regiongate_decisions_total{{{SEL}, decision="route"}}[{RATE}]))',
                    "{{rule}} → {{upstream}}",
                ),
            )
        )
        .with_panel(
            series(
                "Model refusals by rule",
                "Requests refused (403 model_not_allowed_in_region) because their model is not in the "
                "deciding rule's `allow_models`, per second, by rule. They are also counted as `deny` "
                "decisions of that rule.",
                "reqps",
                query(
                    f"sum by (rule) (rate(regiongate_model_refusals_total{{{SEL}}}[{RATE}]))",
                    "{{rule}}",
                ),
            )
        )
    )

    # --- Upstreams ---------------------------------------------------------------------------
    d = (
        d.with_row(dashboard.Row("Upstreams"))
        .with_panel(
            series(
                "Upstream requests by status class",
                "Attempts sent upstream per second, by upstream, URL (`target`: its index in the "
                "upstream's `urls`) and response status class (`error`: no response came: refused "
                "connection, timeout). A request that failed over counts once per attempt.",
                "reqps",
                query(
                    "sum by (upstream, target, status_class) "
                    f"(rate(regiongate_upstream_requests_total{{{SEL}}}[{RATE}]))",
                    "{{upstream}}/{{target}} {{status_class}}",
                ),
            )
        )
        .with_panel(
            series(
                "Upstream error rate",
                "Share of forwarded requests answered 5xx or not answered at all, by upstream.",
                "percentunit",
                query(
                    "sum by (upstream) (rate(regiongate_upstream_requests_total"
                    f'{{{SEL}, status_class=~"5xx|error"}}[{RATE}]))\n'
                    f"/ sum by (upstream) (rate(regiongate_upstream_requests_total{{{SEL}}}[{RATE}]))",
                    "{{upstream}}",
                ),
            ).min(0)
        )
        .with_panel(
            percentiles(
                "regiongate_upstream_ttfb_seconds",
                "upstream",
                "Time from sending a request upstream to its response headers, by upstream: "
                "the model server's own latency to first token for streams.",
                "Upstream time to first byte (p50, p95, p99)",
            )
        )
        .with_panel(
            percentiles(
                "regiongate_request_duration_seconds",
                "decision",
                "Time from request to last response byte, by decision (the metric has no upstream "
                "label: per upstream, see time to first byte). Refusals never leave the gateway.",
                "Request duration (p50, p95, p99)",
            )
        )
        .with_panel(
            series(
                "Failovers by reason",
                "Attempts that failed before any byte reached the client and were followed by the next "
                "URL of the group or the next fallback, per second, by reason: connect_error, "
                "connect_timeout, status_502/503/504, region_refusal.",
                "reqps",
                query(f"sum by (reason) (rate(regiongate_failovers_total{{{SEL}}}[{RATE}]))", "{{reason}}"),
            ).span(8)
        )
        .with_panel(
            series(
                "Failovers by route",
                "The same failovers by where from and where to (`upstream/index`): which URL is failing "
                "and which one serves in its place.",
                "reqps",
                query(
                    f"sum by (from, to) (rate(regiongate_failovers_total{{{SEL}}}[{RATE}]))",
                    "{{from}} → {{to}}",
                ),
            ).span(8)
        )
        .with_panel(
            series(
                "Upstream region refusals",
                "Upstream answers 403 unsupported_country_region_territory, by upstream: the provider "
                "refusing the gateway's own egress address, not a client (RegiongateUpstreamRegionRefusal).",
                "short",
                query(
                    f"sum by (upstream) (increase(regiongate_upstream_region_refusals_total{{{SEL}}}[{RATE}]))",
                    "{{upstream}}",
                ),
            ).span(8)
        )
    )

    # --- Policy and data -------------------------------------------------------------------
    d = (
        d.with_row(dashboard.Row("Policy and GeoIP data"))
        .with_panel(
            table.Panel()
            .title("Policy in force")
            .description(
                "The policy each gateway enforces: file, content hash (sha256) and version. "
                "Two rows for one gateway mean its workers are mid-reload or disagree."
            )
            .datasource(DS)
            .with_target(
                instant_table(f"max by (instance, path, sha256, version) (regiongate_policy_info{{{SEL}}} == 1)")
            )
            .with_transformation(
                dashboard_models.DataTransformerConfig(
                    id_val="organize",
                    options={"excludeByName": {"Time": True, "Value": True}, "indexByName": {}, "renameByName": {}},
                )
            )
            .height(6)
            .span(12)
        )
        .with_panel(
            series(
                "Policy reloads",
                "Policy files judged, by result and role (policy, shadow); with N workers each "
                "candidate counts N times. Any `error` means a candidate was refused and the last "
                "good policy still serves.",
                "short",
                query(
                    f"sum by (result, role) (increase(regiongate_policy_reloads_total{{{SEL}}}[{RATE}]))",
                    "{{role}} {{result}}",
                ),
            ).height(6)
        )
        .with_panel(
            stat.Panel()
            .title("GeoIP database age")
            .description(
                "Time since each database in use was built (its metadata's build_epoch). "
                "MaxMind publishes weekly or twice weekly; the GeoIPDatabaseTooOld alert fires past 30 days."
            )
            .datasource(DS)
            .with_target(query(f"max by (type) (regiongate_geoip_database_age_seconds{{{SEL}}})", "{{type}}"))
            .unit("s")
            .decimals(1)
            .thresholds(
                dashboard.ThresholdsConfig()
                .mode(dashboard_models.ThresholdsMode.ABSOLUTE)
                .steps(
                    [
                        dashboard_models.Threshold(value=None, color="green"),
                        dashboard_models.Threshold(value=14 * 86400, color="orange"),
                        dashboard_models.Threshold(value=30 * 86400, color="red"),
                    ]
                )
            )
            .color_mode(common_models.BigValueColorMode.BACKGROUND)
            .graph_mode(common_models.BigValueGraphMode.NONE)
            .height(5)
            .span(12)
        )
        .with_panel(
            stat.Panel()
            .title("Time since the policy was loaded")
            .datasource(DS)
            .with_target(query(f"time() - max(regiongate_policy_last_reload_timestamp_seconds{{{SEL}}})", "loaded"))
            .unit("s")
            .decimals(0)
            .graph_mode(common_models.BigValueGraphMode.NONE)
            .height(5)
            .span(12)
        )
    )

    # --- Shared state: Redis, overrides, rate limits, audit ---------------------------------
    d = (
        d.with_row(dashboard.Row("Shared state (Redis)"))
        .with_panel(
            up_stat(
                "Redis up",
                "1 when the gateway's last Redis call succeeded, 0 while its calls fail (circuit open: "
                "overrides from the last synced copy, rate limits open or closed per the policy's "
                "redis.on_error, audit entries dropped). Gateways without --redis are left out "
                "(their regiongate_redis_up is 0 but they never call Redis).",
                query(
                    f"min by (instance) (regiongate_redis_up{{{SEL}}})\nand on (instance) {USES_REDIS}", "{{instance}}"
                ),
            )
            .graph_mode(common_models.BigValueGraphMode.AREA)
            .span(6)
        )
        .with_panel(
            series(
                "Redis errors by operation",
                "Redis calls that failed or took longer than --redis-timeout, by operation (sync: the "
                "override copy; write, publish, key, expire: override changes; ratelimit; audit). "
                "A steady trickle is a slow Redis (RegiongateRedisErrors), a wall of them a dead one "
                "(RegiongateRedisDown).",
                "short",
                query(f"sum by (op) (increase(regiongate_redis_errors_total{{{SEL}}}[{RATE}]))", "{{op}}"),
            ).span(9)
        )
        .with_panel(
            percentiles(
                "regiongate_redis_latency_seconds",
                "instance",
                "Time of Redis calls that succeeded, by gateway: rate-limit checks (one pipelined batch "
                "per event-loop turn), override syncs, audit writes. Calls past --redis-timeout are "
                "errors instead.",
                "Redis call latency (p50, p95, p99)",
            ).span(9)
        )
        .with_panel(
            series(
                "Active overrides by kind",
                "Runtime overrides in force (regiongate override add, POST /admin/overrides), by kind; the "
                "largest count among the gateways, which hold the same copy within a second when they "
                "share a Redis.",
                "short",
                query(f"max by (kind) (regiongate_overrides_active{{{SEL}}})", "{{kind}}"),
            )
            .decimals(0)
            .span(8)
        )
        .with_panel(
            series(
                "Rate-limited requests by rule",
                "Requests refused with 429 by a rule's rate_limit, per second, by rule and what the limit "
                "counts by (ip, api_key, country, subdivision, asn). RegiongateRateLimitSurge compares "
                "this with the day before.",
                "reqps",
                query(
                    f"sum by (rule, by) (rate(regiongate_rate_limited_total{{{SEL}}}[{RATE}]))",
                    "{{rule}} by {{by}}",
                ),
            ).span(8)
        )
        .with_panel(
            series(
                "Dropped audit entries by reason",
                "Entries for the Redis audit stream that were not written: redis (Redis unavailable), "
                "queue_full (the writer fell behind), oversize, error: should stay 0, each one is a gap "
                "in the audit trail. sampled: refusals past a client network's budget (a scanner), the "
                "bound working.",
                "short",
                query(f"sum by (reason) (increase(regiongate_audit_dropped_total{{{SEL}}}[{RATE}]))", "{{reason}}"),
            ).span(8)
        )
    )

    # --- Tokens and budgets (issue 19) --------------------------------------------------------
    d = (
        d.with_row(dashboard.Row("Tokens and budgets"))
        .with_panel(
            country_map(
                "Tokens by country",
                "Tokens used (input and output) by forwarded requests over the time range, by the client's "
                "country: which regions consume what. Provider-reported and estimated tokens alike "
                "(see Tokens by source).",
                f'{SEL}, kind=~"input|output"',
                "purple",
                dashboard_models.FieldColorModeId.CONTINUOUS_PURPLES,
                metric="regiongate_tokens_total",
            )
        )
        .with_panel(
            series(
                "Tokens by model and kind",
                "Tokens per second by model (one the policy names, else `other`) and kind: input and output, "
                "and the parts of them the provider reports as cached (input) and reasoning (output).",
                "short",
                query(
                    f"sum by (model, kind) (rate(regiongate_tokens_total{{{SEL}}}[{RATE}]))",
                    "{{model}} {{kind}}",
                ),
            )
        )
        .with_panel(
            series(
                "Budget use by rule and limit",
                "Tokens charged per second to each token_limit entry (rule, and its place in the rule's list), "
                "as a share of one subject's budget (tokens / per). With `by: [rule]` that is the rule's one "
                "budget; with other keys (api_key, country, ...) every subject has its own, and 2.0 means two "
                "subjects' worth. Replicas sharing a Redis share the budget, so the charges are summed over them.",
                "percentunit",
                query(
                    f"sum by (rule, limit) (rate(regiongate_budget_tokens_total{{{SEL}}}[{RATE}]))\n"
                    "/ on (rule, limit) "
                    f"max by (rule, limit) (regiongate_budget_limit_tokens_per_second{{{SEL}}})",
                    "{{rule}} #{{limit}}",
                ),
            ).span(8)
        )
        .with_panel(
            series(
                "Budget refusals by rule",
                "Requests refused with 429 by a token budget, per second, by rule and kind: rate (retried by "
                "the SDKs), quota (insufficient_quota, not retried), concurrency (max_concurrent).",
                "reqps",
                query(
                    f"sum by (rule, kind) (rate(regiongate_budget_refusals_total{{{SEL}}}[{RATE}]))",
                    "{{rule}} {{kind}}",
                ),
            ).span(8)
        )
        .with_panel(
            series(
                "Tokens by source",
                "Tokens per second as the provider reported them (usage) or estimated from the bytes relayed "
                "(estimate: an upstream that sent no usage, a client that left mid-stream, a stream cut upstream). "
                "A growing estimate share means budgets are settled on estimates.",
                "short",
                query(
                    f"sum by (source) (rate(regiongate_tokens_total{{{SEL}}}[{RATE}]))",
                    "{{source}}",
                ),
            ).span(8)
        )
        .with_panel(
            series(
                "Budget fallbacks (Redis unavailable)",
                "Token-limit and concurrency checks Redis could not answer within --redis-timeout, so the "
                "policy's redis.on_error decided instead: open lets requests through unlimited, closed refuses "
                "them. Should stay 0 (RegiongateBudgetFallbacks).",
                "short",
                query(
                    f"sum by (rule, what) (increase(regiongate_budget_fallbacks_total{{{SEL}}}[{RATE}]))",
                    "{{rule}} {{what}}",
                ),
            ).span(12)
        )
    )

    # --- Gateway health ----------------------------------------------------------------------
    d = (
        d.with_row(dashboard.Row("Gateway health"))
        .with_panel(
            series(
                "Bad requests by reason",
                "Requests refused before the policy was asked (unparseable, bad method, path or header). "
                "A burst is usually a scanner; each reason is logged at most once a minute.",
                "short",
                query(
                    f"sum by (reason) (increase(regiongate_bad_requests_total{{{SEL}}}[{RATE}]))",
                    "{{reason}}",
                ),
            ).span(8)
        )
        .with_panel(
            series(
                "Dropped access-log lines",
                "Lines the access log could not write because its destination did not keep up. Should stay 0.",
                "short",
                query(
                    f"sum by (instance) (increase(regiongate_access_log_dropped_total{{{SEL}}}[{RATE}]))",
                    "{{instance}}",
                ),
            ).span(8)
        )
        .with_panel(
            up_stat(
                "Scrape up",
                "1 when Prometheus scraped the gateway's /metrics; 0 when it is down (GatewayDown).",
                query(f"up{{{SEL}}}", "{{instance}}"),
            )
            .graph_mode(common_models.BigValueGraphMode.NONE)
            .span(8)
        )
    )
    return d


def render() -> str:
    model = build().build()
    for n, panel in enumerate(model.panels or [], 1):  # Grafana links, embeds and reports panels by id
        panel.id_val = n
    return JSONEncoder(sort_keys=True, indent=2).encode(model) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--output", default=str(OUT), help="where to write the JSON ('-': standard output)")
    args = parser.parse_args()
    text = render()
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
