"""The Grafana dashboard: generated as committed, and every query of every panel answered by a real Prometheus.

The end-to-end test starts a gateway in front of the stub upstream, sharing
state through a real ``redis-server``, and Debian's Prometheus scraping the
gateway's control plane every second (with the alert rules loaded), drives
mixed traffic (allowed and refused callers from several countries through the
``openai`` SDK, a caller over a rule's rate limit, a country under a token budget
(let through, refused with the quota's 429, and let through unchecked while Redis is down), a
runtime override, upstream
errors, a bad request, a policy reload that works and one that is refused,
Redis killed and restarted), then reads every panel's queries out of the
dashboard file, fills in the template variables as Grafana would, and requires
each to return data. A panel added later is checked the same way, so it must
read a metric the gateway exports.

Routing (issue 8: upstream groups, ``fallback``, ``action: route``,
``allow_models``) is being built beside this dashboard. Whether the gateway
under test can route is read from its policy schema (``GATEWAY_ROUTES``):
when it can, the test also routes a caller, refuses a model, and sends the
rest through a ``default`` group whose first URL refuses connections and
whose second answers OpenAI's region refusal, with a fallback to the stub;
the routing panels (``ROUTING_PANELS``) must then return data like every
other. When it cannot, that traffic is not sent and those panels must return
nothing (``test_routing_panels_are_checked`` shows as skipped).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from support.processes import CITY, POLICIES, ROOT, GatewayFactory, Stub, free_port, run_stub, stop, wait_http
from support.redis_server import RedisServer

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "regiongate.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
TOKEN = "dashboard-test-token"
# Addresses MaxMind's City test database places in these countries (see tests/fixtures/geoip).
# UA is let through and recorded as monitor by the shipped policy.
ALLOWED = {
    "GB": "2.125.160.216",
    "SE": "89.160.20.112",
    "US": "216.160.83.56",
    "BT": "67.43.156.1",
    "UA": "2a02:d300::1",
}
REFUSED = {"CN": "175.16.199.1", "RU": "2a02:d0c0::1", "IR": "2a02:d2c0::1", "BY": "2a02:d240::1", "HK": "2001:2e0::1"}
# PH passes the policy under a rate limit of one an hour (LIMITED_RULE): after its first request, 429s.
LIMITED = {"PH": "202.196.224.1"}
LIMITED_RULE = "  - {name: limited-ph, countries: [PH], action: allow, rate_limit: {requests: 1, per: 1h, by: ip}}\n"
# DE passes the policy under a token budget (issue 19): 40 output tokens an hour for the whole country,
# each request reserving its max_tokens (16), so the first ones are let through and the rest refused
# with OpenAI's insufficient_quota; while Redis is down the budget cannot be checked (a fallback).
BUDGETED = {"DE": "2a02:d180::1"}
BUDGET_RULE = (
    "  - name: budgeted-de\n    countries: [DE]\n    action: allow\n"
    "    token_limit: [{tokens: 40, per: 1h, by: [country], count: output, kind: quota}]\n"
)
BUDGET_PANELS = {
    "Tokens by country",
    "Tokens by model and kind",
    "Budget use by rule and limit",
    "Budget refusals by rule",
    "Tokens by source",
    "Budget fallbacks (Redis unavailable)",
}
# A CN address let through by a runtime override (added through the admin API) before the policy refuses it.
OVERRIDDEN = "2001:250::1"
# With routing: a GB (London) address routed to the upstream "backup", which allows one model only.
ROUTED = "81.2.69.160"
ROUTE_RULE = (
    "  - {name: route-london, cidrs: [81.2.69.160/32], action: route, upstream: backup, allow_models: [stub-model]}\n"
)
ROUTING_PANELS = {
    "Route decisions by rule and upstream",
    "Model refusals by rule",
    "Failovers by reason",
    "Failovers by route",
    "Upstream region refusals",
}
FAILOVER_REASONS = {"connect_error", "connect_timeout", "status_502", "status_503", "status_504", "region_refusal"}


def gateway_routes() -> bool:
    """Whether the gateway in this checkout can route (issue 8): its policy schema knows upstream groups
    (``urls``), ``fallback`` and ``allow_models``."""
    schema = subprocess.run(
        [sys.executable, "-m", "gateway", "schema"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return all(f'"{key}"' in schema for key in ("urls", "fallback", "allow_models"))


GATEWAY_ROUTES = gateway_routes()
NOT_YET = "the gateway cannot route yet (issue 8): its panels are checked to be empty, their traffic not sent"
# What Grafana puts in place of its built-in variables; the scrape interval here is 1s.
BUILTINS = {"$__rate_interval": "1m", "$__range": "10m", "$__interval": "1s"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included."""
    found = []
    for p in board["panels"]:
        found.append(p)
        found.extend(p.get("panels", []))
    return found


