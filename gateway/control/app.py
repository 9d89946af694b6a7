"""The control plane, on its own port: health, readiness, metrics, admin API.

Kept apart from the proxy port so that probes and scrapes never compete
with model traffic, and so that the proxy port can be exposed to the world
while this one stays on a private interface.

``/admin/*`` can say what the gateway would do with any address and what a
candidate policy would change, so it needs a bearer token
(``REGIONGATE_ADMIN_TOKEN``). With no token configured the admin API does not
exist: every ``/admin/*`` route answers 404, so a gateway started without one
never exposes an unauthenticated admin surface. The OpenAPI document of the
admin API is itself under ``/admin`` and needs the token too; it describes
only ``/admin/*`` (``/docs`` is off).
``GET /admin/policy/map.svg`` draws the policy in force on a world map
(:mod:`gateway.evidence.policymap`).
``POST /admin/reload`` and ``GET /admin/policy`` belong to the live policy
(:mod:`gateway.live`); the other routes only read.

This app runs on the control plane's own thread and event loop
(:mod:`gateway.control.listener`), behind :mod:`gateway.control.gate`, which
checks the token before any body is read. Its request and response models are
in :mod:`gateway.control.schemas`. What it reads or changes on the proxy's side (the override store, the
live reloader, the geo lookup cache, the state ``/readyz`` describes) it
reaches through ``app.state.proxy``, a :class:`~gateway.control.proxyloop.ProxyLoop`;
parsing and diffing a candidate run in worker threads, at most
:data:`HEAVY_AT_ONCE` at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .. import __version__
from ..metrics import FOLD_WAIT, Metrics, exposition
from ..policy import PolicySpec
from ..policy.clientkeys import ClientKey, ClientKeyError
from ..policy.overrides import Override, OverrideError, new_override
from ..runtime import Runtime
from ..shared.clientkeys import KeyConflict, KeysUnavailable
from ..shared.redisconn import RedisUnavailable
from .gate import MAX_BODY
from .proxyloop import ProxyLoop
from .schemas import (
    ActivePolicies,
    CandidateError,
    CandidateTests,
    ClientKeyIn,
    ClientKeyIssued,
    ClientKeyList,
    ClientKeyOut,
    ClientKeyRevoked,
    DiffOut,
    ErrorBody,
    ExplainOut,
    OverrideIn,
    OverrideList,
    OverrideOut,
    OverrideRemoved,
    PolicyDocument,
    ReloadResponse,
)

if TYPE_CHECKING:
    from ..live.reload import Live

ADMIN_TOKEN_ENV = "REGIONGATE_ADMIN_TOKEN"
KEY_SHOWN_ONCE = "This token is shown once and never again (only its keyed hash is kept): store it now."
MAX_CANDIDATE_BYTES = MAX_BODY
# Candidate parses and diffs in worker threads at once; more wait their turn
# (the control plane's connection cap bounds how many can wait).
HEAVY_AT_ONCE = 2
# /healthz asks the proxy's loop to run a no-op: a loop that cannot do that in
# this long is stuck, and the process is not alive in any useful sense.
LIVENESS_TIMEOUT = 5.0


def admin_token() -> str | None:
    return os.environ.get(ADMIN_TOKEN_ENV) or None


_bearer = HTTPBearer(auto_error=False, description=f"The token in {ADMIN_TOKEN_ENV}.")


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Bearer-token check for every ``/admin/*`` route, compared in constant time."""
    token: str | None = getattr(request.app.state, "admin_token", None)
    if not token:
        raise HTTPException(404, "Not Found")
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "a valid admin bearer token is required", headers={"WWW-Authenticate": "Bearer"})


def _override_out(o: Override) -> OverrideOut:
    return OverrideOut(**o.public())


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


# What the gate (gateway.control.gate) answers before any route runs: the token, then the body's size and time.
_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong bearer token."},
    404: {"model": ErrorBody, "description": f"The admin API is disabled: {ADMIN_TOKEN_ENV} is not set."},
    408: {"model": ErrorBody, "description": "The request body did not arrive within the header timeout."},
    413: {"model": ErrorBody, "description": f"The request body is larger than {MAX_BODY} bytes."},
}

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)], responses=_AUTH_RESPONSES)


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _proxy(request: Request) -> ProxyLoop:
    proxy: ProxyLoop = request.app.state.proxy
    return proxy


