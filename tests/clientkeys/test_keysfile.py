"""The keys file (--keys-file): atomic 0600 writes, several writers, reload on change, and a bad file never
costing the good table."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from gateway.policy.clientkeys import ClientKey, KeyTable
from gateway.shared.clientkeys import ClientKeys, KeyConflict, KeysUnavailable, authenticate
from gateway.shared.keysfile import FileKeys, KeysFileError, locked

# Only a gateway that never notices would hit this: every wait below ends on the event itself.
SAFETY = 10.0


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


async def swapped(store: ClientKeys, until: Callable[[KeyTable], bool]) -> float:
    """Wait for ``store`` to swap in a table for which ``until(table)`` holds; how long it took."""
    start = time.monotonic()
    seen = asyncio.Event()

    def on_swap(table: KeyTable) -> None:
        if until(table):
            seen.set()

    store.on_swap = on_swap
    if until(store.table):
        return 0.0
    async with asyncio.timeout(SAFETY):
        await seen.wait()
    return time.monotonic() - start


async def test_issue_check_revoke_and_the_file_holds_no_token(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    store = FileKeys(str(path))
    assert not path.exists() and store.secret() is None and len(store.table) == 0
    key, token = await store.add("team-a", None, {"owner": "alice"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys.json.lock").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json", "keys.json.lock"]  # no temporary left
    text = path.read_text()
    assert token not in text and token[3:] not in text and key.hash in text
    doc = orjson.loads(text)
    assert doc["regiongate_client_keys"] == 1 and len(bytes.fromhex(doc["secret"])) == 32
    found = authenticate(bearer(token), store)
    assert isinstance(found, ClientKey) and found.name == "team-a" and dict(found.meta) == {"owner": "alice"}

    with pytest.raises(KeyConflict, match="already named 'team-a'"):
        await store.add("team-a")
    other, other_token = await store.add("team-b", time.time() + 3600)
    assert [k.name for k in await store.list()] == ["team-a", "team-b"]

    revoked = await store.revoke("team-a")  # by name
    assert revoked is not None and revoked.id == key.id and revoked.revoked is not None
    assert not isinstance(authenticate(bearer(token), store), ClientKey)
    assert await store.revoke("team-a") is None  # no live key has that name any more
    again = await store.revoke(key.id)  # by id: the first revocation's time stays
    assert again is not None and again.revoked == revoked.revoked
    assert isinstance(authenticate(bearer(other_token), store), ClientKey)
    reissued, new_token = await store.add("team-a")  # a revoked key's name may be issued again
    assert reissued.id != key.id and isinstance(authenticate(bearer(new_token), store), ClientKey)

    restarted = FileKeys(str(path))  # a restart reads the same keys and the same secret
    assert restarted.secret() == store.secret()
    assert {k.id for k in restarted.table.keys} == {key.id, other.id, reissued.id}
    assert isinstance(authenticate(bearer(new_token), restarted), ClientKey)
    assert restarted.describe() == {
        "backend": "file",
        "keys": {"active": 2, "expired": 0, "revoked": 1},
        "error": None,
        "path": str(path),
    }


async def test_another_writer_is_seen_within_a_poll(tmp_path: Path) -> None:
    """The gateway's store and a `keys` command (another store on the same file): a revoke reaches the gateway."""
    path = str(tmp_path / "keys.json")
    gateway, command = FileKeys(path), FileKeys(path)
    await gateway.start()
    try:
        key, token = await command.add("team-a")
        took = await swapped(gateway, lambda t: t.find(key.hash, time.time()) is not None)
        assert isinstance(authenticate(bearer(token), gateway), ClientKey)
        await command.revoke(key.id)
        took = await swapped(gateway, lambda t: t.find(key.hash, time.time()) is None)
        print(f"keys file: a revoke by another writer applied after {took * 1000:.0f} ms")
        assert not isinstance(authenticate(bearer(token), gateway), ClientKey)
    finally:
        await gateway.close()


