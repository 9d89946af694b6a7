"""``provider:``, ``source:`` and ``captured:``: where a policy's list came from, per rule, with the
right line for each mistake; and what the evidence report reads (:func:`rule_sources`)."""

from __future__ import annotations

import datetime

import jsonschema
import pytest

from gateway.policy import Provenance, age_days, json_schema, parse_policy, policy_provenance, rule_sources
from gateway.yamlfile import FileError, load

SOURCED = """version: 1
provider: Anthropic
source: https://platform.claude.com/docs/en/api/supported-regions
captured: 2026-12-03
rules:
  - name: occupied
    subdivisions: [UA-43]
    action: deny
    source: policy
  - countries: [CU]
    action: deny
    source:
      - https://ofac.treasury.gov/sanctions-programs-and-country-information/cuba-sanctions
      - https://www.sanctionsmap.eu/
  - name: supported
    countries: [US, GB]
    action: allow
"""


def problems(text: str) -> list[str]:
    with pytest.raises(FileError) as e:
        parse_policy(text, "p.yaml", None)
    return str(e.value).splitlines()


def test_each_rule_that_cites_a_source_gets_the_list_and_date_behind_it() -> None:
    policy = parse_policy(SOURCED, "p.yaml", None)
    day = datetime.date(2026, 12, 3)
    anthropic = Provenance("Anthropic", ("https://platform.claude.com/docs/en/api/supported-regions",), day)
    assert policy_provenance(policy.spec) == anthropic
    sources = rule_sources(policy)
    assert sources == {
        "occupied": anthropic,
        "rule-2": Provenance(
            "Anthropic",
            (
                "https://ofac.treasury.gov/sanctions-programs-and-country-information/cuba-sanctions",
                "https://www.sanctionsmap.eu/",
            ),
            day,
        ),
    }  # "supported" cites none, and is not given one
    assert set(sources) <= {r.name for r in policy.rules}  # the names decisions and audit entries carry
    assert anthropic.label() == (
        "Anthropic, captured 2026-12-03: https://platform.claude.com/docs/en/api/supported-regions"
    )


def test_a_quoted_date_and_a_list_of_sources_are_the_same_as_the_plain_forms() -> None:
    plain = parse_policy(SOURCED, "p.yaml", None)
    spelled = parse_policy(
        SOURCED.replace("captured: 2026-12-03", 'captured: "2026-12-03"')
        .replace("source: https://platform", "source: [https://platform")
        .replace("supported-regions\n", "supported-regions]\n", 1),
        "p.yaml",
        None,
    )
    assert rule_sources(plain) == rule_sources(spelled)


def test_a_policy_without_sources_is_unchanged() -> None:
    policy = parse_policy("version: 1\nmetadata: {source: anything, retrieved: 2026-11-22}\n", "p.yaml", None)
    assert policy_provenance(policy.spec) is None and rule_sources(policy) == {}


@pytest.mark.parametrize(
    ("change", "line", "words"),
    [
        (("captured: 2026-12-03", "captured: 2026-12"), 4, "must be a date written YYYY-MM-DD"),
        (("captured: 2026-12-03", 'captured: "2026-02-30"'), 4, "2026-02-30 is not a day of the calendar"),
        (("captured: 2026-12-03", "captured: 2026-02-30"), 4, "day is out of range"),  # YAML's own date
        (("captured: 2026-12-03", "captured: 2026-12-03T10:00:00"), 4, "without a time"),
        (("captured: 2026-12-03", "captured: today"), 4, "YYYY-MM-DD"),
        (("source: https://platform", "source: ftp://platform"), 3, "source[0]: must be an https://"),
        (("source: https://platform", "source: platform"), 3, "source[0]: must be an https://"),
        (("source: https://platform", "source: https://user:pw@platform"), 3, "credentials"),
        (("source: https://platform", "source: https://plat form"), 3, "without spaces"),
        (("      - https://www.sanctionsmap.eu/", "      - www.sanctionsmap.eu"), 14, "rules[1].source[1]"),
        (("    source: policy", "    source: [policy, https://a.example]"), 9, "'policy' stands alone"),
        (("    source: policy", "    source: []"), 9, "at least one"),
        (("provider: Anthropic", "provider: ''"), 2, "provider"),
        (("provider: Anthropic", 'provider: "Anthropic\\n"'), 2, "one line"),
        (("provider: Anthropic", "provider: [Anthropic]"), 2, "provider"),
    ],
)
def test_bad_source_keys_name_their_line(change: tuple[str, str], line: int, words: str) -> None:
    old, new = change
    assert old in SOURCED
    (msg,) = problems(SOURCED.replace(old, new, 1))
    assert msg.startswith(f"p.yaml:{line}: "), msg
    assert words in msg, msg


@pytest.mark.parametrize(
    ("drop", "line", "words"),
    [
        ("captured: 2026-12-03\n", 3, "source: needs captured:"),
        ("source: https://platform.claude.com/docs/en/api/supported-regions\n", 2, "provider: needs source:"),
    ],
)
def test_a_source_needs_its_date_and_a_provider_its_source(drop: str, line: int, words: str) -> None:
    msgs = problems(SOURCED.replace(drop, ""))
    assert any(m.startswith(f"p.yaml:{line}: ") and words in m for m in msgs), msgs


def test_a_date_of_nothing_and_a_rule_citing_a_missing_policy_source_are_errors() -> None:
    text = SOURCED.replace("provider: Anthropic\n", "").replace(
        "source: https://platform.claude.com/docs/en/api/supported-regions\n", ""
    )
    assert problems(text) == [
        "p.yaml:2: captured: needs source:, the URL(s) the list was read from (a date of nothing)",
        "p.yaml:7: rules[0] (occupied): source: policy cites the policy's source:, which this policy does not have",
    ]
    undated = "version: 1\nrules:\n  - {countries: [CU], action: deny, source: https://ofac.treasury.gov/}\n"
    (msg,) = problems(undated)
    assert msg.startswith("p.yaml:3: rules[0] (rule-1): a rule's source URLs are dated by the policy's captured:")


def test_source_problems_come_with_the_compilers_in_one_pass() -> None:
    text = SOURCED.replace("captured: 2026-12-03\n", "").replace("countries: [US, GB]", "countries: [UK]")
    msgs = problems(text)
    assert len(msgs) == 2 and "source: needs captured:" in msgs[0] and "'UK'" in msgs[1], msgs


def test_the_json_schema_accepts_every_written_form_and_refuses_bad_ones() -> None:
    schema = json_schema()
    jsonschema.validate(load(SOURCED.replace("captured: 2026-12-03", 'captured: "2026-12-03"'), "p").data, schema)
    for bad in (
        {"version": 1, "source": "ftp://x"},
        {"version": 1, "source": []},
        {"version": 1, "captured": "03/12/2026"},
        {"version": 1, "rules": [{"action": "deny", "source": "policies"}]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_age_in_days_counts_from_the_capture_and_goes_negative_for_a_future_date() -> None:
    day = datetime.date(2026, 12, 3)
    assert age_days(day, datetime.date(2027, 6, 1)) == 180
    assert age_days(day, day) == 0
    assert age_days(day, datetime.date(2026, 12, 1)) == -2
