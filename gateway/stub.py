"""A small OpenAI-compatible upstream, for trying the gateway out and for tests.

It answers ``/v1/models``, ``/v1/chat/completions`` (whole or streamed as
server-sent events) and ``/v1/embeddings``, and echoes anything under
``/echo/`` so a test can see exactly what the gateway forwarded. Request
headers steer it, and they pass through the gateway like any other header:

* ``x-stub-delay``: seconds to wait before answering (first-byte timeouts)
* ``x-stub-chunk-delay``: seconds between streamed chunks
* ``x-stub-cut-after``: drop the connection after this many chunks
* ``x-stub-status``: answer with this status and an OpenAI-shaped error

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
    def __init__(self, status: int | None = None, refuse_region: bool = False) -> None:
        self.status = status
        self.refuse_region = refuse_region
        self.requests = 0
        self.streams_abandoned = 0
        self.streams_completed = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count], client_max_size=256 * 1024 * 1024)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
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
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(items))],
                "model": body.get("model", "stub-embedding"),
                "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
            }
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body.get("model", "stub-model")
        created = int(time.time())
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-stub",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": " ".join(WORDS)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": len(WORDS), "total_tokens": len(WORDS) + 1},
                }
            )
        chunk_delay = float(request.headers.get("x-stub-chunk-delay", "0"))
        cut_after = int(request.headers.get("x-stub-cut-after", "-1"))
        count = int(request.headers.get("x-stub-chunks", str(len(WORDS))))
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await response.prepare(request)
        try:
            for i in range(count):
                if i == cut_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                chunk = {
                    "id": "chatcmpl-stub",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": WORDS[i % len(WORDS)] + " "}, "finish_reason": None}],
                }
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                if chunk_delay:
                    await asyncio.sleep(chunk_delay)
            done = {
                "id": "chatcmpl-stub",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
            await response.write(b"data: " + json.dumps(done).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
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
        Stub(status, refuse_region).app(),
        sock=sock,
        ssl_context=context,
        print=lambda *_: print(f"stub upstream on {scheme}://{host}:{port}"),
        handler_cancellation=True,
    )