async def test_concurrent_writers_lose_no_key(tmp_path: Path) -> None:
    """Writers in several threads (as the workers and a command are several processes): each add is kept."""
    path = str(tmp_path / "keys.json")
    names = [f"team-{i}" for i in range(12)]

    def issue(name: str) -> None:
        asyncio.run(FileKeys(path).add(name))

    threads = [threading.Thread(target=issue, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SAFETY)
    assert sorted(k.name for k in FileKeys(path).table.keys) == sorted(names)


async def test_a_held_lock_fails_a_write_with_a_reason_not_a_hang(tmp_path: Path) -> None:
    path = str(tmp_path / "keys.json")
    store = FileKeys(path)
    done = threading.Event()
    held = threading.Event()

    def hold() -> None:
        with locked(path):
            held.set()
            done.wait(SAFETY)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(SAFETY)
    try:
        with pytest.raises(KeysUnavailable, match="another writer holds"):
            await asyncio.to_thread(lambda: locked(path, wait=0.05).__enter__())
    finally:
        done.set()
        holder.join(SAFETY)
    await store.add("team-a")  # the lock is free again


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (b'{"regiongate_client_keys": 1,\n  "secret": "ab",\n  oops}', r"keys\.json:3:3: not JSON"),
        (b"[]", "not a keys file"),
        (b'{"regiongate_client_keys": 1, "secret": "zz", "keys": []}', "secret must be 64 hex digits"),
        (b'{"regiongate_client_keys": 1, "secret": "' + b"ab" * 32 + b'", "keys": {}}', "keys must be a list"),
        (
            b'{"regiongate_client_keys": 1, "secret": "' + b"ab" * 32 + b'", "keys": [{"id": "ck_0"}]}',
            r"keys\[0\]: missing field 'name'",
        ),
    ],
)
def test_a_bad_file_stops_the_start_with_where_and_why(tmp_path: Path, text: bytes, says: str) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(text)
    with pytest.raises(KeysFileError, match=says) as e:
        FileKeys(str(path))
    assert str(path) in str(e.value)


async def test_a_file_edited_into_nonsense_keeps_the_good_table_and_is_not_written_over(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    store = FileKeys(str(path))
    key, token = await store.add("team-a")
    good = path.read_bytes()
    clone = orjson.loads(good)
    clone["keys"].append(dict(clone["keys"][0]))  # a hand edit: the same key twice
    for broken, says in [(good[:-20], "not JSON"), (orjson.dumps(clone), "appears twice")]:
        path.write_bytes(broken)
        assert await store.reload() is False
        assert store.error is not None and says in store.error
        assert store.warnings() == [f"client keys: {store.error}; the keys read before keep serving"]
        assert isinstance(authenticate(bearer(token), store), ClientKey)  # the good table still serves
        with pytest.raises(KeysUnavailable, match="fix the file first"):
            await store.add("team-b")
        with pytest.raises(KeysUnavailable, match="fix the file first"):
            await store.revoke(key.id)
        assert path.read_bytes() == broken  # never written over
    path.write_bytes(good)
    assert await store.reload() is True and store.error is None and store.warnings() == []
    path.unlink()  # gone: not "no keys", and no new file with a new secret either
    assert await store.reload() is False and store.error is not None and "is gone" in store.error
    assert isinstance(authenticate(bearer(token), store), ClientKey)
    with pytest.raises(KeysUnavailable, match="is gone"):
        await store.add("team-b")
    assert not path.exists()


def test_a_missing_directory_is_a_start_error(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match="does not exist"):
        FileKeys(str(tmp_path / "nowhere" / "keys.json"))


async def test_an_unreadable_file_is_a_start_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        path = tmp_path / "keys.json"
        path.mkdir()  # root reads any file: a directory in its place cannot be read by anyone
    else:
        path = tmp_path / "keys.json"
        path.write_text("{}")
        path.chmod(0)
    with pytest.raises(KeysFileError, match=r"keys file .*keys\.json: "):
        FileKeys(str(path))


def test_a_keys_file_beside_redis_is_refused_at_start(tmp_path: Path) -> None:
    from gateway.runtime import ConfigError, Settings, load_runtime

    settings = Settings(keys_file=str(tmp_path / "keys.json"), redis="redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match="--keys-file and --redis: with --redis the client keys are kept in Redis"):
        load_runtime(settings, {})
    path = tmp_path / "keys.json"
    path.write_text("[]")
    with pytest.raises(ConfigError, match="not a keys file"):
        load_runtime(Settings(keys_file=str(path)), {})
    runtime = load_runtime(Settings(keys_file=str(tmp_path / "new.json")), {})
    assert runtime.client_keys.describe()["backend"] == "file"
    assert load_runtime(Settings(), {}).client_keys.describe()["backend"] == "off"


async def test_a_revoke_with_no_file_makes_none(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    store = FileKeys(str(path))
    assert await store.revoke("team-a") is None
    assert not path.exists() and store.secret() is None
