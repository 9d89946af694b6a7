"""The policy and the GeoIP data change under load, in every way they change in practice.

A real gateway with two workers serves a client that never pauses, while
the policy file is rewritten again and again (in place, by rename, by a
ConfigMap symlink swap; good and bad versions alternating) and the City
database is replaced by rename. Not one request may fail, and every
response's decision must be the one the policy named in its
``x-regiongate-policy`` header makes.

The check is unambiguous by design: the two databases put the test
address in GB or FR, and each good policy decides GB and FR alike (allow
both or refuse both), so the expected decision depends only on the policy
that judged the request, whichever data file was in force. Each policy
sends an address without a country the other way, so broken geo data would
show up as a wrong decision. The access log adds the country, so the data
swaps are checked too.
"""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from support.live import (
    ADDR,
    EXPECTED_PROBLEM,
    ConfigMapDir,
    get_json,
    policy,
    tag,
    wait_workers_serve,
    write_by_rename,
    write_city_db,
    write_in_place,
)
from support.processes import GatewayFactory, Stub

MIN_SECONDS = 10.0
MIN_POLICY_WRITES = 36
GEO_SWAP_EVERY = 6  # policy writes: 6 swaps over 36 writes
PAUSE = 0.3


def sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def city_dbs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("city")
    return write_city_db(d / "gb.mmdb", "GB"), write_city_db(d / "fr.mmdb", "FR")


def test_no_request_fails_or_is_misjudged_while_policy_and_data_change(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, city_dbs: tuple[str, str]
) -> None:
    gb_db, fr_db = city_dbs
    geo_dir = tmp_path / "geoip"
    geo_dir.mkdir()
    geo = geo_dir / "GeoIP2-City.mmdb"
    shutil.copyfile(gb_db, geo)
    first = policy("allow", "v0")
    cm = ConfigMapDir(tmp_path / "configmap", "policy.yaml", first)
    expected = {tag(first): 200}
    gw = gateway(
        *("--workers", "2", "--policy", str(cm.path), "--geoip", str(geo), "--upstream", stub.url),
        *("--trusted-proxy", "127.0.0.1/32"),
    )
    wait_workers_serve(gw.admin, 2, sha(first))

    responses: list[tuple[int, str | None]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as c:  # keep-alive, like an SDK
            while not stop.is_set():
                try:
                    r = c.get(gw.url + "/v1/models", headers={"x-forwarded-for": ADDR})
                    responses.append((r.status_code, r.headers.get("x-regiongate-policy")))
                except httpx.HTTPError as e:
                    failures.append(repr(e))

    methods: Iterator[tuple[str, Callable[[str], object]]] = itertools.cycle(
        [
            ("in place", lambda text: write_in_place(cm.path, text)),
            ("rename", lambda text: write_by_rename(cm.path, text)),
            ("configmap", cm.swap),
        ]
    )
    bad_kinds = itertools.cycle(sorted(EXPECTED_PROBLEM))
    writes: dict[str, int] = {}
    geo_swaps = 0
    last_good = first
    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    started = time.monotonic()
    try:
        n = 0
        while n < MIN_POLICY_WRITES or time.monotonic() - started < MIN_SECONDS or n % 2:
            n += 1
            if n % 2:  # bad, in each of the four ways in turn
                text = policy(next(bad_kinds), f"v{n}")
            else:  # good: refusing GB and FR, then allowing them, and so on
                kind = "deny" if n % 4 == 2 else "allow"
                text = policy(kind, f"v{n}")
                expected[tag(text)] = 403 if kind == "deny" else 200
                last_good = text
            name, write = next(methods)
            write(text)
            writes[name] = writes.get(name, 0) + 1
            if n % GEO_SWAP_EVERY == 0:
                src = fr_db if geo_swaps % 2 == 0 else gb_db
                tmp = geo_dir / f".GeoIP2-City.mmdb.{n}"
                shutil.copyfile(src, tmp)
                tmp.replace(geo)  # what geoipupdate does
                geo_swaps += 1
            time.sleep(PAUSE)
        elapsed = time.monotonic() - started
        wait_workers_serve(gw.admin, 2, sha(last_good))
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert elapsed >= MIN_SECONDS and sum(writes.values()) >= 30 and geo_swaps >= 5
    assert min(writes.values()) >= 10, writes
    assert failures == []
    assert {status for status, _ in responses} <= {200, 403}, "only decisions, no errors"
    misjudged = [(status, t) for status, t in responses if expected.get(t or "") != status]
    assert misjudged == [], f"{len(misjudged)} of {len(responses)} misjudged, e.g. {misjudged[:5]}"
    served = {t for _, t in responses}
    assert len(served) >= 3, "policies changed while requests flowed"

    # The access log: the same agreement, and both data files were in force at some point.
    lines = gw.wait_log(len(responses))
    assert len(lines) >= len(responses)
    countries = {line["country"] for line in lines}
    assert countries == {"GB", "FR"}
    bad_log = [
        line
        for line in lines
        if expected.get(str(line["policy"])) != line["status"] or line["decision"] not in ("allow", "deny")
    ]
    assert bad_log == []

    status, ready = get_json(gw.admin + "/readyz")
    assert status == 200 and ready["policy"]["sha256"] == sha(last_good)
    metrics = gw.metrics()
    assert 'regiongate_policy_reloads_total{result="error",role="policy"}' in metrics
    assert 'regiongate_geoip_reloads_total{result="ok",type="GeoIP2-City"}' in metrics
    assert "Traceback" not in gw.stderr()
    print(
        f"\nchaos: {len(responses)} requests in {elapsed:.1f}s, policy writes {writes}, "
        f"{geo_swaps} GeoIP swaps, {len(served)} policies seen serving, 0 failed, 0 misjudged"
    )