async def _heavy(request: Request, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a worker thread, at most HEAVY_AT_ONCE at a time."""
    async with request.app.state.heavy:
        return await asyncio.to_thread(fn, *args)


@router.get("/openapi.json", include_in_schema=False)
def admin_openapi(request: Request) -> dict[str, Any]:
    app: FastAPI = request.app
    cached: dict[str, Any] | None = getattr(app.state, "openapi", None)
    if cached is None:
        cached = app.state.openapi = _admin_openapi(app)
    return cached


def _admin_openapi(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(
        title="Regiongate admin API",
        version=__version__,
        description=f"Bearer token: the value of {ADMIN_TOKEN_ENV}. Not set: every /admin route answers 404.",
        routes=app.routes,
    )
    doc["paths"] = {path: ops for path, ops in doc.get("paths", {}).items() if path.startswith("/admin/")}
    # The diff body is a policy file: its schema is the one editors use.
    policy_schema = PolicySpec.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(policy_schema.pop("$defs", {}))
    schemas["PolicySpec"] = policy_schema
    return doc


@router.get(
    "/explain",
    response_model=ExplainOut,
    response_model_exclude_unset=True,  # "override" only when one decides: otherwise the CLI's report exactly
    responses={400: {"model": ErrorBody, "description": "The proxy refuses this path with a 400; no policy is asked."}},
)
async def admin_explain(
    request: Request,
    ip: Annotated[str, Query(description="Client address as a header would carry it; any text is judged.")],
    path: Annotated[
        str,
        Query(
            description="Request path, judged in the proxy's canonical form; one the proxy refuses gets its 400.",
            pattern="^/[!-~]*$",
        ),
    ] = "/v1/chat/completions",
    model: Annotated[
        str | None, Query(description="The request body's model; left out, it is judged as unknown.", max_length=256)
    ] = None,
    max_tokens: Annotated[
        int | None,
        Query(description="The request's max_tokens: what it reserves under the rule's token limits.", ge=1, le=10**9),
    ] = None,
) -> Any:
    """What the running policy does with this address on this path, and why: every rule in order."""
    # On the proxy's loop: the geo lookup cache is shared with the proxy, and no other thread writes to it.
    from ..explain import explain
    from ..requestpath import BadPath

    runtime = _runtime(request)

    def report() -> ExplainOut:
        return explain(
            runtime.policy,
            runtime.geo,
            ip,
            path,
            with_trace=True,
            overrides=runtime.overrides.compiled,
            model=model,
            max_tokens=max_tokens,
        ).model

    try:
        return await _proxy(request).call(report)
    except BadPath as e:
        return JSONResponse({"detail": f"path: {e}; the proxy answers it with a 400, no policy is asked"}, 400)


_STORE_DOWN: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorBody, "description": "Redis is unavailable; overrides keep serving from the last copy."}
}


def _unavailable(e: RedisUnavailable) -> JSONResponse:
    return JSONResponse({"detail": f"the shared store is unavailable: {e}"}, status_code=503)


@router.post("/overrides", status_code=201, response_model=OverrideOut, responses=_STORE_DOWN)
async def add_override(request: Request, body: OverrideIn) -> Any:
    """Allow or deny a CIDR, API key, country or subdivision now, before the policy; on every replica with Redis."""
    store = _runtime(request).overrides
    kind = body.kind

    async def add() -> Override:  # on the proxy's loop, where the store and its Redis connection live
        key = await store.ensure_key() if kind == "api_key" else None
        o = new_override(
            body.action, kind, getattr(body, kind), body.reason, body.by, id=body.id, ttl=body.ttl, key=key
        )
        await store.add(o)
        return o

    try:
        return _override_out(await _proxy(request).run(add))
    except OverrideError as e:  # checked already but for the key: not known while Redis is unreachable
        return JSONResponse({"detail": str(e)}, status_code=503)
    except RedisUnavailable as e:
        return _unavailable(e)


@router.get("/overrides", response_model=OverrideList)
async def list_overrides(request: Request) -> OverrideList:
    """The overrides in force (expired ones are gone); with Redis down, this replica's last synced copy."""
    store = _runtime(request).overrides
    listed = await _proxy(request).run(store.list)
    return OverrideList(backend=store.backend, overrides=[_override_out(o) for o in listed])


@router.delete(
    "/overrides/{override_id}",
    response_model=OverrideRemoved,
    responses={404: {"model": ErrorBody, "description": "No override with this id."}, **_STORE_DOWN},
)
async def remove_override(request: Request, override_id: Annotated[str, Path(pattern="^[A-Za-z0-9_.-]{1,64}$")]) -> Any:
    """Lift an override now, on every replica with Redis."""
    store = _runtime(request).overrides
    try:
        found = await _proxy(request).run(lambda: store.remove(override_id))
    except RedisUnavailable as e:
        return _unavailable(e)
    if not found:
        return JSONResponse({"detail": f"no override {override_id}"}, status_code=404)
    return OverrideRemoved(removed=override_id)


_KEYS_DOWN: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorBody,
        "description": "Redis unavailable, or the keys file unreadable; the keys read before keep serving.",
    }
}