def queries(board: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (p["title"], t.get("refId", "A"), t) for p in panels(board) for t in p.get("targets", []) if not t.get("hide")
    ]


def fill(expr: str, variables: dict[str, str]) -> str:
    for name in sorted(variables, key=len, reverse=True):  # $__rate_interval before $__range
        expr = expr.replace(name, variables[name]).replace("${" + name[1:] + "}", variables[name])
    assert "$" not in expr, f"unknown template variable left in {expr!r}"
    return expr


# --- the file ------------------------------------------------------------------------------


def test_committed_dashboard_is_the_generators_output() -> None:
    out = subprocess.run(
        [sys.executable, str(GRAFANA / "generate.py"), "-o", "-"], capture_output=True, text=True, check=True
    )
    assert out.stdout == DASHBOARD.read_text(), "run: python deploy/grafana/generate.py"


def test_dashboard_has_its_variables_and_every_panel_a_query() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query" and variables["instance"]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in panels(board)]
    assert len(set(ids)) == len(ids)
    for p in panels(board):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p.get("targets"), p["title"]
        for t in p["targets"]:
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    maps = [p for p in panels(board) if p["type"] == "geomap"]
    assert {p["title"] for p in maps} == {"Requests by country", "Refusals by country", "Tokens by country"}
    for p in maps:
        (layer,) = p["options"]["layers"]
        assert layer["location"] == {
            "mode": "lookup",
            "lookup": "country",
            "gazetteer": "public/gazetteer/countries.json",
        }
        assert "sum by (country)" in p["targets"][0]["expr"]


# --- against a real Prometheus ---------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]

    def api(self, path: str, **params: str) -> Any:
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{path} {params}: {e.code} {e.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        binary = shutil.which("prometheus")
        assert binary, "prometheus missing (Debian package prometheus; scripts/test installs it)"
        port = free_port()
        rules = tmp_path / "alerts.yml"
        shutil.copy(ALERTS, rules)
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{rules.name}]\n"
            "scrape_configs:\n"
            f"  - job_name: regiongate\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=log,
        )
        prom = Prometheus(f"http://127.0.0.1:{port}", proc)
        started.append(prom)
        wait_http(prom.url + "/-/ready", timeout=30, proc=proc)
        return prom

    try:
        yield start
    finally:
        for prom in started:
            stop(prom.proc)


PAUSE_SE = "  - {name: paused-se, countries: [SE], action: deny}\n"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SE_ALLOWED = '{ip: "89.160.20.112", expect: allow, rule: supported}'
SE_PAUSED = '{ip: "89.160.20.112", expect: deny, rule: paused-se}'


def routing_policy(text: str, dead: str, refusing: str, backup: str) -> str:
    """``text`` with routing: ``default`` a group whose first URL refuses connections and whose second
    refuses the gateway's region, falling back to ``backup``; and ROUTE_RULE."""
    upstreams = (
        "upstreams:\n"
        f'  default: {{urls: ["{dead}", "{refusing}"], fallback: [backup]}}\n'
        f'  backup: {{url: "{backup}"}}\n'
    )
    return text.replace("\nrules:\n", f"\n{upstreams}rules:\n{ROUTE_RULE}", 1)


