"""A token-limited request on the request path, in this process: reserved once, then settled, refunded and
released exactly once, on every way a forwarded request can end.

The proxy port is the production one (:mod:`support.wire`), its budgets in memory; the upstream is a
socket server that answers as each test scripts it (a whole JSON answer with or without usage, an
event stream with its usage chunk, a stream cut short, one that never ends, an error, nobody at all).
What the budget step calls (:mod:`gateway.shared.budgets`' ``admit``, ``settle``, ``refund``,
``release``) is counted as it is called through (the real functions run), and each test holds the
count and the charge to what the ending should cost.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httptools
import pytest

from gateway.proxy import path, tokens
from gateway.usage.estimate import input_tokens
from support.processes import free_port
from support.wire import GB, GUARD, InProcess, inprocess_gateway

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
POLICY = """version: 1
defaults: {action: allow, unknown: allow, private: allow, invalid: deny, missing: allow}
rules:
  - name: metered
    models: [m]
    action: allow
    token_limit:
      - {tokens: 100000, per: 1h, by: [rule], count: total}
      - {tokens: 100000, per: 1d, by: [rule], count: output, kind: quota}
    max_concurrent: {streams: 5, by: [rule]}
    token_reserve: {output: 50, unreadable: 300}
  - name: any-body
    paths: ["/v1/embeddings"]
    action: allow
    token_limit:
      - {tokens: 100000, per: 1h, by: [rule], count: total}
      - {tokens: 100000, per: 1d, by: [rule], count: output, kind: quota}
    token_reserve: {unreadable: 300}
"""


def chat(max_tokens: int | None = 20, **more: Any) -> bytes:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "Count to three."}], **more}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return json.dumps(body).encode()


def sse(events: list[dict[str, Any]], done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def chunk(text: str, usage: bool) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }
    if usage:
        event["usage"] = None  # OpenAI adds it to every chunk when include_usage is on
    return event


def _asks_usage(body: bytes) -> bool:
    """Whether the request asks for usage on its stream (the gateway's injection, or the client)."""
    try:
        options = json.loads(body).get("stream_options") or {}
    except ValueError:
        return False
    return options.get("include_usage") is True


class Scripted:
    """An upstream that answers each request as its ``x-script`` header says, and notes what it received."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.bodies: list[bytes] = []
        self.headers: list[dict[bytes, bytes]] = []
        self.hung: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        headers: dict[bytes, bytes] = {}
        body = bytearray()
        done = threading.Event()

        class Callbacks:
            def on_header(self, name: bytes, value: bytes) -> None:
                headers[name.lower()] = value

            def on_body(self, data: bytes) -> None:
                body.extend(data)

            def on_message_complete(self) -> None:
                done.set()

        parser = httptools.HttpRequestParser(Callbacks())
        conn.settimeout(GUARD)
        try:
            while not done.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                parser.feed_data(data)
            self.bodies.append(bytes(body))
            self.headers.append(headers)
            asked = _asks_usage(bytes(body))
            self._answer(conn, headers.get(b"x-script", b"usage").decode(), asked)
        except OSError:
            pass
        finally:
            conn.close()

    def _answer(self, conn: socket.socket, script: str, asked: bool) -> None:
        def send(status: str, ctype: str, payload: bytes) -> None:
            conn.sendall(
                f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(payload)}\r\n"
                "connection: close\r\n\r\n".encode()
                + payload
            )

        if script == "usage":
            send("200 OK", "application/json", json.dumps({"id": "x", "choices": [], "usage": USAGE}).encode())
        elif script == "nousage":
            send("200 OK", "application/json", b'{"id":"x","choices":[{"message":{"content":"Hello there"}}]}')
        elif script == "error":
            send("500 Internal Server Error", "application/json", b'{"error":{"message":"boom","type":"server_error"}}')
        elif script == "unavailable":
            send("503 Service Unavailable", "application/json", b'{"error":{"message":"busy","type":"server_error"}}')
        elif script == "stream":
            events = [chunk("Hello ", asked), chunk("there", asked)]
            if asked:
                events.append({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": USAGE})
            send("200 OK", "text/event-stream", sse(events))
        elif script in ("cut", "hang"):
            head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            data = sse([chunk("Hello ", asked)], done=False)
            conn.sendall(head + b"%x\r\n%s\r\n" % (len(data), data))
            if script == "hang":  # until the gateway lets go (the client left)
                conn.settimeout(GUARD)
                while conn.recv(65536):
                    pass
            # "cut": closed with no terminating chunk

    def close(self) -> None:
        self.sock.close()


class Calls:
    """The budget calls the request path made, in order, each with what it passed."""

    def __init__(self) -> None:
        self.made: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        with self.lock:
            return [name for name, _ in self.made]

    def args(self, name: str) -> list[Any]:
        with self.lock:
            return [a for n, a in self.made if n == name]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """``settle``, ``refund`` and ``release`` counted as the request path calls them (the real ones run)."""
    seen = Calls()

    def through(name: str, real: Callable[..., None]) -> Callable[..., None]:
        def counted(store: Any, held: Any, *more: Any) -> None:
            with seen.lock:
                seen.made.append((name, more[0] if more else None))
            real(store, held, *more)

        return counted

    for name in ("settle", "refund", "release"):
        monkeypatch.setattr(tokens, name, through(name, getattr(tokens, name)))
    real_admit = getattr(path, "admit")  # noqa: B009  # the name the request path calls

    def admit(store: Any, budget: Any, subjects: Any, costs: Any, *more: Any) -> None:
        with seen.lock:
            seen.made.append(("admit", list(costs)))
        real_admit(store, budget, subjects, costs, *more)

    monkeypatch.setattr(path, "admit", admit)
    return seen


@pytest.fixture
def upstream() -> Iterator[Scripted]:
    up = Scripted()
    try:
        yield up
    finally:
        up.close()


@pytest.fixture
def gw(tmp_path: Path, upstream: Scripted) -> Iterator[InProcess]:
    with inprocess_gateway(tmp_path, upstream.url, policy=POLICY) as g:
        yield g


def ask(
    gw: InProcess,
    body: bytes,
    script: str,
    read: int | None = None,
    ctype: bytes = b"application/json",
    path: bytes = b"/v1/chat/completions",
    extra: bytes = b"",
) -> bytes:
    """One request; ``read``: leave after this many bytes of the answer (the client gone mid-stream)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=GUARD) as s:
        s.sendall(
            b"POST " + path + b" HTTP/1.1\r\nhost: t\r\ncontent-type: " + ctype + b"\r\n"
            b"x-forwarded-for: " + GB.encode() + b"\r\nx-script: " + script.encode()
            + b"\r\n" + extra + b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body) + body
        )  # fmt: skip
        got = b""
        while read is None or len(got) < read:
            data = s.recv(65536)
            if not data:
                break
            got += data
        return got