def _key_out(key: ClientKey) -> ClientKeyOut:
    return ClientKeyOut(**key.public(time.time()))


@router.post(
    "/keys",
    status_code=201,
    response_model=ClientKeyIssued,
    responses={
        400: {"model": ErrorBody, "description": "The key cannot be issued as given."},
        409: {
            "model": ErrorBody,
            "description": "A live key holds this name, the store is full, or there is no key store "
            "(neither --redis nor --keys-file).",
        },
        **_KEYS_DOWN,
    },
)
async def add_key(request: Request, body: ClientKeyIn) -> Any:
    """Issue a client key: its token is in this answer only (only its keyed hash is kept); on every replica."""
    store = _runtime(request).client_keys
    expires = time.time() + body.expires_in if body.expires_in is not None else None
    try:
        key, token = await _proxy(request).run(lambda: store.add(body.name, expires, body.meta))
    except KeyConflict as e:
        return JSONResponse({"detail": str(e)}, status_code=409)
    except ClientKeyError as e:  # checked by the model already
        return JSONResponse({"detail": str(e)}, status_code=400)
    except KeysUnavailable as e:
        return JSONResponse({"detail": str(e)}, status_code=503)
    return ClientKeyIssued(key=_key_out(key), token=token, warning=KEY_SHOWN_ONCE)


@router.get("/keys", response_model=ClientKeyList)
async def list_keys(request: Request) -> ClientKeyList:
    """Every client key, revoked and expired ones too (never a token or hash); with Redis down, the last copy."""
    store = _runtime(request).client_keys
    listed = await _proxy(request).run(store.list)
    return ClientKeyList(backend=store.backend, keys=[_key_out(k) for k in listed])


@router.delete(
    "/keys/{key_id}",
    response_model=ClientKeyRevoked,
    responses={404: {"model": ErrorBody, "description": "No key with this id, nor a live key with this name."},
               **_KEYS_DOWN},
)  # fmt: skip
async def revoke_key(
    request: Request,
    key_id: Annotated[
        str, Path(pattern="^[A-Za-z0-9._@-]{1,64}$", description="The key's id (ck_...), or its live key's name.")
    ],
) -> Any:
    """Revoke a client key now: every replica refuses it within a second."""
    store = _runtime(request).client_keys
    try:
        found = await _proxy(request).run(lambda: store.revoke(key_id))
    except KeysUnavailable as e:
        return JSONResponse({"detail": str(e)}, status_code=503)
    if found is None:
        return JSONResponse({"detail": f"no key {key_id}"}, status_code=404)
    return ClientKeyRevoked(revoked=_key_out(found))


@router.post(
    "/diff",
    response_model=DiffOut,
    responses={
        400: {"model": CandidateError, "description": "The candidate is not a valid policy here."},
        413: {"model": ErrorBody, "description": f"The candidate is larger than {MAX_CANDIDATE_BYTES} bytes."},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "The candidate policy, as YAML text (the policy file's own schema; "
            "ISO codes, CIDRs and rule reachability are checked beyond it, with 400 and file:line problems).",
            "content": {"application/yaml": {"schema": {"$ref": "#/components/schemas/PolicySpec"}}},
        }
    },
)
async def admin_diff(request: Request) -> Any:
    """Which callers the candidate policy in the body would treat differently from the running one."""
    from ..diff import diff
    from ..policy import parse_policy, run_tests
    from ..yamlfile import FileError

    runtime = _runtime(request)
    body = await request.body()  # read by the gate already, and bounded there
    if len(body) > MAX_CANDIDATE_BYTES:
        return JSONResponse({"detail": f"candidate larger than {MAX_CANDIDATE_BYTES} bytes"}, status_code=413)
    name = "candidate.yaml"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return JSONResponse(
            {"error": "candidate policy is invalid", "problems": [f"{name}: not UTF-8 text: {e.reason}"]},
            status_code=400,
        )
    # Parsing (a YAML bomb takes seconds) and diffing (a large probe space) in worker threads:
    # neither this loop nor the proxy's waits for them.
    try:
        candidate = await _heavy(request, parse_policy, text, name, runtime.geo.capabilities)
    except FileError as e:
        problems = e.render().splitlines()
        return JSONResponse({"error": "candidate policy is invalid", "problems": problems}, status_code=400)
    except Exception as e:  # MemoryError, RecursionError: the candidate is refused, nothing else changes
        problem = f"{name}: cannot load this candidate: {type(e).__name__}"
        return JSONResponse({"error": "candidate policy is invalid", "problems": [problem]}, status_code=400)
    running = runtime.policy
    report = (await _heavy(request, diff, running, candidate)).report()
    # The policy tests look addresses up in the geo cache the proxy shares: on its loop.
    results = await _proxy(request).call(lambda: run_tests(candidate, runtime.geo))
    tests = CandidateTests(
        passed=sum(r.passed for r in results),
        failed=[f"{name}:{r.line}: test {r.test.ip} {r.test.path}: {r.problem}" for r in results if not r.passed],
    )
    return report.model_copy(update={"candidate_tests": tests})


