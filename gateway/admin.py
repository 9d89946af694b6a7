"""The control plane, on its own port: health, readiness, metrics.

Kept apart from the proxy port so that probes and scrapes never compete
with model traffic, and so that the proxy port can be exposed to the world
while this one stays on a private interface.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from .metrics import Metrics, exposition
from .runtime import Runtime


def create_admin_app(runtime: Runtime, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="Regiongate control plane", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Alive: the process answers. Says nothing about policy or upstreams."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Ready: policy and geo data are loaded and the proxy is accepting requests."""
        detail = runtime.describe()
        return JSONResponse(detail, status_code=200 if runtime.ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = exposition(metrics)
        return Response(body, media_type=content_type)

    return app
