"""The provider lists the project ships: generated from their reference files, byte for byte, with
the published names mapped to the right ISO codes, each rule citing the list and date behind it."""

from __future__ import annotations

import datetime
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from gateway.geo import Geo
from gateway.policy import judge_ip, load_policy, rule_sources, run_tests
from support.processes import CITY, POLICIES, ROOT, UA_CITY_ADDRESSES

# The Claude API's supported regions as issue 18 lists them (captured 2026-12-03): 175 codes.
_ISSUE_TEXT = (
    "AD AE AG AL AM AO AR AT AU AZ BA BB BD BE BF BG BH BI BJ BN BO BR BS BT BW BZ CA CG CH CI CL CM CO CR CV CY CZ "
    "DE DJ DK DM DO DZ EC EE EG ES FI FJ FM FR GA GB GD GE GH GM GN GQ GR GT GW GY HN HR HT HU ID IE IL IN IQ IS IT "
    "JM JO JP KE KG KH KI KM KN KR KW KZ LA LB LC LI LK LR LS LT LU LV MA MC MD ME MG MH MK MN MR MT MU MV MW MX MY "
    "MZ NA NE NG NL NO NP NR NZ OM PA PE PG PH PK PL PS PT PW PY QA RO RS RW SA SB SC SE SG SI SK SL SM SN SR ST SV "
    "SZ TD TG TH TJ TL TM TN TO TR TT TV TW TZ UA UG US UY UZ VA VC VN VU WS ZA ZM ZW"
)
ISSUE_ANTHROPIC = set(_ISSUE_TEXT.split())
OCCUPIED = {"UA-43", "UA-40", "UA-14", "UA-09"}


@pytest.fixture(scope="module")
def generate() -> ModuleType:
    """policies/generate.py, imported (it is a script beside the files it writes, not a package module)."""
    spec = importlib.util.spec_from_file_location("policies_generate", POLICIES / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_generator_reproduces_every_committed_file_byte_for_byte(generate: ModuleType) -> None:
    files: dict[Path, object] = generate.FILES
    assert {p.name for p in files} >= {"anthropic-supported.yaml", "sanctions-starter.yaml", "eu-residency.yaml"}
    for path, make in files.items():
        assert callable(make)
        assert path.read_text(encoding="utf-8") == make(), f"{path.name}: run python policies/generate.py"


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("Congo, Republic of the", "CG"),  # Brazzaville, not the Democratic Republic (CD)
        ("Holy See (Vatican City)", "VA"),
        ("Micronesia", "FM"),
        ("Timor-Leste, Democratic Republic of", "TL"),
        ("Turkey", "TR"),
        ("Czechia (Czech Republic)", "CZ"),
        ("Ukraine (except Crimea, Donetsk, and Luhansk regions)", "UA"),
        ("South Korea", "KR"),
        ("Laos", "LA"),
        ("Côte d'Ivoire", "CI"),
        ("Sao Tome and Principe", "ST"),
        ("United States of America", "US"),
    ],
)
def test_the_tricky_published_names_map_to_the_right_codes(generate: ModuleType, name: str, code: str) -> None:
    assert generate.iso_code(name) == code


def test_a_name_that_is_not_a_country_stops_the_generator(generate: ModuleType) -> None:
    with pytest.raises(KeyError, match="PUBLISHED_NAMES"):
        generate.iso_code("Republic of Narnia")
    with pytest.raises(KeyError):
        generate.iso_code("Korea")  # no fuzzy matching: two Koreas


def test_the_anthropic_list_is_the_issues_175_codes(generate: ModuleType) -> None:
    codes = generate.anthropic_countries()
    assert len(codes) == 175 and set(codes) == ISSUE_ANTHROPIC
    policy = load_policy(str(POLICIES / "anthropic-supported.yaml"), Geo([CITY]).capabilities)
    supported = next(r for r in policy.rules if r.name == "supported")
    assert supported.countries == frozenset(ISSUE_ANTHROPIC)
    assert next(r for r in policy.rules if r.name == "occupied-regions").subdivisions == frozenset(OCCUPIED)


def test_the_anthropic_list_matches_the_shared_iso_copy_when_present(generate: ModuleType) -> None:
    shared = ROOT.parent / "shared" / "reference" / "anthropic-supported-regions.txt"
    if not shared.exists():
        pytest.skip("no ../shared beside this checkout")
    text = shared.read_text()
    codes = {c for line in text.splitlines() if not line.startswith("#") for c in line.split()}
    assert codes == set(generate.anthropic_countries())