def line(gw: InProcess, count: int = 1) -> dict[str, Any]:
    """The last access-log line, once there are ``count`` (written after settling: the record's last step)."""
    import time

    deadline = time.monotonic() + GUARD
    while True:
        lines = gw.access_log.read_text().splitlines() if gw.access_log.exists() else []
        if len(lines) >= count:
            return json.loads(lines[count - 1])  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, "no access-log line"
        time.sleep(0.01)


def reserve(body: bytes, output: int) -> list[int]:
    """What the policy's two limits reserve: total (input + output), then output."""
    n = input_tokens(body, "m")
    return [n + output, output]


# --- the endings ------------------------------------------------------------------------------


def test_a_whole_answer_is_settled_on_its_usage_once(gw: InProcess, calls: Calls) -> None:
    answer = ask(gw, chat(), "usage")
    assert b" 200 OK" in answer.split(b"\r\n", 1)[0]
    entry = line(gw)
    assert entry["usage"] == {"input": 11, "output": 7, "source": "usage"}
    assert calls.names() == ["admit", "settle", "release"]
    assert calls.args("admit") == [reserve(chat(), 20)] and calls.args("settle") == [[18, 7]]


def test_an_answer_without_usage_is_charged_an_estimate_flagged(gw: InProcess, calls: Calls) -> None:
    body = chat()
    ask(gw, body, "nousage")
    entry = line(gw)
    assert entry["usage"]["source"] == "estimate" and entry["usage"]["input"] == input_tokens(body, "m")
    assert calls.names() == ["admit", "settle", "release"]


def test_a_stream_asks_for_usage_is_settled_on_it_and_the_client_sees_none(
    gw: InProcess, calls: Calls, upstream: Scripted
) -> None:
    answer = ask(gw, chat(stream=True), "stream")
    assert json.loads(upstream.bodies[-1])["stream_options"] == {"include_usage": True}
    assert b'"usage"' not in answer and b"[DONE]" in answer  # stripped: the client did not ask
    assert line(gw)["usage"] == {"input": 11, "output": 7, "source": "usage"}
    assert calls.names() == ["admit", "settle", "release"] and calls.args("settle") == [[18, 7]]


def test_a_stream_that_asked_for_usage_gets_it(gw: InProcess, calls: Calls) -> None:
    answer = ask(gw, chat(stream=True, stream_options={"include_usage": True}), "stream")
    assert b'"usage":{' in answer.replace(b" ", b"") and answer.count(b'"usage": null') == 2
    assert calls.names() == ["admit", "settle", "release"]


