"""``--authz-grpc-port`` in ``regiongate serve``: checked before listening, started per worker.

grpcio is imported only when the port is given, so a gateway installed without the
``envoy`` extra starts as before, and one given the port without the extra stops with a
sentence that names the extra, not an ImportError. The port is tried before anything
listens, so a port in use is reported like the proxy port's (``server.bind``); each
worker then listens itself, through SO_REUSEPORT (:mod:`.envoy_grpc`).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..dataplane.limits import Limits
    from ..proxy.record import Metrics
    from ..runtime import Runtime, Settings
    from .envoy_grpc import GrpcService

WHAT = "Envoy gRPC decision service (--authz-grpc-host/--authz-grpc-port)"
# A Check waits at most on Redis (--redis-timeout, at most 5 s): a draining worker gives the
# Checks under way this long past it before it closes the port.
_GRACE = 1.0


def check(settings: Settings) -> str | None:
    """A problem with ``--authz-grpc-port`` (the extra missing, a port taken), or None; nothing when it is off."""
    if not settings.authz_grpc_port:
        return None
    missing = [m for m in ("grpc", "grpc_health", "envoy") if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"--authz-grpc-port needs the envoy extra ({', '.join(missing)} not installed): "
            "pip install 'regiongate[envoy]'"
        )
    taken = {settings.port: "--port", settings.admin_port: "--admin-port", settings.authz_port: "--authz-port"}
    if settings.authz_grpc_port in taken:
        return f"--authz-grpc-port {settings.authz_grpc_port} is the {taken[settings.authz_grpc_port]} too"
    return None


async def start(runtime: Runtime, metrics: Metrics, limits: Limits) -> GrpcService | None:
    """This worker's gRPC server, listening; None when ``--authz-grpc-port`` is 0."""
    s = runtime.settings
    if not s.authz_grpc_port:
        return None
    from .envoy_grpc import GrpcService, GrpcSettings
    from .judge import Judge

    service = GrpcService(
        Judge(runtime, metrics, limits, "envoy_grpc"),
        GrpcSettings(s.authz_grpc_host, s.authz_grpc_port, s.authz_grpc_envoy_edge),
    )
    await service.start()
    return service


async def stop(service: GrpcService | None, redis_timeout: float) -> None:
    if service is not None:
        await service.stop(redis_timeout + _GRACE)


def describe(settings: Settings) -> list[str]:
    """The startup line, when the service is on."""
    if not settings.authz_grpc_port:
        return []
    client = "x-envoy-external-address" if settings.authz_grpc_envoy_edge else "the CheckRequest's source address"
    return [
        f"Envoy ext_authz gRPC on {settings.authz_grpc_host}:{settings.authz_grpc_port} "
        f"(envoy.service.auth.v3.Authorization/Check, grpc.health.v1; the client is {client})"
    ]
