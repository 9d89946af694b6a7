"""The control plane, on its own port: health, readiness, metrics, and the admin API.

Kept apart from the proxy port so that probes and scrapes never compete
with model traffic, and so that the proxy port can be exposed to the world
while this one stays on a private interface.

``/admin/*`` changes or reveals what the gateway enforces, so it needs a
bearer token (``REGIONGATE_ADMIN_TOKEN``, compared in constant time). With
no token configured the admin API does not exist: every ``/admin/*`` path
answers 404, exactly as an unknown path does.
"""

from __future__ import annotations

import hmac
import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from .metrics import Metrics, exposition
from .runtime import Runtime

if TYPE_CHECKING:
    from .live.reload import Live

ADMIN_TOKEN_ENV = "REGIONGATE_ADMIN_TOKEN"


def admin_token() -> str | None:
    return os.environ.get(ADMIN_TOKEN_ENV) or None


async def require_admin(request: Request) -> None:
    """Dependency for every ``/admin/*`` route: the bearer token, or nothing."""
    token: str | None = request.app.state.admin_token
    if token is None:
        raise HTTPException(status_code=404, detail="Not Found")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(
            status_code=401,
            detail="admin API: missing or wrong bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


class PolicyFileResult(BaseModel):
    ok: bool
    changed: bool
    path: str
    sha256: str
    version: str
    error: str | None
    candidate_sha256: str | None


class ReloadResponse(PolicyFileResult):
    """The main policy's result at the top level; the shadow policy's, if one is configured, under ``shadow``."""

    pid: int
    shadow: PolicyFileResult | None = None


class PolicyDocument(BaseModel):
    path: str
    source: str
    sha256: str
    version: str
    loaded_at: str
    text: str


class ActivePolicies(PolicyDocument):
    shadow: PolicyDocument | None = None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def create_admin_app(runtime: Runtime, metrics: Metrics, live: Live | None = None) -> FastAPI:
    app = FastAPI(title="Regiongate control plane", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.admin_token = admin_token()

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Alive: the process answers. Says nothing about policy or upstreams."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Ready: policy and geo data are loaded and the proxy is accepting requests.

        A refused policy reload is a warning here, not unreadiness: the last
        good policy is still serving. Stale GeoIP data is a warning too,
        unless ``--stale-geoip-not-ready``.
        """
        detail = runtime.describe()
        return JSONResponse(detail, status_code=200 if detail["ready"] else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.geoip_ages(runtime.geo.sources)
        body, content_type = exposition(metrics)
        return Response(body, media_type=content_type)

    admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

    def document(role: str) -> PolicyDocument | None:
        pv = runtime.active.current if role == "policy" else runtime.active.shadow_version
        if pv is None:
            return None
        path = runtime.policy_path if role == "policy" else str(runtime.settings.shadow_policy)
        return PolicyDocument(
            path=path,
            source=os.path.realpath(path),
            sha256=pv.sha256,
            version=pv.version,
            loaded_at=_iso(pv.loaded_at),
            text=pv.text,
        )

    @admin.get("/policy", response_model=ActivePolicies)
    async def active_policy() -> ActivePolicies:
        """The policy in force as it was read: text, hash, version, when loaded, from which file."""
        current = document("policy")
        assert current is not None
        return ActivePolicies(**current.model_dump(), shadow=document("shadow"))

    @admin.post(
        "/reload",
        response_model=ReloadResponse,
        responses={422: {"model": ReloadResponse, "description": "a candidate was refused; the old one serves"}},
    )
    async def reload() -> JSONResponse:
        """Re-read the policy (and shadow policy and GeoIP files) now, in every worker.

        This worker's result is returned; the others reload through the
        supervisor's SIGHUP. 422 when a candidate was refused.
        """
        if live is None:
            raise HTTPException(status_code=503, detail="reloading is not available in this process")
        results = {r.role: r.as_dict() for r in await live.admin_reload()}
        body = ReloadResponse(**results["policy"], pid=os.getpid(), shadow=results.get("shadow"))
        ok = body.ok and (body.shadow is None or body.shadow.ok)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 422)

    app.include_router(admin)
    return app