def test_a_stream_cut_upstream_is_charged_an_estimate(gw: InProcess, calls: Calls) -> None:
    ask(gw, chat(stream=True), "cut")
    entry = line(gw)
    assert entry["error"] == "upstream_stream_interrupted" and entry["usage"]["source"] == "estimate"
    assert calls.names() == ["admit", "settle", "release"]


def test_a_client_that_leaves_mid_stream_is_charged_an_estimate_and_its_slot_freed(gw: InProcess, calls: Calls) -> None:
    ask(gw, chat(stream=True), "hang", read=1)
    entry = line(gw)
    assert entry["error"] == "client_disconnected" and entry["usage"]["source"] == "estimate"
    assert calls.names() == ["admit", "settle", "release"]


@pytest.mark.parametrize("script", ["error", "unavailable"])
def test_an_upstream_error_is_refunded(gw: InProcess, calls: Calls, script: str) -> None:
    ask(gw, chat(), script)
    assert "usage" not in line(gw)
    assert calls.names() == ["admit", "refund", "release"]


def test_an_unreachable_upstream_is_refunded(tmp_path: Path, calls: Calls) -> None:
    with inprocess_gateway(tmp_path, f"http://127.0.0.1:{free_port()}", policy=POLICY) as g:
        assert b" 502 " in ask(g, chat(), "usage").split(b"\r\n", 1)[0]
        assert "usage" not in line(g)
    assert calls.names() == ["admit", "refund", "release"]


def test_failover_charges_the_attempt_that_answered_once(tmp_path: Path, calls: Calls, upstream: Scripted) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    policy = POLICY.replace("rules:", f'upstreams:\n  pair: {{urls: ["{down}", "{upstream.url}"]}}\nrules:')
    policy = policy.replace("    action: allow\n", "    action: route\n    upstream: pair\n")
    with inprocess_gateway(tmp_path, upstream.url, policy=policy) as g:
        ask(g, chat(), "usage")
        entry = line(g)
    assert entry["usage"]["source"] == "usage" and entry.get("failovers")
    assert calls.names() == ["admit", "settle", "release"] and calls.args("settle") == [[18, 7]]


def test_a_bad_max_tokens_is_an_openai_400_and_nothing_is_held(gw: InProcess, calls: Calls) -> None:
    answer = ask(gw, chat(max_tokens=-3), "usage")
    assert b" 400 " in answer.split(b"\r\n", 1)[0]
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "max_tokens"
    line(gw)
    assert calls.names() == []


def test_a_body_that_is_not_json_is_charged_the_unreadable_reserve(gw: InProcess, calls: Calls) -> None:
    ask(gw, b"not json at all", "nousage", ctype=b"text/plain", path=b"/v1/embeddings")
    entry = line(gw)
    assert entry["usage"]["source"] == "estimate"
    assert calls.names() == ["admit", "settle", "release"]
    assert calls.args("admit") == calls.args("settle") == [[300, 300]]


def test_no_max_tokens_reserves_the_rules_output_default(gw: InProcess, calls: Calls) -> None:
    body = chat(max_tokens=None)
    ask(gw, body, "usage")
    assert line(gw)["usage"]["source"] == "usage"
    assert calls.args("admit") == [reserve(body, 50)]


# --- a request no budget limits: observed for the metrics alone --------------------------------------


def unbudgeted(**more: Any) -> bytes:
    """A chat body no rule meters (its model is not ``m``)."""
    return json.dumps({"model": "x", "messages": [{"role": "user", "content": "Hi."}], **more}).encode()


def tokens_of(gw: InProcess, kind: str) -> float | None:
    labels = {"country": "GB", "model": "other", "kind": kind, "source": "usage"}
    gw.metrics.fold()  # the tallies, folded into the counters (the gateway has stopped)
    return gw.metrics.registry.get_sample_value("regiongate_tokens_total", labels)


def test_an_unbudgeted_answer_is_recorded_from_its_usage_and_keeps_its_length(
    tmp_path: Path, upstream: Scripted, calls: Calls
) -> None:
    with inprocess_gateway(tmp_path, upstream.url, policy=POLICY) as g:
        answer = ask(g, unbudgeted(), "usage")
        whole = ask(g, unbudgeted(stream=True, stream_options={"include_usage": True}), "stream")
        plain = ask(g, unbudgeted(stream=True), "stream")
        ask(g, unbudgeted(), "nousage", path=b"/V1/Chat/Completions")  # any case: the same shape
        ask(g, unbudgeted(), "usage", path=b"/V1/CHAT/completions")
        entries = [line(g, n) for n in range(1, 6)]
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert b"content-length: %d" % len(payload) in head.lower() and b"chunked" not in head.lower()
    assert json.loads(payload)["usage"] == USAGE  # the client's bytes, untouched
    assert b'"usage": {' in whole and b"[DONE]" in whole  # what it asked for, as the upstream sent it
    assert b'"usage"' not in plain  # nothing asked, nothing injected
    assert upstream.bodies[2] == unbudgeted(stream=True)  # the body went up as the client sent it
    assert [e.get("usage") for e in entries] == [
        {"input": 11, "output": 7, "source": "usage"},
        {"input": 11, "output": 7, "source": "usage"},
        None,  # a stream without usage: nothing recorded (no estimate: the body was not held)
        None,  # an answer without usage
        {"input": 11, "output": 7, "source": "usage"},
    ]
    assert calls.names() == []  # no budget was asked, settled or released
    assert (tokens_of(g, "input"), tokens_of(g, "output")) == (33.0, 21.0)


