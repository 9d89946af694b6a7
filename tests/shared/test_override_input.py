"""What an override may say: no text that forges a row or colours a terminal, no code that names nothing.

``reason`` and ``by`` are refused with a control character (C0, DEL, C1) or
a character that reorders or breaks a line (bidi marks, embeddings,
overrides, isolates; line and paragraph separators), by the admin API and by
the CLI; text already stored (by an older version, or by hand in Redis) is
shown escaped. Country and subdivision codes are checked against ISO 3166 as
the policy's are, with "did you mean".
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest

from gateway.policy.overrides import OverrideError, check_text, new_override, printable
from gateway.shared.client import render
from support.overrides import AUTH, TOKEN, cli, overrides_gateway
from support.processes import Gateway, GatewayFactory, Stub
from support.redis_server import RedisServer, running

UNSAFE = {
    "newline": "\n",
    "carriage-return": "\r",
    "escape": "\x1b[31m",
    "nul": "\x00",
    "tab": "\t",
    "backspace": "\x08",
    "delete": "\x7f",
    "next-line-C1": "\x85",
    "CSI-C1": "\x9b31m",
    "RLO": "\u202e",
    "LRE": "\u202a",
    "PDF": "\u202c",
    "LRI": "\u2066",
    "PDI": "\u2069",
    "LRM": "\u200e",
    "RLM": "\u200f",
    "ALM": "\u061c",
    "line-separator": "\u2028",
    "paragraph-separator": "\u2029",
}
FORGED = "ok\n4f2a  allow   country  CN     never    CISO  approved by CISO"


@pytest.mark.parametrize("char", UNSAFE.values(), ids=UNSAFE.keys())
@pytest.mark.parametrize("field", ["reason", "by"])
def test_control_and_bidi_characters_are_refused(field: str, char: str) -> None:
    text = f"looks fine{char}until shown"
    reason, by = (text, "oncall") if field == "reason" else ("abuse", text)
    with pytest.raises(OverrideError) as e:
        new_override("deny", "country", "CN", reason, by)
    message = str(e.value)
    assert message.startswith(f"{field}: character U+{ord(char[0]):04X} at position 10")
    assert char[0] not in message  # named, never repeated


def test_plain_text_in_any_script_is_accepted() -> None:
    for text in ("fraud ticket #123 (été, 東京, Київ, عربى, עברית)", "", "a" * 500, "emoji 🙂 ok"):
        check_text(text, text)
        assert new_override("deny", "country", "CN", text, text).reason == text


def test_stored_text_is_shown_escaped() -> None:
    assert printable("a\x1b[31mred\u202eevil\nrow\x85") == "a\\x1b[31mred\\u202eevil\\nrow\\x85"
    assert printable("plain 東京") == "plain 東京"
    rows = [
        {"id": "a1", "action": "deny", "kind": "country", "value": "RU", "reason": FORGED, "by": "\x1b[2Jmallory"},
        {"id": "b2", "action": "deny", "kind": "cidr", "value": "198.51.100.0/24", "reason": "x\u202eyz", "by": ""},
    ]
    lines = render(rows)
    assert len(lines) == 3  # the header and one line per override: no forged row
    assert not any(c in line for line in lines for c in "\x1b\n\r\x85\u202e")
    assert "\\nf2a" not in lines[1] and "\\n4f2a" in lines[1]
    assert "\\x1b[2Jmallory" in lines[1]


@pytest.mark.parametrize(
    "kind, code, problem",
    [
        ("country", "UK", "country: 'UK' is not an ISO 3166-1 alpha-2 code; did you mean 'GB'?"),
        ("country", "uk", "country: 'UK' is not an ISO 3166-1 alpha-2 code; did you mean 'GB'?"),
        ("country", "EL", "country: 'EL' is not an ISO 3166-1 alpha-2 code; did you mean 'GR'?"),
        ("country", "ZZ", "country: 'ZZ' is not an ISO 3166-1 alpha-2 code"),
        ("country", "XX", "country: 'XX' is not an ISO 3166-1 alpha-2 code"),
        ("subdivision", "GB-XXX", "subdivision: 'GB-XXX' is no such subdivision: ISO 3166-2 lists no 'XXX' in GB"),
        ("subdivision", "UK-ENG", "subdivision: 'UK-ENG' names no country: 'UK' is not an ISO 3166-1 alpha-2 code"),
        ("subdivision", "ZZ-01", "subdivision: 'ZZ-01' names no country"),
    ],
)
def test_codes_that_name_nothing_are_refused_with_what_was_meant(kind: str, code: str, problem: str) -> None:
    with pytest.raises(OverrideError) as e:
        new_override("deny", kind, code, "r", "b")
    assert str(e.value).startswith(problem), str(e.value)


def test_real_codes_are_accepted_in_either_case() -> None:
    assert new_override("deny", "country", "gb", "r", "b").value == "GB"
    assert new_override("deny", "country", "XK", "r", "b").value == "XK"  # what GeoIP vendors return for Kosovo
    assert new_override("deny", "subdivision", "gb-eng", "r", "b").value == "GB-ENG"
    assert new_override("deny", "subdivision", "UA-43", "r", "b").value == "UA-43"


def test_stored_overrides_are_read_back_whatever_they_say() -> None:
    """The store reads what an older version wrote: refusing it there would hide an override in force."""
    from gateway.policy.overrides import Override

    o = Override.from_dict(
        {
            "id": "old",
            "action": "deny",
            "kind": "country",
            "value": "UK",
            "reason": FORGED,
            "by": "x\x1b",
            "created_at": 1,
        }
    )
    assert (o.value, o.reason) == ("UK", FORGED)


@pytest.fixture
def admin_gw(gateway: GatewayFactory, stub: Stub) -> Gateway:
    return overrides_gateway(gateway, stub)


def test_the_admin_api_refuses_them_with_a_422(admin_gw: Gateway) -> None:
    for body in (
        {"action": "deny", "country": "CN", "reason": FORGED, "by": "oncall"},
        {"action": "deny", "country": "CN", "reason": "r", "by": "\x1b[31mCISO"},
        {"action": "deny", "api_key": "sk-abc", "reason": "r\u202e", "by": "oncall"},
        {"action": "deny", "cidr": "198.51.100.0/24", "reason": "r\x85", "by": "oncall"},
        {"action": "deny", "country": "UK", "reason": "r", "by": "oncall"},
        {"action": "deny", "country": "ZZ", "reason": "r", "by": "oncall"},
        {"action": "deny", "subdivision": "GB-XXX", "reason": "r", "by": "oncall"},
    ):
        r = httpx.post(admin_gw.admin + "/admin/overrides", json=body, headers=AUTH, timeout=10)
        assert r.status_code == 422, (body, r.text)
        assert "\x1b" not in r.text and "approved by CISO" not in r.text, r.text
    r = httpx.post(
        admin_gw.admin + "/admin/overrides",
        json={"action": "deny", "country": "UK", "reason": "r"},
        headers=AUTH,
        timeout=10,
    )
    assert "did you mean 'GB'?" in r.text
    listed = httpx.get(admin_gw.admin + "/admin/overrides", headers=AUTH, timeout=10).json()["overrides"]
    assert listed == []


def test_the_cli_refuses_them_through_the_admin_api(admin_gw: Gateway) -> None:
    env = {"REGIONGATE_ADMIN_TOKEN": TOKEN}
    where = ["--admin-url", admin_gw.admin]
    for extra in (["--country", "CN", "--reason", FORGED], ["--country", "CN", "--reason", "r", "--by", "\x1b[31m"]):
        out = cli("add", "deny", *extra, *where, env=env)
        assert out.returncode == 1, out
        assert "character U+" in out.stderr and "\x1b" not in out.stderr and "CISO" not in out.stderr
    out = cli("add", "deny", "--country", "UK", "--reason", "r", *where, env=env)
    assert out.returncode == 1 and "did you mean 'GB'?" in out.stderr, out.stderr
    assert cli("add", "deny", "--country", "GB", "--reason", "r", *where, env=env).returncode == 0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running(tmp_path_factory.mktemp("redis")) as server:
        yield server


def test_the_cli_refuses_them_straight_to_redis_and_lists_stored_ones_escaped(redis_server: RedisServer) -> None:
    prefix = "inputtest:"
    redis = ["--redis", redis_server.url, "--redis-prefix", prefix]
    out = cli("add", "deny", "--country", "CN", "--reason", FORGED, *redis)
    assert out.returncode == 1 and "reason: character U+000A" in out.stderr, out.stderr
    out = cli("add", "deny", "--subdivision", "GB-XXX", "--reason", "r", *redis)
    assert out.returncode == 1 and "is no such subdivision" in out.stderr, out.stderr
    # Written by hand (or by an older version): listed, escaped.
    stored = {"id": "forged", "action": "deny", "kind": "country", "value": "RU", "reason": FORGED, "by": "\x1b[2J"}
    redis_server.command(
        "HSET", f"{prefix}{{overrides}}:data", "forged", orjson.dumps({**stored, "created_at": 1}).decode()
    )
    redis_server.command("INCR", f"{prefix}{{overrides}}:version")
    listed = cli("list", *redis)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2, lines  # header and the one override: the forged row stays inside it
    assert "\x1b" not in listed.stdout and "\\x1b[2J" in lines[1] and "\\n4f2a" in lines[1]
