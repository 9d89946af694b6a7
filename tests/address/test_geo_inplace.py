"""A GeoIP file rewritten in place (``cp new.mmdb City.mmdb``) cannot crash or mislead a running gateway.

``cp`` truncates the file and then writes it. A reader that maps the file
itself then reads past the end of a truncated inode (SIGBUS: the process
dies) or the new bytes at the old offsets (wrong answers). The gateway reads
each database into a private copy, so it keeps answering from the old data
until the new file is whole, then reloads it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import httpx
import pytest

from gateway.geo import GeoDataError, open_database
from support.live import BUILD_EPOCH, wait_until
from support.processes import GatewayFactory, Stub

TRUST = ("--trusted-proxy", "127.0.0.1/32")
NETWORKS = 2048  # one /24 each, so that every request below is a lookup the cache has not seen


def city_db(path: Path, country: str) -> bytes:
    """A City database placing 11.0.0.0/24 .. 11.7.255.0/24 in ``country``."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPNetwork, IPSet

    writer = MMDBWriter(
        ip_version=6, database_type="GeoIP2-City", languages=["en"], description={"en": country}, ipv4_compatible=True
    )
    record = {"country": {"iso_code": country}, "registered_country": {"iso_code": country}}
    for n in range(NETWORKS):
        writer.insert_network(IPSet([IPNetwork(f"11.{n >> 8}.{n & 255}.0/24")]), record)
    with mock.patch("mmdb_writer.time.time", return_value=BUILD_EPOCH):
        writer.to_db_file(str(path))
    return path.read_bytes()


@pytest.fixture(scope="module")
def two_dbs(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    d = tmp_path_factory.mktemp("inplace")
    return city_db(d / "gb.mmdb", "GB"), city_db(d / "fr.mmdb", "FR")


class Client:
    """Requests from addresses in networks never asked about before."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.next = 0
        self.http = httpx.Client(timeout=10)

    def fresh(self) -> int:
        n, self.next = self.next, self.next + 1
        assert n < NETWORKS
        r = self.http.get(self.url + "/v1/models", headers={"X-Forwarded-For": f"11.{n >> 8}.{n & 255}.9"})
        return r.status_code


def test_rewrite_in_place_keeps_serving_the_old_data_then_reloads(
    gateway: GatewayFactory, stub: Stub, tmp_path: Path, two_dbs: tuple[bytes, bytes]
) -> None:
    gb, fr = two_dbs
    live = tmp_path / "GeoIP2-City.mmdb"
    live.write_bytes(gb)
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - {name: gb, countries: [GB], action: allow}\nversion: 1\n")
    gw = gateway("--policy", str(policy), "--geoip", str(live), "--upstream", stub.url, *TRUST)
    c = Client(gw.url)
    assert c.fresh() == 200

    with open(live, "r+b") as f:  # what cp does: truncate, then write
        f.truncate(0)
        f.flush()
        os.fsync(f.fileno())
        # Truncated: a mapping of the file itself has nothing behind it now.
        assert [c.fresh() for _ in range(20)] == [200] * 20
        f.write(fr[: len(fr) // 2])
        f.flush()
        os.fsync(f.fileno())
        # Half written: the new bytes at the old offsets would answer wrong, or not at all.
        assert [c.fresh() for _ in range(20)] == [200] * 20
        f.write(fr[len(fr) // 2 :])
    assert gw.proc.poll() is None

    wait_until(lambda: c.fresh() == 403, "the rewritten (FR) file to serve")
    assert gw.proc.poll() is None
    # One reload: the whole file. Whether the truncated or half-written states were seen (and refused) on the
    # way depends on when the watcher looked, so only that they were never served is asserted (above).
    ok = 'regiongate_geoip_reloads_total{result="ok",type="GeoIP2-City"} 1.0'
    assert ok in gw.metrics()


_PRIVATE_COPY_CHECK = """
import ipaddress, sys
from pathlib import Path
from gateway.geo import Geo
path, gb, fr = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes(), Path(sys.argv[3]).read_bytes()
path.write_bytes(gb)
geo = Geo([str(path)])
def country(n):
    return geo._read(ipaddress.ip_address(f"11.{n >> 8}.{n & 255}.1"))[0].country
seen = [country(0)]
path.write_bytes(b"")
seen.append(country(1))
path.write_bytes(fr[:100])
seen.append(country(2))
path.write_bytes(fr)
seen.append(country(3))  # until reloaded
assert geo.replaced(str(path))
geo.swap(geo.open_replacement(str(path)))
seen.append(country(4))
print(" ".join(seen))
"""


@pytest.mark.e2e
def test_a_loaded_database_is_a_private_copy(tmp_path: Path, two_dbs: tuple[bytes, bytes]) -> None:
    """Truncating or rewriting the file changes nothing the reader answers, until it is reloaded.

    In a child process: on a reader that maps the file itself, this is a SIGBUS.
    """
    gb, fr = (tmp_path / "gb.mmdb", tmp_path / "fr.mmdb")
    gb.write_bytes(two_dbs[0])
    fr.write_bytes(two_dbs[1])
    out = subprocess.run(
        [sys.executable, "-c", _PRIVATE_COPY_CHECK, str(tmp_path / "GeoIP2-City.mmdb"), str(gb), str(fr)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.split() == ["GB", "GB", "GB", "GB", "FR"]


def test_a_file_that_keeps_changing_while_read_is_refused(tmp_path: Path, two_dbs: tuple[bytes, bytes]) -> None:
    path = tmp_path / "GeoIP2-City.mmdb"
    path.write_bytes(two_dbs[0])
    real_open = open
    grew = iter(range(10))

    def changing_open(file: object, mode: str = "r", *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        f = real_open(file, mode, *args, **kwargs)  # type: ignore[call-overload]
        if file == str(path):
            with real_open(path, "ab") as g:  # someone appends while we read
                g.write(bytes([next(grew)]))
        return f

    with mock.patch("builtins.open", changing_open), pytest.raises(GeoDataError, match="kept changing"):
        open_database(str(path))


def test_errors_name_the_file_not_the_copy(tmp_path: Path) -> None:
    bad = tmp_path / "GeoIP2-City.mmdb"
    bad.write_bytes(b"not a database")
    with pytest.raises(GeoDataError) as e:
        open_database(str(bad))
    assert str(bad) in str(e.value) and "/proc/" not in str(e.value)