def _document(runtime: Runtime, role: str) -> PolicyDocument | None:
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


@router.get("/policy", response_model=ActivePolicies)
async def active_policy(request: Request) -> ActivePolicies:
    """The policy in force as it was read: text, hash, version, when loaded, from which file."""
    runtime = _runtime(request)
    current, shadow = await _proxy(request).call(lambda: (_document(runtime, "policy"), _document(runtime, "shadow")))
    assert current is not None
    return ActivePolicies(**current.model_dump(), shadow=shadow)


@router.get(
    "/policy/map.svg",
    response_class=Response,
    responses={200: {"content": {"image/svg+xml": {}}, "description": "A self-contained SVG (no script, no link)."}},
)
async def active_policy_map(request: Request) -> Response:
    """The world coloured by what the policy in force does to a caller from each country (as ``regiongate map``)."""
    from ..evidence.policymap import policy_map

    policy = _runtime(request).policy  # one reference read: a reload swaps it whole
    svg = await _heavy(request, lambda: policy_map(policy).svg())  # ~250 decide() calls and 140 kB: off the loop
    return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})


@router.post(
    "/reload",
    response_model=ReloadResponse,
    responses={
        422: {"model": ReloadResponse, "description": "a candidate was refused; the old one serves"},
        503: {"model": ErrorBody, "description": "this process cannot reload"},
    },
)
async def reload(request: Request) -> JSONResponse:
    """Re-read the policy (and shadow policy and GeoIP files) now, in every worker.

    This worker's result is returned; the others reload through the
    supervisor's SIGHUP. 422 when a candidate was refused.
    """
    live: Live | None = request.app.state.live
    if live is None:
        raise HTTPException(status_code=503, detail="reloading is not available in this process")
    results = {r.role: r.report() for r in await _proxy(request).run(live.admin_reload)}
    body = ReloadResponse(**dict(results["policy"]), pid=os.getpid(), shadow=results.get("shadow"))
    ok = body.ok and (body.shadow is None or body.shadow.ok)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 422)


def create_admin_app(
    runtime: Runtime,
    metrics: Metrics,
    live: Live | None = None,
    admin_token: str | None = None,
    proxy: ProxyLoop | None = None,
) -> FastAPI:
    app = FastAPI(title="Regiongate control plane", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime
    app.state.live = live
    app.state.admin_token = admin_token or None
    app.state.proxy = proxy = proxy or ProxyLoop()
    app.state.heavy = asyncio.Semaphore(HEAVY_AT_ONCE)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 without the submitted values: one of them may be an API key."""
        problems = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return JSONResponse({"detail": problems}, status_code=422)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Alive: the process answers and the proxy's event loop turns. Says nothing about policy or upstreams."""
        try:
            await asyncio.wait_for(proxy.call(lambda: None), LIVENESS_TIMEOUT)
        except TimeoutError:
            return JSONResponse({"status": f"the proxy's event loop did not turn in {LIVENESS_TIMEOUT:g} s"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Ready: policy and geo data are loaded and the proxy is accepting requests.

        A refused policy reload is a warning here, not unreadiness: the last
        good policy is still serving. Stale GeoIP data is a warning too,
        unless ``--stale-geoip-not-ready``.
        """
        detail = await proxy.call(runtime.describe)
        return JSONResponse(detail, status_code=200 if detail["ready"] else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.geoip_ages(runtime.geo.sources)
        with contextlib.suppress(TimeoutError):  # a stalled proxy loop: the counts folded before (gateway.metrics)
            await asyncio.wait_for(proxy.call(metrics.fold), FOLD_WAIT)
        body, content_type = exposition(metrics)
        return Response(body, media_type=content_type)

    app.include_router(router)
    return app
