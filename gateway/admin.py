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
``POST /admin/reload`` and ``GET /admin/policy`` belong to the live policy
(:mod:`gateway.live`); the other routes only read.

This app runs on the control plane's own thread and event loop
(:mod:`gateway.controlplane`, whose gate checks the token before any body is
read). What it reads or changes on the proxy's side (the override store, the
live reloader, the geo lookup cache, the state ``/readyz`` describes) it
reaches through ``app.state.proxy``, a :class:`~gateway.controlplane.ProxyLoop`;
parsing and diffing a candidate run in worker threads, at most
:data:`HEAVY_AT_ONCE` at a time.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import __version__
from .controlplane import MAX_BODY, ProxyLoop
from .metrics import Metrics, exposition
from .policy import PolicySpec
from .policy.overrides import KINDS, MAX_TEXT, Override, OverrideError, check_text, new_override
from .runtime import Runtime
from .shared.redisconn import RedisUnavailable

if TYPE_CHECKING:
    from .live.reload import Live

ADMIN_TOKEN_ENV = "REGIONGATE_ADMIN_TOKEN"
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


class ErrorBody(BaseModel):
    detail: str


class CandidateError(BaseModel):
    error: str
    problems: list[str] = Field(description="One 'file:line: problem' per problem.")


class Verdict(BaseModel):
    decision: str
    rule: str


class ChangeOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    kind: str = Field(description="country, subdivision, client, asn, anonymizer or cidr")
    subject: str
    from_: Verdict = Field(alias="from")
    to: Verdict
    countries: list[str] | None = Field(description="Countries it happens with; null: every one probed.")
    addresses: list[str] | None = Field(description="CIDR addresses it happens at; null: every one probed.")
    paths: list[str] | None = Field(description="Paths it happens on; null: every one probed.")


class SettingOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    key: str
    from_: Any = Field(alias="from")
    to: Any


class PolicyRef(BaseModel):
    path: str
    sha256: str


class Summary(BaseModel):
    changes: int
    transitions: dict[str, int]


class CandidateTests(BaseModel):
    passed: int
    failed: list[str]


class DiffOut(BaseModel):
    old: PolicyRef
    new: PolicyRef
    changed: bool
    probes: int
    changes: list[ChangeOut]
    rule_changes: list[ChangeOut]
    settings: list[SettingOut]
    summary: Summary
    candidate_tests: CandidateTests


class KeyCheckOut(BaseModel):
    key: str
    matched: bool
    detail: str


class RuleStepOut(BaseModel):
    index: int
    name: str
    line: int | None
    action: str
    mode: str
    matched: bool
    reached: bool
    checks: list[KeyCheckOut]


class DecisionOut(BaseModel):
    verdict: str
    action: str
    rule: str
    reason: str
    shadow: list[str]


class TraceOut(BaseModel):
    client_kind: str
    address: str | None
    path: str
    geo_field: str
    country: str | None
    rules_consulted: bool
    rules: list[RuleStepOut]
    default: str | None
    decision: DecisionOut


class RecordOut(BaseModel):
    database_type: str
    path: str
    found: bool
    network: str | None
    fields: dict[str, Any]
    error: str | None


class ExplainOut(BaseModel):
    """The same report as ``regiongate explain --trace --json``."""

    ip: str
    normalized: str | None
    kind: str
    problem: str | None
    path: str
    model: str | None = Field(None, description="The model judged (query 'model'); null: judged as unknown.")
    decision: str
    action: str
    rule: str
    rule_line: int | None
    rule_conditions: dict[str, Any] | None
    reason: str
    why: list[str]
    shadow: list[str]
    upstream: str | None = Field(None, description="Where the request would go (null when refused).")
    allow_models: list[str] | None = Field(None, description="The deciding rule's allow_models.")
    status: int | None
    facts: dict[str, Any]
    records: list[RecordOut]
    policy: dict[str, Any]
    geo: list[dict[str, Any]]
    trace: TraceOut
    override: OverrideOut | None = Field(None, description="The runtime override that decides, before any rule.")
    rate_limit: dict[str, Any] | None = Field(
        None, description="The deciding rule's rate_limit (per: seconds); a request within it goes on."
    )