def drive_routed(gw_url: str) -> None:
    """A routed caller with the model its rule allows, then with one it does not."""
    client = openai.OpenAI(
        base_url=gw_url + "/v1", api_key="sk-test", max_retries=0, default_headers={"X-Forwarded-For": ROUTED}
    )
    client.chat.completions.create(model="stub-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_allowed_in_region"


def drive_traffic(gw_url: str, admin: str, policy: Path, redis: RedisServer, rounds: int) -> None:
    """Allowed, refused and rate-limited callers, an override, upstream errors, bad requests (and, when
    the gateway routes, a routed caller and a refused model); halfway, a broken policy file (refused)
    and then one that refuses SE too; from two thirds, Redis killed for a round (rate limits fail open,
    audit entries are dropped) and started again."""
    refused = set(REFUSED)
    spent = Counter[str]()
    override = httpx.post(
        admin + "/admin/overrides",
        json={"action": "allow", "cidr": OVERRIDDEN + "/128", "reason": "dashboard test", "by": "test"},
        headers=AUTH,
    )
    assert override.status_code == 201, override.text
    for round_ in range(rounds):
        if round_ == rounds // 2:  # a broken file first (refused), then the fixed one
            good = policy.read_text()
            policy.write_text(good + "rules: [not, a, rule]\n")
            r = httpx.post(admin + "/admin/reload", headers=AUTH)
            assert r.status_code == 422, r.text
            text = good.replace("\nrules:\n", "\nrules:\n" + PAUSE_SE, 1)
            policy.write_text(text.replace(SE_ALLOWED, SE_PAUSED))  # its own test changes with it
            r = httpx.post(admin + "/admin/reload", headers=AUTH)
            assert r.status_code == 200 and r.json()["changed"] is True, r.text
            refused.add("SE")
        redis_down = round_ == rounds * 2 // 3
        if redis_down:
            redis.command("SAVE")  # so the override and the limit's state come back with it
            redis.kill()
            wait_redis(admin, up=False)
        for country, ip in {**ALLOWED, **REFUSED, **LIMITED}.items():
            client = openai.OpenAI(
                base_url=gw_url + "/v1", api_key="sk-test", max_retries=0, default_headers={"X-Forwarded-For": ip}
            )
            for _ in range(3 if country in LIMITED else 1 + (ord(country[0]) + round_ // 3) % 4):
                try:
                    client.chat.completions.create(model="stub-model", messages=[{"role": "user", "content": "hi"}])
                    assert country not in refused
                except openai.PermissionDeniedError as e:
                    assert country in refused and e.code == "unsupported_country_region_territory"
                except openai.RateLimitError as e:  # failing open while Redis is down: never then
                    assert country in LIMITED and not redis_down and e.code == "rate_limit_exceeded"
        spent += drive_budgeted(gw_url, redis_down)
        overridden = httpx.get(gw_url + "/v1/models", headers={"X-Forwarded-For": OVERRIDDEN})
        assert overridden.status_code == 200, overridden.text
        if GATEWAY_ROUTES:
            drive_routed(gw_url)
        if redis_down:
            redis.start()
            wait_redis(admin, up=True)
        with httpx.Client() as raw:
            for status, country in (("500", "GB"), ("503", "US"), ("429", "BT")):
                headers = {"X-Forwarded-For": ALLOWED[country], "x-stub-status": status}
                assert raw.get(gw_url + "/v1/models", headers=headers).status_code == int(status)
            r = raw.get(gw_url + "/v1/%2e%2e/admin", headers={"X-Forwarded-For": ALLOWED["US"]})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_path"
        time.sleep(1.5)  # spread over several scrapes, so rates have points to work with
    # The budget let some through and refused the rest while Redis was up; with it down, the budget
    # could not be checked and the policy's redis.on_error (open) let them through.
    assert spent["allowed"] and spent["refused"] and spent["fallback"], spent


def drive_budgeted(gw_url: str, redis_down: bool) -> Counter[str]:
    """Three requests from the token-budgeted country: let through while the budget lasts, then refused
    with the quota's 429 (not retried); all let through while Redis is down (on_error: open)."""
    client = openai.OpenAI(
        base_url=gw_url + "/v1", api_key="sk-test", max_retries=0, default_headers={"X-Forwarded-For": BUDGETED["DE"]}
    )
    seen = Counter[str]()
    for _ in range(3):
        try:
            reply = client.chat.completions.create(
                model="stub-model", max_tokens=16, messages=[{"role": "user", "content": "how many tokens?"}]
            )
            assert reply.usage is not None and reply.usage.completion_tokens <= 16
            seen["fallback" if redis_down else "allowed"] += 1
        except openai.RateLimitError as e:
            assert not redis_down and e.code == "insufficient_quota", (redis_down, e.code)
            seen["refused"] += 1
    return seen


def wait_redis(admin: str, up: bool) -> None:
    """Until the gateway's /readyz says its Redis circuit is closed (up) or open (down)."""
    want = "closed" if up else "open"
    deadline = time.monotonic() + 30
    while httpx.get(admin + "/readyz").json()["overrides"]["circuit"] != want:
        assert time.monotonic() < deadline, f"the gateway never saw Redis {'up' if up else 'down'}"
        time.sleep(0.1)


def wait_scraped(prom: Prometheus, instance: str) -> None:
    deadline = time.monotonic() + 30
    while not prom.api("/api/v1/query", query=f'up{{instance="{instance}"}} == 1')["result"]:
        assert time.monotonic() < deadline, "Prometheus never scraped the gateway"
        time.sleep(0.2)


def evaluate(prom: Prometheus, expr: str, instant: bool) -> list[dict[str, Any]]:
    now = time.time()
    if instant:
        return prom.api("/api/v1/query", query=expr, time=f"{now}")["result"]  # type: ignore[no-any-return]
    return prom.api(  # type: ignore[no-any-return]
        "/api/v1/query_range", query=expr, start=f"{now - 120}", end=f"{now}", step="1"
    )["result"]


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one series with a real number (histogram_quantile of nothing is NaN)."""
    values = [v for r in result for _, v in ([r["value"]] if "value" in r else r["values"])]
    return any(math.isfinite(float(v)) for v in values)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def refusing_upstream() -> Iterator[Stub | None]:
    """With routing: a stub answering every request with OpenAI's refusal of the gateway's region."""
    if not GATEWAY_ROUTES:
        yield None
        return
    with run_stub("--refuse-region") as s:  # support.processes' run_stub takes stub options since routing
        yield s


@pytest.mark.skipif(not GATEWAY_ROUTES, reason=NOT_YET)
def test_routing_panels_are_checked(stub: Stub, tmp_path: Path) -> None:
    """The routing traffic's policy is one the gateway accepts, and every routing panel is on the dashboard."""
    policy = tmp_path / "policy.yaml"
    shipped = (POLICIES / "openai-supported-country-only.yaml").read_text()
    policy.write_text(routing_policy(shipped, f"http://127.0.0.1:{free_port()}", stub.url, stub.url))
    out = subprocess.run([sys.executable, "-m", "gateway", "check", str(policy)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert {p["title"] for p in panels(dashboard())} >= ROUTING_PANELS


def test_every_panel_query_returns_data(
    gateway: GatewayFactory,
    stub: Stub,
    refusing_upstream: Stub | None,
    prometheus_for: Any,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.yaml"
    text = (POLICIES / "openai-supported-country-only.yaml").read_text()
    upstream = ["--upstream", stub.url]
    if refusing_upstream is not None:  # the gateway routes: the upstreams are in the policy
        text, upstream = routing_policy(text, f"http://127.0.0.1:{free_port()}", refusing_upstream.url, stub.url), []
    policy.write_text(text.replace("\nrules:\n", "\nrules:\n" + LIMITED_RULE + BUDGET_RULE, 1))
    gw = gateway(
        *("--policy", str(policy), "--geoip", CITY, *upstream, "--trusted-proxy", "127.0.0.1/32"),
        *("--redis", redis_server.url),
        # The traffic's reloads are POST /admin/reload, each asserted: a file watcher would race them
        # and load the edit first, so that the POST answers changed:false.
        "--no-watch",
        env={"REGIONGATE_ADMIN_TOKEN": TOKEN},
    )
    instance = f"127.0.0.1:{gw.admin_port}"
    prom = prometheus_for(instance)
    wait_scraped(prom, instance)  # so that the counters' first samples come before the traffic
    png = Path(os.environ.get("REGIONGATE_DASHBOARD_PNG") or tmp_path / "dashboard.png")
    # A few rounds are enough for the queries; the docs' picture gets a couple of minutes.
    drive_traffic(gw.url, gw.admin, policy, redis_server, rounds=60 if "REGIONGATE_DASHBOARD_PNG" in os.environ else 3)

    board = dashboard()
    # As Grafana fills a regex variable into a PromQL string: escaped for the regex, then for the string.
    variables = {"$instance": re.escape(instance).replace("\\", "\\\\"), "$datasource": "prometheus", **BUILTINS}
    todo = {(title, ref): (fill(t["expr"], variables), bool(t.get("instant"))) for title, ref, t in queries(board)}
    assert len(todo) >= 21
    assert {title for title, _ in todo} >= ROUTING_PANELS | BUDGET_PANELS
    # Without routing its panels cannot have data: they are asked below, and must have none.
    later = {key: todo.pop(key) for key in list(todo) if key[0] in ROUTING_PANELS and not GATEWAY_ROUTES}
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    deadline = time.monotonic() + 60  # scrapes are every second; this only bounds a broken setup
    while True:
        results = {key: evaluate(prom, expr, instant) for key, (expr, instant) in todo.items()}
        empty = sorted(key for key, result in results.items() if not has_data(result))
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert empty == [], "panels whose query returned no data:\n" + "\n".join(
        f"  {title} [{ref}]: {todo[(title, ref)][0]}" for title, ref in empty
    )
    # ... and a panel on a metric the gateway does not export would have failed that check.
    absent = f'sum(rate(regiongate_no_such_metric_total{{instance="{instance}"}}[1m]))'
    assert not has_data(evaluate(prom, absent, False))
    for (title, _ref), (expr, instant) in later.items():
        assert not has_data(evaluate(prom, expr, instant)), f"{title} has data: drop it from ROUTING_PANELS"

    # Bounded labels: after all that traffic, no label holds an address, a key or a path.
    series = prom.api("/api/v1/series", **{"match[]": '{__name__=~"regiongate_.*"}', "start": f"{time.time() - 900}"})
    never = [*ALLOWED.values(), *REFUSED.values(), *LIMITED.values(), *BUDGETED.values(), OVERRIDDEN, ROUTED]
    never += [TOKEN, "sk-test", "/v1", "%2e", "stub-model", "gpt-4o", "127.0.0.1:"]
    # A model is a label only as the policy names it (with routing, ROUTE_RULE's allow_models), else "other".
    named = {"other", *(["stub-model"] if GATEWAY_ROUTES else [])}
    for labels in series:
        for name, value in labels.items():
            if name == "model":
                assert value in named, labels
            elif name not in ("__name__", "instance", "job", "le"):
                assert not any(bad in value for bad in never), labels
    assert {s["country"] for s in series if "country" in s} <= {*ALLOWED, *REFUSED, *LIMITED, *BUDGETED}
    assert len(series) < 300

    # The instance variable's own query lists this gateway.
    (var,) = [v for v in board["templating"]["list"] if v["name"] == "instance"]
    metric = re.fullmatch(r"label_values\((\w+), instance\)", var["query"])
    assert metric, var["query"]
    assert instance in prom.api("/api/v1/label/instance/values", **{"match[]": metric.group(1)})

    # What the panels show is what was sent: every country in its map.
    def countries(title: str) -> set[str]:
        return {r["metric"]["country"] for r in results[(title, "A")]}

    assert countries("Requests by country") == set(ALLOWED) | set(REFUSED) | set(LIMITED) | set(BUDGETED)
    # Tokens come from forwarded requests whose usage was read: the budgeted country's at least.
    assert "DE" in countries("Tokens by country") <= set(ALLOWED) | set(LIMITED) | set(BUDGETED)
    # With routing, the routed GB caller's refused model is a refusal too (decision deny, its rule).
    assert countries("Refusals by country") == set(REFUSED) | {"SE"} | ({"GB"} if GATEWAY_ROUTES else set())
    policy_rows = results[("Policy in force", "A")]
    assert [r["metric"]["sha256"] for r in policy_rows] == [gw_sha(gw.admin)]
    reloads = {(r["metric"]["role"], r["metric"]["result"]) for r in results[("Policy reloads", "A")]}
    assert reloads == {("policy", "ok"), ("policy", "error")}
    limited = {(r["metric"]["rule"], r["metric"]["by"]) for r in results[("Rate-limited requests by rule", "A")]}
    assert limited == {("limited-ph", "ip")}
    assert {r["metric"]["reason"] for r in results[("Dropped audit entries by reason", "A")]} == {"redis"}
    overrides = {r["metric"]["kind"]: r["values"][-1][1] for r in results[("Active overrides by kind", "A")]}
    assert overrides == {"api_key": "0", "cidr": "1", "subdivision": "0", "country": "0"}
    budget = {(r["metric"]["rule"], r["metric"]["kind"]) for r in results[("Budget refusals by rule", "A")]}
    assert budget == {("budgeted-de", "quota")}
    fallbacks = {
        (r["metric"]["rule"], r["metric"]["what"]) for r in results[("Budget fallbacks (Redis unavailable)", "A")]
    }
    assert fallbacks == {("budgeted-de", "tokens")}
    (use,) = results[("Budget use by rule and limit", "A")]
    assert (use["metric"]["rule"], use["metric"]["limit"]) == ("budgeted-de", "0")
    (redis_up,) = results[("Redis up", "A")]
    assert [v for _, v in redis_up["values"]][-1] == "1" and "0" in {v for _, v in redis_up["values"]}
    if GATEWAY_ROUTES:

        def shown(title: str, *names: str) -> set[tuple[str, ...]]:
            return {tuple(r["metric"].get(n, "") for n in names) for r in results[(title, "A")]}

        assert shown("Route decisions by rule and upstream", "rule") == {("route-london",)}
        assert shown("Model refusals by rule", "rule") == {("route-london",)}
        assert shown("Upstream region refusals", "upstream") == {("default",)}
        reasons = {r for (r,) in shown("Failovers by reason", "reason")}
        assert "region_refusal" in reasons and reasons <= FAILOVER_REASONS, reasons
        assert ("default/1", "backup/0") in shown("Failovers by route", "from", "to")

    # Prometheus loaded the alert rules too, and none of them is firing for this healthy gateway
    # (the refused reload is the exception: it is what RegiongatePolicyReloadFailing is for).
    groups = prom.api("/api/v1/rules")["groups"]
    loaded = {r["name"]: r["state"] for g in groups for r in g["rules"]}
    assert set(loaded) >= {"RegiongateDown", "RegiongatePolicyReloadFailing", "RegiongateUpstreamErrors"}
    assert loaded["RegiongateDown"] == "inactive"

    # The docs' picture (docs/dashboard.png): drawn from this Prometheus by the repository's script.
    drawn = subprocess.run(
        [
            sys.executable,
            str(GRAFANA / "render_png.py"),
            *("--prometheus", prom.url, "--out", str(png), "--instance", variables["$instance"]),
            *("--range", "180", "--rate-interval", "15s"),
        ],
        capture_output=True,
        text=True,
    )
    assert drawn.returncode == 0, drawn.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def gw_sha(admin: str) -> str:
    with urllib.request.urlopen(admin + "/readyz", timeout=5) as r:
        return str(json.loads(r.read())["policy"]["sha256"])