def test_record_usage_budgeted_reads_only_budgeted_answers(tmp_path: Path, upstream: Scripted, calls: Calls) -> None:
    with inprocess_gateway(tmp_path, upstream.url, policy=POLICY, record_usage="budgeted") as g:
        ask(g, unbudgeted(), "usage")
        ask(g, chat(), "usage")
        first, second = line(g, 1), line(g, 2)
    assert "usage" not in first
    assert second["usage"] == {"input": 11, "output": 7, "source": "usage"}
    assert tokens_of(g, "input") == 11.0  # the budgeted answer's alone


@pytest.mark.parametrize("asked", [False, True])
def test_a_stream_the_tap_strips_goes_up_asking_for_no_compression(
    gw: InProcess, calls: Calls, upstream: Scripted, asked: bool
) -> None:
    more: dict[str, Any] = {"stream_options": {"include_usage": True}} if asked else {}
    ask(gw, chat(stream=True, **more), "stream", extra=b"accept-encoding: gzip, br\r\n")
    # Stripped (the client did not ask for usage): the tap cannot strip a compressed body, so none is
    # allowed; a client that asked gets the upstream's answer as it is, compressed if it likes.
    assert upstream.headers[-1][b"accept-encoding"] == (b"gzip, br" if asked else b"identity")
    ask(gw, chat(), "usage", extra=b"accept-encoding: gzip\r\n")  # not a stream: nothing stripped
    assert upstream.headers[-1][b"accept-encoding"] == b"gzip"


def test_a_stream_to_an_upstream_that_renames_its_model_goes_up_renamed_and_asking_for_usage(
    tmp_path: Path, calls: Calls, upstream: Scripted
) -> None:
    """The usage injection and the model map compose: the renamed body is the one that asks for usage."""
    renaming = POLICY.replace(
        "rules:\n", f"upstreams:\n  renamer: {{url: '{upstream.url}', models: {{m: m-renamed}}}}\nrules:\n", 1
    ).replace("models: [m]\n    action: allow", "models: [m]\n    action: route\n    upstream: renamer", 1)
    with inprocess_gateway(tmp_path, upstream.url, policy=renaming) as g:
        answer = ask(g, chat(stream=True, stream_options={"chunks": 1}), "stream")
        sent = json.loads(upstream.bodies[-1])
        assert sent["model"] == "m-renamed"
        assert sent["stream_options"] == {"include_usage": True, "chunks": 1}
        assert b'"usage"' not in answer and b"[DONE]" in answer
        assert line(g)["usage"] == {"input": 11, "output": 7, "source": "usage"}
    assert calls.names() == ["admit", "settle", "release"]


def test_with_addresses_hashed_an_ip_subject_is_the_addresses_keyed_hash(
    tmp_path: Path, upstream: Scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--log-address hashed``: a ``by: ip`` budget and slot name the caller by its address's keyed hash
    (the same one for both), never by the address; a subject without ``ip`` is as it was."""
    asked: list[tuple[list[str], Any]] = []
    real_admit = getattr(path, "admit")  # noqa: B009  # the name the request path calls

    def admit(store: Any, budget: Any, subjects: Any, costs: Any, slot: Any, *more: Any) -> None:
        asked.append((list(subjects), slot))
        real_admit(store, budget, subjects, costs, slot, *more)

    monkeypatch.setattr(path, "admit", admit)
    monkeypatch.setenv("REGIONGATE_OVERRIDE_KEY", "a key every replica shares")  # known before any request
    by_ip = POLICY.replace("by: [rule], count: total}", "by: [ip, rule], count: total}", 1).replace(
        "max_concurrent: {streams: 5, by: [rule]}", "max_concurrent: {streams: 5, by: [ip]}", 1
    )
    with inprocess_gateway(tmp_path, upstream.url, policy=by_ip, log_address="hashed") as g:
        assert b" 200 OK" in ask(g, chat(), "usage").split(b"\r\n", 1)[0]
    ((who, slot),) = asked
    hashed = who[0].split(":metered")[0]
    assert who == [f"{hashed}:metered", "metered"] and slot[0] == hashed
    assert hashed.startswith("h%3A") and GB not in hashed and len(hashed) == len("h%3A") + 32
