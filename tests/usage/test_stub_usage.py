"""The bundled stub's usage, read through the tap: every shape, streamed and not, and the strip.

The stub's aiohttp app runs in this process (on a loopback port; no subprocess), and its answers are
read as the wire carries them, so what the tap is fed is what a relay would feed it. The strip is
checked the way the issue asks: the stub's stream with the gateway's injection, stripped, is byte
for byte the stub's stream without it, whatever the read sizes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.stub import WORDS, Stub, prompt_tokens
from gateway.usage import Usage
from gateway.usage.estimate import output_from_text
from gateway.usage.request import read_request, with_usage
from gateway.usage.shapes import shape_of
from gateway.usage.tap import UsageTap

FIXED = {"x-stub-created": "1700000000"}  # the same `created` in both answers compared


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    servers: list[TestServer] = []

    async def start(**options: bool) -> str:
        server = TestServer(Stub(**options).app(), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url(""))

    yield start
    for server in servers:
        await server.close()


async def post(url: str, path: str, body: bytes, read: int = 7) -> list[bytes]:
    """The answer's body as it came off the socket, in reads of at most ``read`` bytes."""
    headers = {"content-type": "application/json", **FIXED}
    async with aiohttp.ClientSession() as session, session.post(url + path, data=body, headers=headers) as r:
        assert r.status == 200
        return [piece async for piece in r.content.iter_chunked(read)]


def tapped(pieces: list[bytes], path: str, strip: bool, model: str | None = "gpt-4o") -> tuple[bytes, UsageTap]:
    tap = UsageTap(shape_of(path), strip, model)
    return b"".join(tap.feed(piece) for piece in pieces) + tap.end(), tap


CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "How many tokens is this?"}], "stream": True}


@pytest.mark.parametrize("read", [1, 7, 4096])
async def test_a_stripped_stream_is_byte_for_byte_the_stream_without_the_injection(serve: Any, read: int) -> None:
    url = await serve()
    body = json.dumps(CHAT).encode()
    direct = b"".join(await post(url, "/v1/chat/completions", body, read))
    asked = read_request(body, "/v1/chat/completions")
    assert asked.stream and not asked.wants_usage
    injected = with_usage(body)
    upstream = await post(url, "/v1/chat/completions", injected, read)
    assert b'"usage": null' in b"".join(upstream) and b'"choices": []' in b"".join(upstream)
    out, tap = tapped(upstream, "/v1/chat/completions", strip=True)
    assert out == direct
    assert tap.usage() == Usage(prompt_tokens(CHAT), 13)
    # the client's own include_usage: the gateway changes nothing, and reads the same usage
    out, tap = tapped(upstream, "/v1/chat/completions", strip=False)
    assert out == b"".join(upstream) and tap.usage() == Usage(prompt_tokens(CHAT), 13)


async def test_the_stubs_counts_follow_the_prompt_and_max_tokens(serve: Any) -> None:
    url = await serve()
    longer = {**CHAT, "messages": [{"role": "user", "content": "word " * 100}], "max_tokens": 5}
    path = "/v1/chat/completions"
    out, tap = tapped(await post(url, path, with_usage(json.dumps(longer).encode())), path, True)
    assert tap.usage() == Usage(prompt_tokens(longer), 5)
    assert prompt_tokens(longer) > prompt_tokens(CHAT)
    assert b'"finish_reason": "length"' in out


@pytest.mark.parametrize("option", ["ignore_stream_options", "no_usage"])
async def test_an_upstream_that_sends_no_usage_is_estimated(serve: Any, option: str) -> None:
    url = await serve(**{option: True})
    pieces = await post(url, "/v1/chat/completions", with_usage(json.dumps(CHAT).encode()))
    out, tap = tapped(pieces, "/v1/chat/completions", strip=True)
    assert out == b"".join(pieces) and b"usage" not in out
    assert tap.usage() is None
    estimate = tap.estimate(40)
    assert estimate.source == "estimate" and estimate.input == 40
    text = "".join(w + " " for w in WORDS)
    exact = output_from_text(len(text), "gpt-4o")  # from the answer's text
    assert exact * 0.8 <= estimate.output <= exact * 1.25  # read 7 bytes at a time: counted in a sample, scaled
    whole = b"".join(pieces)
    out, tap = tapped([whole], "/v1/chat/completions", strip=True)
    assert tap.estimate(40).output == exact  # one read: all of it counted


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi you"}], "max_tokens": 4}),
        ("/v1/responses", {"model": "m", "input": "Write a haiku about borders.", "max_output_tokens": 6}),
        ("/v1/messages", {"model": "claude-x", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}),
    ],
)
async def test_every_shape_streamed_and_not(serve: Any, path: str, body: dict[str, Any], stream: bool) -> None:
    url = await serve()
    body = {**body, "stream": stream}
    raw = json.dumps(body).encode()
    if stream and path == "/v1/chat/completions":
        raw = with_usage(raw)
    cap = read_request(raw, path).output_cap
    assert cap is not None
    pieces = await post(url, path, raw, read=5)
    out, tap = tapped(pieces, path, strip=False, model=body["model"])
    assert out == b"".join(pieces)
    assert tap.usage() == Usage(prompt_tokens(body), cap)


async def test_embeddings(serve: Any) -> None:
    url = await serve()
    body = {"model": "text-embedding-3-small", "input": ["one", "two words here"]}
    _, tap = tapped(await post(url, "/v1/embeddings", json.dumps(body).encode()), "/v1/embeddings", False)
    assert tap.usage() == Usage(1 + 4, 0)


async def test_no_usage_anywhere(serve: Any) -> None:
    url = await serve(no_usage=True)
    for path, body in [
        ("/v1/chat/completions", {"model": "m", "messages": []}),
        ("/v1/responses", {"model": "m", "input": "x", "stream": True}),
        ("/v1/messages", {"model": "m", "messages": [], "stream": True, "max_tokens": 2}),
        ("/v1/embeddings", {"model": "m", "input": "x"}),
    ]:
        out, tap = tapped(await post(url, path, json.dumps(body).encode()), path, False)
        assert b'"usage": {' not in out and tap.usage() is None, path  # the Responses API's is null
