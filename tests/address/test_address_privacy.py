"""With ``--log-address hashed`` (or ``truncated``) no client address is kept: not in Redis, not on stderr.

The access log and the audit stream already wrote addresses that way; the
rate-limit keys in Redis (``by: ip``) and the gateway's own log lines (a
failed GeoIP lookup, and maxminddb's message with it) did not.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.accesslog import AddressRedactor, redact_logs
from support.overrides import limited_policy, overrides_gateway, wait_for
from support.processes import GatewayFactory, Stub
from support.redis_server import RedisServer, running

GB4 = "2.125.160.216"
GB6 = "2a02:d3c0::1234"  # GB in MaxMind's City test data
SE4 = "89.160.20.112"
RAW = (GB4, GB6, str(ipaddress.ip_address(GB6).exploded), SE4)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running(tmp_path_factory.mktemp("redis")) as server:
        yield server


def limited(gateway: GatewayFactory, stub: Stub, tmp_path: Path, url: str, prefix: str, *args: str):  # type: ignore[no-untyped-def]
    path = tmp_path / f"limited-{time.monotonic_ns()}.yaml"
    # Closed, and time enough: a Redis call that a busy machine delays is a 503 here, never a request let
    # through uncounted, which would make the count below wrong.
    path.write_text(limited_policy(3, by="ip", on_error="closed"))
    return overrides_gateway(
        gateway, stub, "--redis", url, "--redis-prefix", prefix, "--redis-timeout", "2", "--policy", str(path), *args
    )


def status(gw, ip: str) -> int:  # type: ignore[no-untyped-def]
    return httpx.get(gw.url + "/v1/models", headers={"X-Forwarded-For": ip}, timeout=10).status_code


def everything_in_redis(server: RedisServer, prefix: str) -> str:
    keys = [k for k in server.command("--scan", "--pattern", f"{prefix}*").splitlines() if k]
    values = [server.command("GET", k) for k in keys if server.command("TYPE", k) == "string"]
    return "\n".join(keys + values)


@pytest.mark.parametrize("mode", ["hashed", "truncated"])
def test_rate_limit_keys_hold_no_address(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, redis_server: RedisServer, mode: str
) -> None:
    prefix = f"priv-{mode}-{time.monotonic_ns()}:"
    # Two gateways and no --log-key: each has its own log key, and they must still share one budget.
    a = limited(gateway, stub, tmp_path, redis_server.url, prefix, "--log-address", mode)
    b = limited(gateway, stub, tmp_path, redis_server.url, prefix, "--log-address", mode)
    for g in (a, b):  # both: b's first answer below must not be its on_error 503 (seen on a loaded machine)
        g.wait_redis()
    for ip in (GB4, GB6):

        def counted(ip: str = ip) -> bool:
            return status(a, ip) == 200

        wait_for(counted, 10, "Redis to count")  # the first, once Redis answers (503s)
        assert [status(g, ip) for g in (b, a)] == [200, 200]
        assert status(b, ip) == 429  # 3 per hour, counted across both gateways
    assert status(a, SE4) == 200
    stored = everything_in_redis(redis_server, prefix)
    assert stored.count(f"{prefix}rl:{{limited:ip:h:") == 3  # one key per caller, by its keyed hash
    for raw in RAW:
        assert raw not in stored, raw
    assert "2a02:d3c0" not in stored and "2.125.160" not in stored


def test_full_mode_keeps_addresses_in_keys(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, redis_server: RedisServer
) -> None:
    """The operator who logs full addresses can still find a caller's key (and nothing else changed)."""
    prefix = f"priv-full-{time.monotonic_ns()}:"
    gw = limited(gateway, stub, tmp_path, redis_server.url, prefix)
    wait_for(lambda: status(gw, GB4) == 200, 10, "Redis to count")
    assert f"{prefix}rl:{{limited:ip:{GB4}}}" in everything_in_redis(redis_server, prefix)