class OverrideIn(BaseModel):
    """Exactly one of cidr, api_key, country, subdivision."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["allow", "deny"]
    cidr: str | None = Field(None, max_length=64, description="An IPv4 or IPv6 block, e.g. 203.0.113.0/24.")
    api_key: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="A caller's bearer token; only its keyed hash (HMAC-SHA256) is kept, never the token.",
    )
    country: str | None = Field(None, pattern="^[A-Za-z]{2}$", description="ISO 3166-1 alpha-2, e.g. CN.")
    subdivision: str | None = Field(
        None, pattern="^[A-Za-z]{2}-[A-Za-z0-9]{1,3}$", description="ISO 3166-2, e.g. GB-ENG."
    )
    reason: str = Field(..., max_length=MAX_TEXT)
    by: str = Field("", max_length=MAX_TEXT, description="Who set it.")
    ttl: float | None = Field(None, gt=0, le=10 * 365 * 86400, description="Seconds until it expires; none: never.")
    id: str | None = Field(None, pattern="^[A-Za-z0-9_.-]{1,64}$", description="Chosen id; none: a random one.")

    @model_validator(mode="after")
    def _one_subject(self) -> OverrideIn:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of cidr, api_key, country, subdivision")
        kind = given[0]
        try:
            check_text(self.reason, self.by)
            if kind != "api_key":  # the key is hashed with the store's key, which only the store knows
                new_override(self.action, kind, getattr(self, kind), self.reason, self.by)
        except OverrideError as e:
            raise ValueError(str(e)) from None
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)


class OverrideOut(BaseModel):
    id: str
    action: str
    kind: str = Field(description="api_key, cidr, subdivision or country")
    value: str = Field(description="The block or code; for api_key 'hmac-sha256:' and the hash's first 16 hex digits.")
    reason: str
    by: str
    created_at: float
    expires_at: float | None
    rule: str = Field(description="The rule name its decisions carry: override:<id>.")


class OverrideList(BaseModel):
    backend: str = Field(description="memory (this process) or redis (every replica)")
    overrides: list[OverrideOut]


class OverrideRemoved(BaseModel):
    removed: str


def _override_out(o: Override) -> OverrideOut:
    return OverrideOut(**o.public())


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


_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong bearer token."},
    404: {"model": ErrorBody, "description": f"The admin API is disabled: {ADMIN_TOKEN_ENV} is not set."},
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
) -> Any:
    """What the running policy does with this address on this path, and why: every rule in order."""
    # On the proxy's loop: the geo lookup cache is shared with the proxy, and no other thread writes to it.
    from .explain import explain
    from .requestpath import BadPath

    runtime = _runtime(request)

    def report() -> dict[str, Any]:
        return explain(
            runtime.policy, runtime.geo, ip, path, with_trace=True, overrides=runtime.overrides.compiled, model=model
        ).report

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
    from .diff import diff
    from .policy import parse_policy, run_tests
    from .yamlfile import FileError

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
    out = (await _heavy(request, diff, running, candidate)).as_dict()
    # The policy tests look addresses up in the geo cache the proxy shares: on its loop.
    results = await _proxy(request).call(lambda: run_tests(candidate, runtime.geo))
    out["candidate_tests"] = {
        "passed": sum(r.passed for r in results),
        "failed": [f"{name}:{r.line}: test {r.test.ip} {r.test.path}: {r.problem}" for r in results if not r.passed],
    }
    return out


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
    results = {r.role: r.as_dict() for r in await _proxy(request).run(live.admin_reload)}
    body = ReloadResponse(**results["policy"], pid=os.getpid(), shadow=results.get("shadow"))
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
        body, content_type = exposition(metrics)
        return Response(body, media_type=content_type)

    app.include_router(router)
    return app
