"""A small OpenAI-compatible upstream, for trying the gateway out and for tests.

It answers ``/v1/models``, ``/v1/chat/completions`` (whole or streamed as
server-sent events), ``/v1/embeddings``, the Responses API's ``/v1/responses``
and Anthropic-style ``/v1/messages`` (each whole or streamed, in its provider's
event shapes), and echoes anything under ``/echo/`` so a test can see exactly
what the gateway forwarded.

Usage is reported as each provider does: in every whole answer; in a chat
stream only when the request asks with ``stream_options.include_usage`` (then,
as OpenAI does, every chunk carries ``"usage": null`` and a last chunk with
``"choices": []`` carries the counts, before ``[DONE]``); in the Responses
API's ``response.completed``; in Anthropic's ``message_start`` and
``message_delta``. The counts are deterministic and follow the request: input
tokens from its text (a quarter of its UTF-8 bytes, three more per message),
output tokens one per streamed word, at most ``max_tokens`` (or
``max_completion_tokens``, ``max_output_tokens``: a stream cut by it ends with
``finish_reason: "length"``). ``--ignore-stream-options`` never sends a chat
stream's usage, asked or not (an upstream that ignores ``stream_options``),
and ``--no-usage`` sends no usage anywhere. Request headers steer it, and they
pass through the gateway like any other header:

* ``x-stub-delay``: seconds to wait before answering (first-byte timeouts)
* ``x-stub-chunk-delay``: seconds between streamed chunks
* ``x-stub-cut-after``: drop the connection after this many chunks
* ``x-stub-status``: answer with this status and an OpenAI-shaped error
* ``x-stub-chunks``: how many words a stream sends (13 by default)
* ``x-stub-created``: the ``created`` timestamp to write (two answers compared byte for byte)

``GET /bytes/N`` streams N bytes as fast as the socket takes them (for
backpressure tests), and ``/echo/`` says which client port the request came
from (for keep-alive tests). ``--certfile``/``--keyfile`` serve HTTPS.

``GET /_stub/stats`` says how many requests arrived and how many streams
were abandoned by their client (a gateway that cancels upstream work on
client disconnect shows up there).

Started with ``--status N`` it answers every request (after reading its
body) with that status and an OpenAI-shaped error, and with
``--refuse-region`` with OpenAI's own refusal of the caller's region: an
upstream that is down, or that refuses the gateway's egress address, whatever
the request says (for failover tests, where one request reaches several).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

# OpenAI's answer to a caller from a region it does not serve, byte for byte.
REGION_REFUSAL = (
    b'{"error":{"message":"Country, region, or territory not supported","type":"request_forbidden",'
    b'"param":null,"code":"unsupported_country_region_territory"}}'
)
WORDS = ["Hello", "from", "the", "Regiongate", "stub", "upstream", ".", "This", "is", "a", "streamed", "answer", "."]


class Stub:
    def __init__(
        self,
        status: int | None = None,
        refuse_region: bool = False,
        *,
        ignore_stream_options: bool = False,
        no_usage: bool = False,
    ) -> None:
        self.status = status
        self.refuse_region = refuse_region
        self.ignore_stream_options = ignore_stream_options
        self.no_usage = no_usage
        self.requests = 0
        self.streams_abandoned = 0
        self.streams_completed = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count], client_max_size=256 * 1024 * 1024)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_route("*", "/echo/{tail:.*}", self.echo)
        app.router.add_get("/bytes/{n:[0-9]+}", self.bytes)
        app.router.add_get("/_stub/stats", self.stats)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/_stub/"):
            self.requests += 1
            if self.refuse_region or self.status:
                await request.read()
                if self.refuse_region:
                    return web.Response(status=403, body=REGION_REFUSAL, content_type="application/json")
                return _error(self.status or 500)
        delay = float(request.headers.get("x-stub-delay", "0"))
        if delay:
            await asyncio.sleep(delay)
        status = request.headers.get("x-stub-status")
        if status:
            return _error(int(status))
        response: web.StreamResponse = await handler(request)
        return response

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "requests": self.requests,
                "streams_abandoned": self.streams_abandoned,
                "streams_completed": self.streams_completed,
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "stub-model", "object": "model", "created": 0, "owned_by": "stub"}]}
        )

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        inputs = body.get("input", "")
        items = inputs if isinstance(inputs, list) else [inputs]
        answer: dict[str, Any] = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(items))],
            "model": body.get("model", "stub-embedding"),
        }
        if not self.no_usage:
            tokens = sum(max(1, _tokens(_text(item))) for item in items)
            answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.json_response(answer)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body.get("model", "stub-model")
        created = _created(request)
        cap = _cap(body, "max_completion_tokens", "max_tokens")
        prompt = prompt_tokens(body)
        if not body.get("stream"):
            words = WORDS[:cap]
            answer: dict[str, Any] = {
                "id": "chatcmpl-stub",
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(words)},
                        "finish_reason": "stop" if len(words) == len(WORDS) else "length",
                    }
                ],
            }
            if not self.no_usage:
                answer["usage"] = _openai_usage(prompt, len(words))
            return web.json_response(answer)
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        usage = usage and not (self.ignore_stream_options or self.no_usage)
        words = _stream_words(request, cap)

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            out: dict[str, Any] = {
                "id": "chatcmpl-stub",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
            }
            if usage:
                out["usage"] = None
            return out

        events = [
            _data(chunk([{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}])) for word in words
        ]
        finish = "length" if cap is not None and len(words) == cap < _chunks(request) else "stop"
        tail = [_data(chunk([{"index": 0, "delta": {}, "finish_reason": finish}]))]
        if usage:
            last = chunk([])
            last["usage"] = _openai_usage(prompt, len(words))
            tail.append(_data(last))
        tail.append(b"data: [DONE]\n\n")
        return await self._stream(request, events, tail)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API: ``output_text`` deltas, then ``response.completed`` with the usage."""
        body = await request.json()
        cap = _cap(body, "max_output_tokens")
        words = WORDS[:cap] if not body.get("stream") else _stream_words(request, cap)
        text = " ".join(words)
        usage = None
        if not self.no_usage:
            prompt = prompt_tokens(body)
            usage = {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": len(words),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + len(words),
            }
        message = {
            "type": "message",
            "id": "msg_stub",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }

        def response(status: str, output: list[Any], usage: Any) -> dict[str, Any]:
            return {
                "id": "resp_stub",
                "object": "response",
                "created_at": _created(request),
                "status": status,
                "model": body.get("model", "stub-model"),
                "output": output,
                "usage": usage,
            }

        if not body.get("stream"):
            whole = response("completed", [message], usage)
            if usage is None:
                del whole["usage"]
            return web.json_response(whole)
        seq = iter(range(1 << 30))
        item = {"item_id": "msg_stub", "output_index": 0, "content_index": 0}
        head = [
            _event("response.created", {"sequence_number": next(seq), "response": response("in_progress", [], None)})
        ]
        events = [
            _event("response.output_text.delta", {"sequence_number": next(seq), **item, "delta": w + " "})
            for w in words
        ]
        tail = [
            _event("response.output_text.done", {"sequence_number": next(seq), **item, "text": text}),
            _event(
                "response.completed",
                {"sequence_number": next(seq), "response": response("completed", [message], usage)},
            ),
        ]
        return await self._stream(request, events, tail, head)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's messages: input usage in ``message_start``, the output count in ``message_delta``."""
        body = await request.json()
        cap = _cap(body, "max_tokens")
        words = WORDS[:cap] if not body.get("stream") else _stream_words(request, cap)
        stop = "max_tokens" if cap is not None and len(words) == cap else "end_turn"
        prompt = prompt_tokens(body)
        message: dict[str, Any] = {
            "id": "msg_stub",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "stub-model"),
            "content": [{"type": "text", "text": " ".join(words)}],
            "stop_reason": stop,
            "stop_sequence": None,
        }
        if not body.get("stream"):
            if not self.no_usage:
                message["usage"] = {"input_tokens": prompt, "output_tokens": len(words)}
            return web.json_response(message)
        start = {**message, "content": [], "stop_reason": None}
        if not self.no_usage:
            start["usage"] = {"input_tokens": prompt, "output_tokens": 1}
        delta: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}}
        if not self.no_usage:
            delta["usage"] = {"output_tokens": len(words)}
        head = [
            _event("message_start", {"message": start}),
            _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            _event("ping", {}),
        ]
        events = [
            _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w + " "}}) for w in words
        ]
        tail = [
            _event("content_block_stop", {"index": 0}),
            b"event: message_delta\ndata: " + json.dumps(delta).encode() + b"\n\n",
            _event("message_stop", {}),
        ]
        return await self._stream(request, events, tail, head)

    async def _stream(
        self, request: web.Request, events: list[bytes], tail: list[bytes], head: list[bytes] | None = None
    ) -> web.StreamResponse:
        """Send ``head``, then ``events`` one write each (``x-stub-chunk-delay`` apart, cut after
        ``x-stub-cut-after`` of them), then ``tail``."""
        chunk_delay = float(request.headers.get("x-stub-chunk-delay", "0"))
        cut_after = int(request.headers.get("x-stub-cut-after", "-1"))
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await response.prepare(request)
        try:
            for event in head or ():
                await response.write(event)
            for i, event in enumerate(events):
                if i == cut_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                await response.write(event)
                if chunk_delay:
                    await asyncio.sleep(chunk_delay)
            for event in tail:
                await response.write(event)
            await response.write_eof()
            self.streams_completed += 1
        except (ConnectionError, asyncio.CancelledError):
            self.streams_abandoned += 1
            raise
        return response

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path.split("?")[0],
                "query": request.raw_path.partition("?")[2],
                "headers": [[k, v] for k, v in request.headers.items()],
                "host": request.host,
                "body": body.decode("utf-8", "replace"),
                "body_length": len(body),
                "client_port": request.transport.get_extra_info("peername")[1] if request.transport else None,
            }
        )

    async def bytes(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        response = web.StreamResponse(headers={"content-type": "application/octet-stream"})
        response.content_length = n
        await response.prepare(request)
        block = b"x" * 65536
        while n > 0:
            await response.write(block[: min(n, len(block))])
            n -= len(block)
        await response.write_eof()
        return response


def prompt_tokens(body: dict[str, Any]) -> int:
    """The stub's input count: a quarter of the UTF-8 bytes of the request's text, rounded up, per
    message (three more for each, as OpenAI frames them), plus three; deterministic."""
    parts: list[Any] = []
    for key in ("system", "instructions", "prompt"):
        if key in body:
            parts.append(body[key])
    messages = body.get("messages")
    if isinstance(messages, list):
        parts += messages
    given = body.get("input")
    if isinstance(given, list):
        parts += given
    elif given is not None:
        parts.append(given)
    return 3 + sum(_tokens(_text(part)) + (3 if isinstance(part, dict) else 0) for part in parts)


def _text(value: Any) -> str:
    """The text in a message, a content part list or a plain string."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text(v) for v in value)
    if isinstance(value, dict):
        return _text(value.get("content", "")) + _text(value.get("text", ""))
    return ""


def _tokens(text: str) -> int:
    return -(-len(text.encode()) // 4)


def _cap(body: dict[str, Any], *names: str) -> int | None:
    """The request's output cap (the first of ``names`` that is a positive integer)."""
    for name in names:
        value = body.get(name)
        if type(value) is int and value > 0:
            return value
    return None


def _chunks(request: web.Request) -> int:
    return int(request.headers.get("x-stub-chunks", str(len(WORDS))))


def _stream_words(request: web.Request, cap: int | None) -> list[str]:
    count = _chunks(request)
    if cap is not None:
        count = min(count, cap)
    return [WORDS[i % len(WORDS)] for i in range(count)]


def _created(request: web.Request) -> int:
    return int(request.headers.get("x-stub-created") or time.time())


def _openai_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    """A named event, its ``type`` written first in its data (as Anthropic and the Responses API do)."""
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps({"type": kind, **payload}).encode())


def _error(code: int) -> web.Response:
    return web.json_response(
        {"error": {"message": f"stub error {code}", "type": "stub_error", "param": None, "code": "stub"}},
        status=code,
    )


def run(
    host: str = "127.0.0.1",
    port: int = 8000,
    certfile: str | None = None,
    keyfile: str | None = None,
    *,
    status: int | None = None,
    refuse_region: bool = False,
    ignore_stream_options: bool = False,
    no_usage: bool = False,
) -> None:
    context = None
    if certfile:
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certfile, keyfile)
    scheme = "https" if context else "http"
    from .server import bind

    sock = bind(host, port, "stub upstream (--host/--port)")  # ConfigError in one line, as serve gives it
    web.run_app(
        Stub(status, refuse_region, ignore_stream_options=ignore_stream_options, no_usage=no_usage).app(),
        sock=sock,
        ssl_context=context,
        print=lambda *_: print(f"stub upstream on {scheme}://{host}:{port}"),
        handler_cancellation=True,
    )
