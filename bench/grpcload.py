"""The gRPC Check load generator, and the empty servicer it is compared with (``python -m bench.grpcload``).

``client``: grpc.aio, one channel per ``--channels``, ``--concurrency`` calls in flight in total,
each sending ``envoy.service.auth.v3.CheckRequest``s shaped as Envoy sends them (the benchmark's
address rotation: one caller in four refused), for ``--warmup`` then ``--seconds``; prints one
JSON line: calls answered in the window, the window, this process's CPU seconds in it (so the
run can show the client was not the bottleneck), and the answers by kind.

``empty``: a grpc.aio server whose Check returns an empty CheckResponse: what grpcio itself costs
per call (HTTP/2 framing, protobuf parsing, the asyncio hand-offs), with no decision at all.

ghz (the usual gRPC load tool) is a Go binary on neither PyPI nor npm, so this is grpcio on both
sides. Standard library plus the envoy extra (grpcio, xds-protos).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from .common import CHAT_PATH, PROBE_BODY, ROTATION


def check_request(client: str) -> external_auth_pb2.CheckRequest:
    """One Check for a chat completion from ``client``, as Envoy (the edge, body sent) fills it."""
    headers = {
        ":authority": "api.example.com",
        ":method": "POST",
        ":path": CHAT_PATH,
        ":scheme": "http",
        "content-type": "application/json",
        "content-length": str(len(PROBE_BODY)),
        "x-envoy-external-address": client,
        "x-forwarded-proto": "http",
        "x-request-id": "2f0e4c1e-bench",
    }
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="1", method="POST", headers=headers, path=CHAT_PATH, host="api.example.com", scheme="http",
        protocol="HTTP/1.1", size=len(PROBE_BODY), raw_body=PROBE_BODY,
    )  # fmt: skip
    source = address_pb2.Address(socket_address=address_pb2.SocketAddress(address=client, port_value=50000))
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            source=attribute_context_pb2.AttributeContext.Peer(address=source),
            request=attribute_context_pb2.AttributeContext.Request(http=http),
        )
    )


async def client(port: int, seconds: float, warmup: float, concurrency: int, channels: int) -> dict[str, Any]:
    requests = [check_request(a) for a in ROTATION]
    kinds: Counter[str] = Counter()
    counting = False
    stop = False

    async def loop(stub: Any, offset: int) -> None:
        i = offset
        while not stop:
            answer = await stub.Check(requests[i % len(requests)])
            i += 1
            if counting:
                kinds[answer.WhichOneof("http_response") or "none"] += 1

    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(channels)]
    stubs = [external_auth_pb2_grpc.AuthorizationStub(c) for c in chans]
    tasks = [asyncio.create_task(loop(stubs[n % channels], n)) for n in range(concurrency)]
    await asyncio.sleep(warmup)
    counting = True
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    counting = False
    cpu1, t1 = time.process_time(), time.perf_counter()
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in chans:
        await c.close(None)
    return {"calls": sum(kinds.values()), "seconds": t1 - t0, "client_cpu_s": cpu1 - cpu0, "kinds": dict(kinds)}


class Empty(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]  # generated, untyped
    async def Check(self, request: Any, context: Any) -> external_auth_pb2.CheckResponse:
        return external_auth_pb2.CheckResponse()


async def empty(port: int) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Empty(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grpcload")
    p.add_argument("role", choices=["client", "empty"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--channels", type=int, default=4)
    args = p.parse_args(argv)
    run: Callable[[Coroutine[Any, Any, Any]], Any] = asyncio.run
    with contextlib.suppress(ImportError):  # uvloop is a dependency on Linux; the gateway runs on it
        import uvloop

        run = uvloop.run
    if args.role == "empty":
        run(empty(args.port))
        return 0
    print(json.dumps(run(client(args.port, args.seconds, args.warmup, args.concurrency, args.channels))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