@pytest.fixture(scope="module")
def broken_city(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A City database that opens and verifies, with one record broken past the networks checked at open."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPNetwork, IPSet

    writer = MMDBWriter(
        ip_version=6, database_type="GeoIP2-City", languages=["en"], description={"en": "x"}, ipv4_compatible=True
    )
    record = {"country": {"iso_code": "GB"}, "registered_country": {"iso_code": "GB"}}
    for n in range(2100):  # more than open_database decodes
        writer.insert_network(IPSet([IPNetwork(f"11.{n >> 8}.{n & 255}.0/24")]), record)
    writer.insert_network(IPSet([IPNetwork("81.2.69.144/28")]), {**record, "city": {"names": {"en": "BREAK-HERE"}}})
    path = tmp_path_factory.mktemp("broken") / "GeoIP2-City.mmdb"
    writer.to_db_file(str(path))
    data = bytearray(path.read_bytes())
    at = data.find(b"BREAK-HERE")
    data[at - 1 : at + 1] = b"\x00\xf0"  # the string's control byte: now an extended type that does not exist
    path.write_bytes(bytes(data))
    return str(path)


@pytest.mark.parametrize("mode", ["hashed", "truncated"])
def test_a_failed_geo_lookup_logs_no_address(gateway: GatewayFactory, stub: Stub, broken_city: str, mode: str) -> None:
    gw = gateway(
        "--geoip", broken_city, "--upstream", stub.url, "--trusted-proxy", "127.0.0.1/32", "--log-address", mode
    )
    assert status(gw, "11.0.0.9") == 200  # the database works
    assert status(gw, "81.2.69.145") == 403  # its record is broken: judged as an unknown country
    wait_for(lambda: "geo lookup" in gw.stderr(), 10, "the failed lookup to be logged")
    err = gw.stderr()
    assert "geo lookup of an IPv4 address failed" in err
    assert "81.2.69.145" not in err and "81.2.69" not in err


def test_every_log_record_is_redacted_whatever_its_logger() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in ("regiongate", "uvicorn.error", "asyncio", "some.library")]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    redact_logs(AddressRedactor("hashed", b"k" * 16))
    try:
        loggers[0].error("lookup of %s failed: %s", ipaddress.ip_address(GB4), f"no record for {GB4}")
        loggers[1].warning("peer [%s]:443 reset", GB6)
        loggers[2].info("connection from %s:5000", ipaddress.ip_address(GB6).exploded)
        try:
            raise ValueError(f"bad data at {SE4}")
        except ValueError:
            loggers[3].exception("decoding failed")
        loggers[0].error("%d%s", "not a number", GB4)  # cannot be formatted: still redacted
        loggers[0].info("stack", stack_info=True)
    finally:
        redact_logs(AddressRedactor("full"))
        for lg in loggers:
            lg.removeHandler(handler)
    text = out.getvalue()
    for raw in RAW:
        assert raw not in text, (raw, text)
    assert "h:" in text and "ValueError: bad data at h:" in text
    logging.getLogger("regiongate").addHandler(handler)
    try:
        logging.getLogger("regiongate").error("after: %s", GB4)  # full mode: untouched
    finally:
        logging.getLogger("regiongate").removeHandler(handler)
    assert f"after: {GB4}" in out.getvalue()


@pytest.mark.parametrize("mode", ["full", "truncated", "hashed"])
def test_a_redactor_writes_an_address_the_same_from_its_cache_as_afresh(mode: str) -> None:
    """Written forms are kept per address (a dict hit instead of ``str(ip)`` or a keyed hash per
    line); past the cache's bound it empties and fills again, and nothing read from it differs."""
    key = b"k" * 16
    cached, fresh = AddressRedactor(mode, key), AddressRedactor(mode, key)  # type: ignore[arg-type]
    addresses = [ipaddress.ip_address(n) for n in range(3000)]
    addresses += [ipaddress.ip_address(f"2a02:d3c0::{n:x}") for n in range(3000)]
    addresses += [ipaddress.ip_address("::ffff:2.125.160.216"), ipaddress.ip_address("fe80::1%eth0")]
    for _ in range(2):  # the second pass reads what the first one (and the emptied caches) left
        for ip in addresses:
            assert cached(ip) == fresh._write(ip)
    # Equal integers of the two families are different addresses, and are written differently.
    assert cached(ipaddress.IPv4Address(1)) != cached(ipaddress.IPv6Address(1))
