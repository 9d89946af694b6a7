"""Geo facts from MaxMind's own test databases, and the embedded fallback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.clientip import parse_address
from gateway.geo import ANONYMIZER, SUBDIVISIONS, Geo, GeoDataError
from gateway.geo import ASN as ASN_FACT
from gateway.geo import COUNTRY as COUNTRY_FACT
from support.processes import ANON, ASN, BAD_DATA, CITY, COUNTRY, ENTERPRISE, GEOIP, ISP


def lookup(geo: Geo, text: str):  # type: ignore[no-untyped-def]
    return geo.lookup(parse_address(text))


@pytest.fixture(scope="module")
def full() -> Geo:
    return Geo([CITY, ASN, ANON])


def test_type_is_read_from_metadata_and_each_fact_has_one_source(full: Geo) -> None:
    assert [s.type for s in full.sources] == ["GeoIP2-City", "GeoLite2-ASN", "GeoIP2-Anonymous-IP"]
    assert full.capabilities >= {COUNTRY_FACT, SUBDIVISIONS, ASN_FACT, ANONYMIZER}
    assert all(s.build_epoch > 1_500_000_000 for s in full.sources)


def test_city_record(full: Geo) -> None:
    f = lookup(full, "81.2.69.142")
    assert (f.country, f.registered_country, f.subdivisions) == ("GB", "US", ("GB-ENG",))
    f = lookup(full, "2.125.160.216")
    assert f.subdivisions == ("GB-ENG", "GB-WBK")  # every level, full ISO 3166-2 codes
    assert lookup(full, "175.16.199.1").subdivisions == ("CN-22",)


def test_ipv6_and_no_country(full: Geo) -> None:
    assert lookup(full, "2001:250::1").country == "CN"
    assert lookup(full, "2a02:d300::1").country == "UA"
    f = lookup(full, "214.1.1.1")
    assert f.country is None and f.network is not None


def test_asn_and_anonymizer(full: Geo) -> None:
    f = lookup(full, "27.192.0.1")
    assert (f.asn, f.as_org) == (4837, "CNCGROUP China169 Backbone")
    assert lookup(full, "1.124.213.1").anonymizer == {"anonymous", "anonymous_vpn", "tor_exit_node"}
    assert lookup(full, "186.30.236.1").anonymizer == {"anonymous", "public_proxy"}
    assert lookup(full, "71.160.223.1").anonymizer == {"anonymous", "hosting_provider"}
    assert lookup(full, "89.160.20.112").anonymizer == frozenset()


def test_enterprise_and_isp_provide_asn() -> None:
    assert Geo([ENTERPRISE]).capabilities >= {COUNTRY_FACT, SUBDIVISIONS, ASN_FACT}
    assert lookup(Geo([ISP]), "1.128.0.1").asn == 1221


def test_ipv6_forms_get_the_ipv4_facts(full: Geo) -> None:
    v4 = lookup(full, "175.16.199.1")
    for form in ("::ffff:175.16.199.1", "2002:af10:c701::1", "64:ff9b::175.16.199.1", "::175.16.199.1"):
        assert lookup(full, form) == v4


def test_cache_is_by_network_not_by_address(full: Geo) -> None:
    geo = Geo([CITY])
    a = lookup(geo, "175.16.199.1")
    b = lookup(geo, "175.16.199.200")  # same /24 in the City test data
    assert a is b and a.network == "175.16.199.0/24"
    assert geo._cache_size == 1  # one entry serves the whole network
    other = lookup(geo, "81.2.69.142")
    assert other is not a and geo._cache_size == 2


@pytest.mark.parametrize("address", ["81.2.69.1", "81.2.69.142", "1.124.213.1", "175.16.199.1"])
def test_merged_network_is_the_narrowest_of_the_files(address: str) -> None:
    import maxminddb

    prefixes = []
    for path in (COUNTRY, ANON):
        with maxminddb.open_database(path) as reader:
            prefixes.append(reader.get_with_prefix_len(address)[1])
    f = lookup(Geo([COUNTRY, ANON]), address)
    assert f.network is not None and f.network.endswith(f"/{max(prefixes)}")
    assert parse_address(address) in __import__("ipaddress").ip_network(f.network)


def test_later_file_with_no_new_fact_is_not_consulted() -> None:
    geo = Geo([CITY, COUNTRY])
    assert [s.type for s in geo.sources] == ["GeoIP2-City"]


def test_embedded_country_data() -> None:
    geo = Geo([])
    assert geo.embedded and geo.capabilities == {COUNTRY_FACT}
    assert lookup(geo, "175.16.199.1").country == "CN"
    assert lookup(geo, "::ffff:175.16.199.1").country == "CN"  # normalised before the lookup
    assert lookup(geo, "2002:af10:c701::1").country == "CN"
    assert lookup(geo, "81.2.69.142").country == "GB"


@pytest.mark.parametrize("name", sorted(p.name for p in BAD_DATA.glob("*.mmdb")))
def test_corrupt_databases_fail_at_open_with_the_file_named(name: str) -> None:
    path = str(BAD_DATA / name)
    with pytest.raises(GeoDataError) as e:
        Geo([path])
    assert path in str(e.value)


def test_unsupported_type_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(GeoDataError, match=r"Connection-Type.*not supported"):
        Geo([str(GEOIP / "GeoIP2-Connection-Type-Test.mmdb")])
    with pytest.raises(GeoDataError, match="no such"):
        Geo([str(tmp_path / "missing.mmdb")])
    text = tmp_path / "text.mmdb"
    text.write_text("not a database")
    with pytest.raises(GeoDataError, match="not a readable"):
        Geo([str(text)])
    truncated = tmp_path / "truncated.mmdb"
    shutil.copy(CITY, truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(GeoDataError):
        Geo([str(truncated)])


def test_a_record_broken_past_the_verified_part_is_judged_as_no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening checks the first networks only; a broken record found later must not raise."""
    import gateway.geo

    monkeypatch.setattr(gateway.geo, "_VERIFY_NETWORKS", 0)
    geo = Geo([str(BAD_DATA / "GeoIP2-City-Test-Broken-Double-Format.mmdb")])
    facts = lookup(geo, "81.2.69.142")
    assert facts.country is None and geo.lookup_errors == 1