@pytest.mark.parametrize(
    ("name", "provider", "captured"),
    [
        ("anthropic-supported.yaml", "Anthropic", datetime.date(2026, 12, 3)),
        ("anthropic-supported-country-only.yaml", "Anthropic", datetime.date(2026, 12, 3)),
        ("openai-supported.yaml", "OpenAI", datetime.date(2026, 11, 22)),
        ("openai-supported-country-only.yaml", "OpenAI", datetime.date(2026, 11, 22)),
        ("sanctions-starter.yaml", "US Treasury (OFAC), EU, UK", datetime.date(2026, 12, 3)),
        ("examples/eu-residency.yaml", "OpenAI", datetime.date(2026, 11, 22)),
        ("examples/migrate-blocked-regions.yaml", "OpenAI", datetime.date(2026, 11, 22)),
        ("monitor-only-starter.yaml", "OpenAI", datetime.date(2026, 11, 22)),
    ],
)
def test_every_rule_of_a_shipped_list_names_its_source_and_date(name: str, provider: str, captured: object) -> None:
    policy = load_policy(str(POLICIES / name), Geo([CITY]).capabilities)
    sources = rule_sources(policy)
    assert set(sources) == {r.name for r in policy.rules}, "a rule without its source"
    assert {(s.provider, s.captured) for s in sources.values()} == {(provider, captured)}
    assert all(u.startswith("https://") for s in sources.values() for u in s.urls)


@pytest.mark.parametrize("name", ["anthropic-supported.yaml", "anthropic-supported-country-only.yaml"])
def test_anthropic_policies_own_tests_pass(name: str) -> None:
    geo = Geo([CITY])
    results = run_tests(load_policy(str(POLICIES / name), geo.capabilities), geo)
    assert results and all(r.passed for r in results), [r.problem for r in results if not r.passed]


@pytest.mark.parametrize("name", ["anthropic-supported.yaml", "sanctions-starter.yaml"])
@pytest.mark.parametrize(("code", "ip"), sorted(UA_CITY_ADDRESSES.items()))
def test_ukraine_is_served_but_its_occupied_regions_are_refused(ua_city_db: str, name: str, code: str, ip: str) -> None:
    geo = Geo([ua_city_db])
    policy = load_policy(str(POLICIES / name), geo.capabilities)
    decision = judge_ip(policy, geo, ip, "/v1/chat/completions")[2]
    if code == "UA-30":
        assert decision.verdict == "allow"
    else:
        assert (decision.verdict, decision.rule) == ("deny", "occupied-regions")


def test_the_sanctions_starter_refuses_its_countries_and_says_it_is_not_legal_advice() -> None:
    path = POLICIES / "sanctions-starter.yaml"
    policy = load_policy(str(path), Geo([CITY]).capabilities)
    refused = set().union(*(r.countries or set() for r in policy.rules if r.action == "deny"))
    assert refused == {"CU", "IR", "KP", "SY"}
    assert policy.on_default.verdict == "allow" and policy.on_unknown.verdict == "monitor"
    text = path.read_text()
    assert "NOT LEGAL ADVICE" in text and "Sanctions change" in text
    ofac = "https://ofac.treasury.gov/sanctions-programs-and-country-information/"
    sources = rule_sources(policy)
    assert sources["syria"].urls[0] == ofac + "syria-related-sanctions"
    assert sources["occupied-regions"].urls[0] == ofac + "ukraine-russia-related-sanctions"
    geo = Geo([CITY])
    results = run_tests(policy, geo)
    assert results and all(r.passed for r in results), [r.problem for r in results if not r.passed]


def test_eu_residency_routes_to_the_endpoints_openais_sdks_name() -> None:
    policy = load_policy(str(POLICIES / "examples" / "eu-residency.yaml"), None)
    # openai-python's _data_residency.py and openai-node's data-residency.ts (read 2026-12-03):
    # global, us, eu, ae; the gateway appends the request's own /v1/... path to each base.
    sdk = {"global": "https://api.openai.com", "us": "https://us.api.openai.com",
           "eu": "https://eu.api.openai.com", "ae": "https://ae.api.openai.com"}  # fmt: skip
    urls = {name: up.url for name, up in policy.upstreams.items()}
    assert urls == {("default" if k == "global" else k): v for k, v in sdk.items()}
    routes = {r.name: r.decision.upstream for r in policy.rules if r.action == "route"}
    assert routes == {"eu-residency": "eu", "us-residency": "us", "ae-residency": "ae"}
    assert any("openai-python" in u for s in rule_sources(policy).values() for u in s.urls)


def test_every_shipped_file_says_which_list_it_follows_and_when_it_was_read() -> None:
    from gateway.policy import policy_provenance

    files = sorted(POLICIES.glob("*.yaml")) + sorted(POLICIES.glob("examples/*.yaml"))
    assert len(files) == 9
    for path in files:
        provenance = policy_provenance(load_policy(str(path), None).spec)
        assert provenance is not None and provenance.provider, path.name
