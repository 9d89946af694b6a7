"""Envoy's ext_authz over gRPC: ``envoy.service.auth.v3.Authorization/Check`` on ``--authz-grpc-port``.

One ``grpc.aio`` server per worker, on the worker's own event loop: the judge
(:class:`.judge.Judge`, the proxy port's own steps) must be asked on the loop
that owns the Redis batches, and a second thread would cost a cross-thread
hand-off per Check both ways. Workers share the port through SO_REUSEPORT,
which grpcio sets on every listening socket it makes, as the proxy port is
shared by inheritance.

Each Check is read into the core's query (:mod:`.envoy_check`, pure), judged,
and answered: ``ok_response`` with the facts, or ``denied_response`` with the
exact refusal the proxy port would send. A CheckRequest that cannot be judged
gets a 400 for the client, OpenAI-shaped, never a gRPC error (Envoy would
apply ``failure_mode_allow`` to it) and never a traceback; a bug of ours gets
the proxy port's 500 in the same way, logged with its traceback.

The standard health service (``grpc.health.v1.Health``) says SERVING for ""
and for the Authorization service while the worker serves, and NOT_SERVING
from the moment it starts draining, so that Envoy's ``grpc_health_check``
takes it out before the port closes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # no stubs for the aio half

from ..errors import ErrorReply
from .envoy_check import BadCheck, read_check, refusal, respond, unanswerable
from .judge import Judge
from .query import Answer

log = logging.getLogger("regiongate")
SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
INTERNAL = ErrorReply(500, "server_error", "gateway_error", "The gateway failed to handle this request.", True)


@dataclass(frozen=True, slots=True)
class GrpcSettings:
    """Where the gRPC decision service listens, and whose word names the client."""

    host: str
    port: int
    edge: bool  # Envoy is the edge: x-envoy-external-address names the client (else attributes.source)


class Authorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]  # generated, untyped
    """``Check``: one Envoy request, judged as the proxy port judges it."""

    def __init__(self, judge: Judge, edge: bool) -> None:
        self.judge = judge
        self.edge = edge

    async def Check(  # the RPC's name in Envoy's proto
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> external_auth_pb2.CheckResponse:
        try:
            query = read_check(request, peer_address(context.peer()), self.edge)
        except BadCheck as e:
            return unanswerable(str(e))
        try:
            future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
            self.judge.ask(query, future.set_result)
            answer = future.result() if future.done() else await future  # most Checks are answered at once
            return respond(answer)
        except Exception:
            log.exception("envoy_grpc Check failed")
            return refusal(INTERNAL.status, ((b"content-type", b"application/json"),), INTERNAL.body())


def peer_address(peer: str) -> str | None:
    """The address in grpc's ``context.peer()`` (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``); None for a Unix socket."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or None
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]") or None
    return None


class GrpcService:
    """The gRPC server of one worker: Authorization and Health on one port."""

    def __init__(self, judge: Judge, settings: GrpcSettings) -> None:
        self.settings = settings
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),  # every worker listens on the same port
                ("grpc.max_receive_message_length", 64 << 20),  # a CheckRequest carries the body
            ]
        )
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Authorization(judge, settings.edge), self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0

    async def start(self) -> int:
        """Listen; the port (the one given, or the one the OS chose for 0)."""
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        self.port = self.server.add_insecure_port(f"{host}:{self.settings.port}")
        await self.server.start()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float) -> None:
        """NOT_SERVING first, then the Checks under way get ``grace`` seconds to finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
