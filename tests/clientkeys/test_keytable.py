"""Client keys, the pure half: the table a request is checked against, names, tokens, OpenAI's 401."""

from __future__ import annotations

import re
import string

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.policy.callerkey import hash_key
from gateway.policy.clientkeys import (
    MAX_NAME,
    ClientKey,
    ClientKeyError,
    KeyTable,
    TokenHasher,
    check_meta,
    check_name,
    check_new,
    from_stored,
    mask,
    new_key,
    new_token,
    parse_meta,
)
from gateway.shared.clientkeys import (
    KEYS_UNAVAILABLE,
    NO_KEY_MESSAGE,
    ClientKeys,
    authenticate,
    caller,
    invalid_api_key,
)

SECRET = b"s" * 32
NOW = 1_800_000_000.0


def key(name: str, token: str, **kw: float) -> ClientKey:
    k = new_key(name, hash_key(SECRET, token), NOW - 100)
    return ClientKey(k.id, k.name, k.hash, k.created, kw.get("expires"), kw.get("revoked"), k.meta)


class Held(ClientKeys):
    """A store holding a fixed table and the test secret (the real stores are tested in test_keysfile)."""

    backend = "test"

    def __init__(self, *keys: ClientKey, loaded: bool = True) -> None:
        super().__init__()
        self.table = KeyTable.of(keys)
        self.loaded = loaded

    def secret(self) -> bytes | None:
        return SECRET


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"gw"), (b"Authorization", f"Bearer {token}".encode())]


def test_a_token_is_the_prefix_and_256_random_bits_url_safe() -> None:
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    for t in tokens:
        assert re.fullmatch(r"rg-[A-Za-z0-9_-]{43}", t), t


def test_find_answers_only_valid_keys() -> None:
    live, gone, old, later = "rg-live", "rg-gone", "rg-old", "rg-later"
    table = KeyTable.of(
        [
            key("a", live),
            key("b", gone, revoked=NOW - 1),
            key("c", old, expires=NOW),  # expires exactly now: expired
            key("d", later, expires=NOW + 1),
        ]
    )
    found = table.find(hash_key(SECRET, live), NOW)
    assert found is not None and found.name == "a"
    assert table.find(hash_key(SECRET, gone), NOW) is None
    assert table.find(hash_key(SECRET, old), NOW) is None
    assert table.find(hash_key(SECRET, later), NOW) is not None
    assert table.find(hash_key(SECRET, later), NOW + 1) is None
    assert table.find(hash_key(SECRET, "rg-unknown"), NOW) is None
    assert table.counts(NOW) == {"active": 2, "expired": 1, "revoked": 1}


tokens = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=20).map(lambda t: "rg-" + t)
states = st.sampled_from(["active", "revoked", "expired", "later"])


@given(st.lists(st.tuples(tokens, states), unique_by=lambda p: p[0], max_size=12), tokens)
def test_find_is_valid_lookup_by_hash(entries: list[tuple[str, str]], probe: str) -> None:
    """Whatever the mix of keys, find returns the key whose token it is exactly when that key is valid."""
    built = []
    for i, (token, state) in enumerate(entries):
        kw: dict[str, float] = {
            "active": {},
            "revoked": {"revoked": NOW - 5},
            "expired": {"expires": NOW - 5},
            "later": {"expires": NOW + 5},
        }[state]
        built.append(key(f"k{i}", token, **kw))
    table = KeyTable.of(built)
    for k in built:
        got = table.find(k.hash, NOW)
        assert (got is k) == k.valid(NOW)
        assert got is None or got.valid(NOW)
    if probe not in {t for t, _ in entries}:
        assert table.find(hash_key(SECRET, probe), NOW) is None


@pytest.mark.parametrize(
    "name",
    ["team-a", "a", "svc.billing@eu", "A_1", "x" * MAX_NAME, "ck_0123456789abcdef"],
)
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "must not be empty"),
        ("x" * (MAX_NAME + 1), "at most 64"),
        ("team a", "may hold only"),
        ("team\na", "may hold only"),
        ("{tag}", "may hold only"),  # a name goes inside a Redis hash tag
        ("a:b", "may hold only"),
        ("-lead", "may hold only"),
        ("tëam", "may hold only"),
    ],
)
def test_bad_names(name: str, says: str) -> None:
    with pytest.raises(ClientKeyError, match=says):
        check_name(name)


def test_unique_among_live_keys_only() -> None:
    table = KeyTable.of(
        [key("team-a", "rg-1"), key("team-b", "rg-2", revoked=NOW - 1), key("team-c", "rg-3", expires=NOW - 1)]
    )
    with pytest.raises(ClientKeyError, match="already named 'team-a'"):
        check_new(table, key("team-a", "rg-4"), NOW)
    check_new(table, key("team-b", "rg-5"), NOW)  # the holder was revoked
    check_new(table, key("team-c", "rg-6"), NOW)  # the holder expired


def test_revoke_takes_an_id_or_a_live_name() -> None:
    a, b = key("team-a", "rg-1"), key("team-b", "rg-2", revoked=NOW - 1)
    odd = key(a.id, "rg-3")  # a name spelled as another key's id: the id wins, the name still reaches it
    lookalike = key("ck_0123456789abcdef", "rg-4")
    table = KeyTable.of([a, b, odd, lookalike])
    assert table.resolve(a.id, NOW) is a
    assert table.resolve("team-a", NOW) is a
    assert table.resolve(b.id, NOW) is b  # by id: revoked or not
    assert table.resolve("team-b", NOW) is None  # by name: live keys only
    assert table.resolve("ck_0123456789abcdef", NOW) is lookalike
    assert table.resolve("nobody", NOW) is None


