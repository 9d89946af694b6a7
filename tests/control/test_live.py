"""Live reload of the policy, the shadow policy and GeoIP data, in a running gateway process.

Every test starts the real gateway (and stub upstream) and changes files
the way operators and their tools do; decisions are read from real
responses and their ``x-regiongate-policy`` header.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.live.watch import watch_set
from gateway.runtime import format_duration, parse_duration
from support.live import (
    ADDR,
    BUILD_EPOCH,
    EXPECTED_PROBLEM,
    TOKEN,
    TRUST,
    ConfigMapDir,
    ask,
    get_json,
    metric,
    policy,
    sha,
    tag,
    wait_until,
    wait_workers_serve,
    write_by_rename,
    write_city_db,
    write_in_place,
)
from support.processes import CITY, COUNTRY, GatewayFactory, Stub, run_stub


@pytest.fixture(scope="module")
def city_dbs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two City databases with the same build time: ADDR in GB, and ADDR in FR."""
    d = tmp_path_factory.mktemp("city")
    return write_city_db(d / "gb.mmdb", "GB"), write_city_db(d / "fr.mmdb", "FR")


def replace_by_rename(src: str, dst: Path) -> None:
    """What geoipupdate does: a temporary file beside the target, renamed over it."""
    tmp = dst.with_name(f".{dst.name}.tmp{time.monotonic_ns()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# --- the policy file ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["in_place", "rename", "configmap"])
def test_policy_reloads_whichever_way_the_file_is_replaced(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, method: str
) -> None:
    allow, deny, allow2 = policy("allow", "a"), policy("deny", "b"), policy("allow", "c")
    replace: Callable[[Path, str], None]
    if method == "configmap":
        cm = ConfigMapDir(tmp_path / "cm", "policy.yaml", allow)
        path = cm.path
        replace = lambda _p, text: cm.swap(text)  # noqa: E731
    else:
        path = tmp_path / "policy.yaml"
        path.write_text(allow)
        replace = write_in_place if method == "in_place" else write_by_rename
    gw = gateway("--policy", str(path), "--geoip", CITY, "--upstream", stub.url, *TRUST)
    assert ask(gw.url) == (200, tag(allow))

    replace(path, deny)
    wait_until(lambda: ask(gw.url) == (403, tag(deny)), "the deny policy serving")
    _, ready = get_json(gw.admin + "/readyz")
    assert ready["policy"]["sha256"] == sha(deny) and ready["policy"]["version"] == "b"
    assert ready["policy"]["reload"]["error"] is None

    replace(path, allow2)  # and again: a ConfigMap swap moved the watch to a new directory
    wait_until(lambda: ask(gw.url) == (200, tag(allow2)), "the second allow policy serving")

    text = gw.metrics()
    assert metric(text, "regiongate_policy_reloads_total", result="ok", role="policy") == 2
    assert metric(text, "regiongate_policy_info", sha256=sha(allow2), version="c") == 1
    assert metric(text, "regiongate_policy_info", sha256=sha(deny), version="b") in (None, 0)
    assert re.search(r"^regiongate_policy_last_reload_timestamp_seconds 1\.\d+e\+09$", text, re.M)
    # The access log names the policy that judged each request. It is written by a thread
    # behind the requests, so wait until the last policy's requests have reached it.
    wait_until(
        lambda: any(line["policy"] == tag(allow2) for line in gw.log_lines()), "the last request in the access log"
    )
    logged = [(line["decision"], line["policy"]) for line in gw.log_lines()]
    runs = [pair for i, pair in enumerate(logged) if i == 0 or logged[i - 1] != pair]
    assert runs == [("allow", tag(allow)), ("deny", tag(deny)), ("allow", tag(allow2))]


def test_openai_sdk_sees_which_policy_answered(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    import openai

    allow, deny = policy("allow", "a"), policy("deny", "b")
    path = tmp_path / "policy.yaml"
    path.write_text(allow)
    gw = gateway("--policy", str(path), "--geoip", CITY, "--upstream", stub.url, *TRUST)
    client = openai.OpenAI(
        base_url=gw.url + "/v1", api_key="sk-test", max_retries=0, default_headers={"X-Forwarded-For": ADDR}
    )
    assert client.models.with_raw_response.list().headers["x-regiongate-policy"] == tag(allow)
    write_by_rename(path, deny)
    wait_until(lambda: ask(gw.url)[1] == tag(deny), "the deny policy serving")
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "unsupported_country_region_territory"
    assert refused.value.response.headers["x-regiongate-policy"] == tag(deny)


@pytest.mark.parametrize("kind", sorted(EXPECTED_PROBLEM))
def test_a_bad_candidate_leaves_the_last_good_policy_serving(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, kind: str
) -> None:
    good, bad, fixed = policy("allow", "good"), policy(kind, "bad"), policy("deny", "fixed")
    path = tmp_path / "policy.yaml"
    path.write_text(good)
    gw = gateway("--policy", str(path), "--geoip", CITY, "--upstream", stub.url, *TRUST)

    write_by_rename(path, bad)
    status, ready = wait_until(
        lambda: (r := get_json(gw.admin + "/readyz"))[1]["policy"]["reload"]["error"] and r, "the refusal reported"
    )
    problem = f"{path}{EXPECTED_PROBLEM[kind]}"
    assert status == 200 and ready["ready"] is True  # a bad edit does not take traffic down
    assert ready["policy"]["reload"]["error"].startswith(problem)
    assert ready["policy"]["sha256"] == sha(good)
    assert any(w.startswith(f"policy reload refused, still serving sha256:{tag(good)}") for w in ready["warnings"])
    assert ask(gw.url) == (200, tag(good))
    assert metric(gw.metrics(), "regiongate_policy_reloads_total", result="error", role="policy") == 1

    write_in_place(path, bad)  # the same bad text again: already reported, not logged again
    write_by_rename(path, fixed)
    wait_until(lambda: ask(gw.url) == (403, tag(fixed)), "the fixed policy serving")
    _, ready = get_json(gw.admin + "/readyz")
    assert ready["policy"]["reload"]["error"] is None and not any("refused" in w for w in ready["warnings"])
    err = gw.stderr()
    assert err.count(problem) == 1, err
    assert "Traceback" not in err


def test_with_workers_a_bad_file_is_logged_once(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    good, bad = policy("allow", "good"), policy("schema-error", "bad")
    path = tmp_path / "policy.yaml"
    path.write_text(good)
    gw = gateway("--policy", str(path), "--geoip", CITY, "--upstream", stub.url, *TRUST, "--workers", "2")
    wait_workers_serve(gw.admin, 2, sha(good))
    write_by_rename(path, bad)
    errors: dict[int, str | None] = {}

    def both_refused() -> bool:
        _, ready = get_json(gw.admin + "/readyz")
        errors[ready["pid"]] = ready["policy"]["reload"]["error"]
        return len(errors) == 2 and all(errors.values())

    wait_until(both_refused, "both workers refused the file", attempts=4000, pause=0)
    problem = f"{path}{EXPECTED_PROBLEM['schema-error']}"
    assert gw.stderr().count(problem) == 1
    assert ask(gw.url) == (200, tag(good))


def test_sighup_reloads_every_worker(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    allow, deny = policy("allow", "a"), policy("deny", "b")
    path = tmp_path / "policy.yaml"
    path.write_text(allow)
    # --no-watch: the file changes unnoticed, so only the signal can make the workers reload
    gw = gateway("--policy", str(path), "--geoip", CITY, "--upstream", stub.url, *TRUST, "--workers", "2", "--no-watch")
    wait_workers_serve(gw.admin, 2, sha(allow))  # both workers up before the file changes
    write_in_place(path, deny)
    gw.proc.send_signal(signal.SIGHUP)
    wait_workers_serve(gw.admin, 2, sha(deny))
    assert ask(gw.url) == (403, tag(deny))
    assert gw.proc.poll() is None


def test_every_worker_serves_a_change_and_how_soon(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    """The watcher in each worker: every pid's /readyz agrees on the new hash. Prints the latency seen."""
    cm = ConfigMapDir(tmp_path / "cm", "policy.yaml", policy("allow", "r0"))
    gw = gateway("--policy", str(cm.path), "--geoip", CITY, "--upstream", stub.url, *TRUST, "--workers", "2")
    wait_workers_serve(gw.admin, 2, sha(policy("allow", "r0")))
    methods: dict[str, Callable[[str], None]] = {
        "in place": lambda text: write_in_place(cm.path, text),
        "rename": lambda text: write_by_rename(cm.path, text),
        "configmap": cm.swap,
    }
    latencies: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(1, 10):
        name = list(methods)[i % 3]
        text = policy("deny" if i % 2 else "allow", f"r{i}")
        written = time.monotonic()
        methods[name](text)
        seen = wait_workers_serve(gw.admin, 2, sha(text))
        latencies[name].append(round(time.monotonic() - written, 3))
        assert len(seen) == 2 and set(seen.values()) == {sha(text)}
    print(f"\nreload latency, change on disk -> both workers serving it (s): {latencies}")


# --- the admin API -------------------------------------------------------------------


def test_admin_api_is_absent_without_a_token(gateway: GatewayFactory, stub: Stub) -> None:
    gw = gateway("--upstream", stub.url)
    assert "admin API disabled" in gw.stderr()
    for method, route in [("GET", "/admin/policy"), ("POST", "/admin/reload")]:
        for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
            status, body = get_json(gw.admin + route, headers, method)
            assert status == 404 and body == {"detail": "Not Found"}


def test_admin_api_with_right_wrong_and_no_token(gateway: GatewayFactory, stub: Stub, tmp_path: Path) -> None:
    allow, deny, bad = policy("allow", "a"), policy("deny", "b"), policy("schema-error", "c")
    path = tmp_path / "policy.yaml"
    path.write_text(allow)
    gw = gateway(
        *("--policy", str(path), "--geoip", CITY, "--upstream", stub.url, *TRUST, "--workers", "2", "--no-watch"),
        env={"REGIONGATE_ADMIN_TOKEN": TOKEN},
    )
    wait_workers_serve(gw.admin, 2, sha(allow))  # both workers up before the file changes
    right = {"Authorization": f"Bearer {TOKEN}"}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ):
        for method, route in [("GET", "/admin/policy"), ("POST", "/admin/reload")]:
            status, _ = get_json(gw.admin + route, headers, method)
            assert status == 401, (headers, route)

    status, doc = get_json(gw.admin + "/admin/policy", right)
    assert status == 200
    assert doc["text"] == allow and doc["sha256"] == sha(allow) and doc["version"] == "a"
    assert doc["path"] == str(path) and doc["shadow"] is None and doc["loaded_at"].endswith("+00:00")

    write_in_place(path, deny)
    status, _ = get_json(gw.admin + "/admin/reload", {"Authorization": "Bearer wrong"}, "POST")
    assert status == 401
    wait_workers_serve(gw.admin, 2, sha(allow))  # a refused caller reloaded nothing, in any worker

    status, result = get_json(gw.admin + "/admin/reload", right, "POST")
    assert status == 200, result
    assert result["ok"] is True and result["changed"] is True and result["sha256"] == sha(deny)
    wait_workers_serve(gw.admin, 2, sha(deny))  # the others through the supervisor

    write_in_place(path, bad)
    status, result = get_json(gw.admin + "/admin/reload", right, "POST")
    assert status == 422 and result["ok"] is False and result["sha256"] == sha(deny)
    assert result["error"].startswith(f"{path}{EXPECTED_PROBLEM['schema-error']}")
    assert ask(gw.url) == (403, tag(deny))
    # The token is a secret: never in what the gateway shows.
    assert TOKEN not in gw.stderr() and TOKEN not in gw.metrics()
    assert TOKEN not in str(get_json(gw.admin + "/readyz")[1])


# --- the shadow policy ---------------------------------------------------------------


def test_shadow_policy_is_judged_and_recorded_never_enforced(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path
) -> None:
    active, shadow = policy("allow", "live"), policy("deny", "candidate")
    active_path, shadow_path = tmp_path / "policy.yaml", tmp_path / "candidate.yaml"
    active_path.write_text(active)
    shadow_path.write_text(shadow)
    gw = gateway(
        "--policy",
        str(active_path),
        "--shadow-policy",
        str(shadow_path),
        "--geoip",
        CITY,
        "--upstream",
        stub.url,
        *TRUST,
        env={"REGIONGATE_ADMIN_TOKEN": TOKEN},
    )
    assert "shadow policy" in gw.stderr()
    assert ask(gw.url) == (200, tag(active))  # the shadow would refuse; it is not enforced
    assert ask(gw.url, "216.160.83.56") == (403, tag(active))
    lines = gw.wait_log(2)
    assert lines[0]["shadow_decision"] == {"decision": "deny", "rule": "gb-fr-refused", "policy": tag(shadow)}
    # The US address: active refuses (default deny), shadow allows (default allow): a disagreement too.
    assert lines[1]["shadow_decision"] == {"decision": "allow", "rule": "defaults.action", "policy": tag(shadow)}
    text = gw.metrics()
    assert (
        metric(text, "regiongate_shadow_disagreements_total", active="allow", shadow="deny", rule="gb-fr-refused") == 1
    )
    assert metric(text, "regiongate_shadow_policy_info", sha256=sha(shadow), version="candidate") == 1
    _, ready = get_json(gw.admin + "/readyz")
    assert ready["shadow_policy"]["sha256"] == sha(shadow)

    # Reloaded like the main policy; a bad shadow is refused without touching the active one.
    agreeing = policy("allow", "candidate-2")
    write_by_rename(shadow_path, agreeing)
    wait_until(lambda: get_json(gw.admin + "/readyz")[1]["shadow_policy"]["sha256"] == sha(agreeing), "shadow reload")
    assert ask(gw.url) == (200, tag(active))
    assert "shadow_decision" not in gw.wait_log(3)[2]
    write_by_rename(shadow_path, policy("yaml-error", "x"))
    _, ready = wait_until(
        lambda: (r := get_json(gw.admin + "/readyz"))[1]["shadow_policy"]["reload"]["error"] and r, "shadow refusal"
    )
    assert ready["policy"]["sha256"] == sha(active) and ready["shadow_policy"]["sha256"] == sha(agreeing)
    assert metric(gw.metrics(), "regiongate_policy_reloads_total", result="error", role="shadow") == 1
    # The admin API shows both, and a reload reports the shadow's refusal beside the active policy's success.
    right = {"Authorization": f"Bearer {TOKEN}"}
    _, doc = get_json(gw.admin + "/admin/policy", right)
    assert doc["text"] == active and doc["shadow"]["text"] == agreeing and doc["shadow"]["path"] == str(shadow_path)
    status, result = get_json(gw.admin + "/admin/reload", right, "POST")
    assert status == 422 and result["ok"] is True and result["shadow"]["ok"] is False
    assert result["shadow"]["error"].startswith(f"{shadow_path}:3: YAML syntax error")


# --- upstreams change with the policy ----------------------------------------------------


def _established_to(port: int) -> int:
    """Established TCP connections to 127.0.0.1:port, from /proc/net/tcp."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if remote == f"0100007F:{port:04X}" and state == "01":
            count += 1
    return count


def test_upstreams_change_with_the_policy(gateway: GatewayFactory, tmp_path: Path) -> None:
    def text(url: str, key_env: str | None, revision: str) -> str:
        key = f", api_key_env: {key_env}" if key_env else ""
        return f"upstreams:\n  default: {{url: '{url}'{key}}}\n" + policy("allow", revision)

    with run_stub() as first, run_stub() as second:
        path = tmp_path / "policy.yaml"
        path.write_text(text(first.url, None, "one"))
        gw = gateway("--policy", str(path), "--geoip", CITY, *TRUST, env={"RG_TEST_SECOND_KEY": "sk-second"})
        r = httpx.get(gw.url + "/echo/x", headers={"x-forwarded-for": ADDR})
        assert r.json()["host"] == f"127.0.0.1:{first.port}"
        assert _established_to(first.port) >= 1  # kept alive in the pool

        # A new upstream with a key from a new variable; the old host's pooled connection is closed.
        new = text(second.url, "RG_TEST_SECOND_KEY", "two")
        write_by_rename(path, new)
        wait_until(lambda: ask(gw.url, path="/echo/x")[1] == tag(new), "the new upstream serving")
        r = httpx.get(gw.url + "/echo/x", headers={"x-forwarded-for": ADDR, "Authorization": "Bearer client"})
        body = r.json()
        assert body["host"] == f"127.0.0.1:{second.port}"
        assert ["Authorization", "Bearer sk-second"] in body["headers"]
        # Closed as soon as no request uses them (here: at once), not when aiohttp's 30 s
        # keep-alive expiry would close them; the bound below (10 s) tells the two apart.
        wait_until(lambda: _established_to(first.port) == 0, "removed upstream's connection closed", 50, 0.2)

        # A key variable that is not set: refused, the running upstream stays.
        write_by_rename(path, text(first.url, "RG_TEST_NOT_SET", "three"))
        _, ready = wait_until(
            lambda: (r := get_json(gw.admin + "/readyz"))[1]["policy"]["reload"]["error"] and r, "refusal"
        )
        assert "api_key_env 'RG_TEST_NOT_SET' is not set" in ready["policy"]["reload"]["error"]
        assert ready["upstreams"] == {"default": second.url}
        assert "sk-second" not in str(ready) and "sk-second" not in gw.stderr()


# --- GeoIP data --------------------------------------------------------------------------


def test_geoip_database_replaced_by_rename(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, city_dbs: tuple[str, str]
) -> None:
    gb_db, fr_db = city_dbs
    live = tmp_path / "GeoIP2-City.mmdb"
    shutil.copyfile(gb_db, live)
    path = tmp_path / "policy.yaml"
    path.write_text("rules:\n  - {name: gb, countries: [GB], action: allow}\nversion: 1\n")
    gw = gateway("--policy", str(path), "--geoip", str(live), "--upstream", stub.url, *TRUST)
    assert ask(gw.url)[0] == 200

    replace_by_rename(fr_db, live)
    wait_until(lambda: ask(gw.url)[0] == 403, "the FR data serving")
    assert metric(gw.metrics(), "regiongate_geoip_reloads_total", type="GeoIP2-City", result="ok") == 1

    older = write_city_db(tmp_path / "older.mmdb", "GB", epoch=BUILD_EPOCH - 86400)
    bad_files = {
        COUNTRY: "database type 'GeoIP2-Country' differs from the running 'GeoIP2-City'",
        str(Path(CITY).parent / "bad-data" / "GeoIP2-City-Test-Broken-Double-Format.mmdb"): "corrupt MaxMind DB file",
        older: f"build_epoch {BUILD_EPOCH - 86400} is older than the running one's ({BUILD_EPOCH})",
    }
    for bad, problem in bad_files.items():
        replace_by_rename(bad, live)

        def refused(problem: str = problem) -> Any:
            r = get_json(gw.admin + "/readyz")
            return r[1]["warnings"] and any(problem in w for w in r[1]["warnings"]) and r

        _, ready = wait_until(
            refused,
            f"refusal: {problem}",
        )
        assert ready["ready"] is True and ready["geo"][0]["type"] == "GeoIP2-City"
        assert ask(gw.url)[0] == 403  # the FR data still serving
    assert gw.stderr().count("GeoIP reload refused") == len(bad_files)

    replace_by_rename(gb_db, live)
    wait_until(lambda: ask(gw.url)[0] == 200, "the GB data serving again")
    _, ready = get_json(gw.admin + "/readyz")
    assert not any("GeoIP reload refused" in w for w in ready["warnings"])


def test_stale_geoip_data(gateway: GatewayFactory, stub: Stub) -> None:
    # MaxMind's test City database was built long before today.
    gw = gateway("--geoip", CITY, "--geoip-max-age", "1d", "--upstream", stub.url)
    status, ready = get_json(gw.admin + "/readyz")
    assert status == 200 and ready["geo_stale"] is True
    assert any("is stale" in w and "past --geoip-max-age 1d" in w for w in ready["warnings"])
    age = metric(gw.metrics(), "regiongate_geoip_database_age_seconds", type="GeoIP2-City")
    assert age is not None and age > 86400

    strict = gateway(
        "--geoip", CITY, "--geoip-max-age", "1d", "--stale-geoip-not-ready", "--upstream", stub.url, wait=False
    )
    wait_until(lambda: _status(strict.admin + "/healthz") == 200, "strict gateway alive")
    status, ready = get_json(strict.admin + "/readyz")
    assert status == 503 and ready["geo_stale"] is True

    fresh = gateway("--geoip", CITY, "--geoip-max-age", "36500d", "--stale-geoip-not-ready", "--upstream", stub.url)
    assert get_json(fresh.admin + "/readyz")[1]["geo_stale"] is False


def _status(url: str) -> int | None:
    try:
        return get_json(url)[0]
    except OSError:
        return None


def test_bad_max_age_is_a_clear_error(gateway: GatewayFactory) -> None:
    gw = gateway("--geoip-max-age", "soon", wait=False)
    assert gw.proc.wait(timeout=15) == 2
    assert "--geoip-max-age: 'soon' is not a duration" in gw.stderr()


# --- small pure pieces -------------------------------------------------------------------


def test_durations() -> None:
    assert parse_duration("45d") == 45 * 86400 and parse_duration("12h") == 43200 and parse_duration("90") == 90
    assert format_duration(45 * 86400) == "45d" and format_duration(43200) == "12h" and format_duration(1.5) == "1.5s"
    for bad in ("", "d", "-1d", "0", "soon"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_watch_set_follows_symlinks(tmp_path: Path) -> None:
    cm = ConfigMapDir(tmp_path / "cm", "policy.yaml", "version: 1\n")
    dirs, names = watch_set([str(cm.path)])
    real = Path(os.path.realpath(cm.path))
    assert dirs == {str(tmp_path / "cm"), str(real.parent)}
    assert names == {"policy.yaml"}
