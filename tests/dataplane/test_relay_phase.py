"""The relay's phases: ordered, changed in one place, DONE final, and shown by its repr (in-process)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from gateway.dataplane.relay import COMPLETE, CONNECTING, DONE, SENDING, SNIFFING, STREAMING, Phase, Relay


class _Request(SimpleNamespace):
    def forget_headers(self) -> None:
        pass


def _relay() -> Relay:
    request: Any = _Request(method="POST", chunked=False, has_body=True, length=3)
    pool: Any = SimpleNamespace(
        loop=SimpleNamespace(time=lambda: 0.0), host_header=b"h", upstream=SimpleNamespace(label="openai/0")
    )
    record: Any = SimpleNamespace(attempts=1, sent=12)
    return Relay(request, pool, b"/v1/x", [], b"rid", (b"x-regiongate-policy", b"t"), record, lambda: None)


def test_phases_are_ordered_as_an_attempt_lives() -> None:
    assert list(Phase) == [CONNECTING, SENDING, SNIFFING, STREAMING, COMPLETE, DONE]
    assert CONNECTING < SENDING < SNIFFING < STREAMING < COMPLETE < DONE


def test_done_is_final_and_repr_shows_the_phase() -> None:
    relay = _relay()
    assert relay.phase is CONNECTING
    assert repr(relay) == "<Relay CONNECTING POST openai/0 attempts=1 sent=12>"
    relay._enter(STREAMING)
    relay.sse = True
    assert repr(relay) == "<Relay STREAMING POST openai/0 attempts=1 sent=12 sse>"
    relay._enter(DONE)
    relay._enter(COMPLETE)  # e.g. a body that failed to decode as the response completed
    assert relay.phase is DONE