def test_meta_is_bounded_and_one_line() -> None:
    assert dict(check_meta(parse_meta(["owner=alice", "cost-centre=42", "note=a=b"]))) == {
        "cost-centre": "42",
        "note": "a=b",
        "owner": "alice",
    }
    for bad, says in [
        (["owner"], "is not k=v"),
        (["a=1", "a=2"], "given twice"),
        (["bad key=1"], "may hold only"),
        (["note=line\nbreak"], "no control"),
        (["note=\u202eevil"], "no control"),
        (["note=" + "x" * 257], "at most 256"),
        ([f"k{i}=v" for i in range(17)], "at most 16"),
    ]:
        with pytest.raises(ClientKeyError, match=says):
            check_meta(parse_meta(bad))


def test_a_stored_record_reads_back_and_a_bad_one_names_its_field() -> None:
    k = new_key("team-a", hash_key(SECRET, "rg-x"), NOW, NOW + 60, {"owner": "alice"})
    back = from_stored(orjson.loads(orjson.dumps(k.stored())))
    assert back == k and dict(back.meta) == {"owner": "alice"}
    assert "hash" not in k.public(NOW) and "hash" not in repr(k)
    good = k.stored()
    changes: list[tuple[dict[str, object], str]] = [
        ({"id": "nope"}, "is not a key id"),
        ({"hash": "zz"}, "64 hex digits"),
        ({"name": "a b"}, "may hold only"),
        ({"created": "yesterday"}, "created must be a number"),
        ({"expires": True}, "expires must be a number"),
        ({"meta": []}, "meta must be an object"),
    ]
    for change, says in changes:
        with pytest.raises(ClientKeyError, match=says):
            from_stored({**good, **change})
    with pytest.raises(ClientKeyError, match="missing field 'hash'"):
        from_stored({k: v for k, v in good.items() if k != "hash"})
    with pytest.raises(ClientKeyError, match="must be in the future"):
        new_key("team-a", k.hash, NOW, NOW - 1)


def test_mask_is_openais_first_8_last_4() -> None:
    token = "rg-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
    assert mask(token) == "rg-abcde" + "*" * (len(token) - 12) + "DEFG"
    assert mask("sk-short") == "********"  # 12 or fewer: nothing of it shown
    assert len(mask("rg-" + "x" * 5000)) == 8 + 40 + 4  # a long made-up token makes no long reply
    assert mask("\x1b[31mabc" + "y" * 20) == "\\x1b[31mabc" + "*" * 16 + "yyyy"  # a terminal is not coloured


@given(st.text(min_size=13, max_size=200))
def test_mask_never_shows_more_than_the_ends(token: str) -> None:
    shown = mask(token)
    assert shown.count("*") >= min(len(token) - 12, 40)
    middle = token[8:-4]
    assert len(middle) < 4 or middle not in shown


def test_authenticate() -> None:
    token = new_token()
    store = Held(key("team-a", token))
    found = authenticate(bearer(token), store)
    assert isinstance(found, ClientKey) and found.name == "team-a"
    assert caller(bearer(token), store) is found
    assert caller(bearer(token), store, now=NOW + 10**9) is found  # no expiry: valid forever

    missing = authenticate([(b"host", b"gw")], store)
    assert missing == invalid_api_key(None)
    assert caller([(b"authorization", b"Basic abc")], store) is None

    wrong = authenticate(bearer("rg-abcdefghWRONGWRONGWRONGxyz9"), store)
    assert not isinstance(wrong, ClientKey)
    assert wrong.status == 401
    assert orjson.loads(wrong.body()) == {
        "error": {
            "message": "Incorrect API key provided: rg-abcde" + "*" * 18 + "xyz9. "
            "You can obtain an API key from this gateway's operator.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert not wrong.retry
    assert orjson.loads(invalid_api_key(None).body())["error"] == {
        "message": NO_KEY_MESSAGE,
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert NO_KEY_MESSAGE.startswith("You didn't provide an API key. You need to provide your API key in an ")

    revoked = Held(key("team-a", token, revoked=NOW))
    assert authenticate(bearer(token), revoked) == invalid_api_key(token)
    assert authenticate(bearer(token), Held(loaded=False)) is KEYS_UNAVAILABLE
    assert authenticate(bearer(token), ClientKeys()) == invalid_api_key(token)  # no store: nobody is let in


def test_no_store_refuses_to_issue() -> None:
    import asyncio

    from gateway.shared.clientkeys import NoKeyStore

    with pytest.raises(NoKeyStore, match=r"--redis.*--keys-file"):
        asyncio.run(ClientKeys().add("team-a"))
    assert asyncio.run(ClientKeys().revoke("team-a")) is None


@given(st.binary(max_size=100), st.text(max_size=100))
def test_the_token_hasher_is_hmac_sha256(secret: bytes, token: str) -> None:
    """The padded states computed once give what hmac.new gives, for any secret (longer than a block too)."""
    assert TokenHasher(secret)(token) == hash_key(secret, token)
