"""The proxy port: one raw ASGI app, one straight line per request.

    address  ->  geo facts  ->  decision  ->  refuse or forward  ->  record

Everything that decides is a pure function in another module
(:func:`clientip.resolve`, :meth:`geo.Geo.lookup`, :func:`policy.decide`);
this file only moves bytes between the client and the upstream and keeps
the promises about failure: the gateway's own errors are OpenAI-shaped
JSON, an upstream that is down or slow gets a 502/504 rather than a hang, a
stream cut in the middle ends with an error event, and a client that hangs
up cancels its upstream request.

Raw ASGI rather than a framework: the hot path is small, and every layer a
framework adds is paid on every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp

from . import errors
from .clientip import MISSING, PUBLIC, ClientAddress, resolve
from .errors import GatewayError
from .geo import NO_FACTS, GeoFacts
from .live.active import Active
from .policy import DENY, Decision, decide
from .requestid import RequestIds
from .requestpath import BadPath, canonical
from .runtime import Runtime
from .shared.audit import entry as audit_entry
from .shared.overrides import judge as judge_override
from .shared.overrides import request_key_hash
from .shared.ratelimit import check as check_rate
from .throttledlog import ThrottledLog
from .upstream import BadHeader, BadTarget, Upstream, new_session, request_headers, response_headers

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("regiongate")

# A response up to this size with a known length is read whole and sent in
# one piece: one ASGI message instead of a loop. Larger or unknown-length
# bodies (and every event stream) are relayed chunk by chunk as they arrive.
_WHOLE_BODY_LIMIT = 256 * 1024
_NO_BODY_STATUS = frozenset({204, 304})
# A task that waits on receive() for the client's disconnect costs ~90 µs a
# request (measured: 2,670 -> 3,550 req/s without it), more than the decision
# itself. Most answers are back long before that matters, so the watcher
# starts only when a request has been in flight this long.
_WATCH_AFTER = 0.1


class _ClientGone(Exception):
    """The client hung up while its request body was being streamed upstream."""


class _Exchange:
    """Per-request state shared with the disconnect watcher."""

    __slots__ = (
        "active",
        "attempted",
        "client_gone",
        "done",
        "error",
        "response_started",
        "sent",
        "shadow",
        "status",
        "ttfb",
        "watcher",
    )

    def __init__(self, active: Active) -> None:
        self.active = active  # the policy (and its upstreams) judging this request, whatever reloads meanwhile
        self.shadow: Decision | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.attempted = False
        self.client_gone = False
        self.done = False
        self.status = 0
        self.sent = 0
        self.error: str | None = None
        self.ttfb: float | None = None
        self.response_started = False


class Gateway:
    def __init__(self, runtime: Runtime, metrics: Any) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self._ids = RequestIds()
        self._throttled = ThrottledLog(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        # websocket: returning without accepting makes the server answer 403

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        rt = self.runtime
        active = rt.active
        policy = active.policy
        request_id = next(self._ids)
        peer = scope["client"][0] if scope.get("client") else None

        # 0. What is asked, in the one form that is both judged and forwarded.
        path, bad = _request_target(scope, rt)
        # 1. Who is asking.
        client = resolve(peer, scope["headers"], rt.clientip)
        # 2. Where they are.
        facts = rt.geo.lookup(client.ip) if client.kind == PUBLIC else NO_FACTS  # type: ignore[arg-type]
        # 3. What an operator's runtime override says (gateway.shared), else what the policy says.
        ov = rt.overrides
        override = judge_override(ov.compiled, client, facts, request_key_hash(ov.compiled, ov.key, scope["headers"]))
        decision = REJECTED if path is None else override or decide(policy, client, facts, path)
        # 3b. The deciding rule's rate limit, if it has one (gateway.shared; Redis only when a limit applies).
        limited = None
        if decision.limit is not None and decision.verdict != DENY:
            limited = await check_rate(ov, decision.limit, client, facts, scope["headers"], policy.spec.redis.on_error)
        ex = _Exchange(active)
        if active.shadow is not None and path is not None:  # judged too, never enforced
            ex.shadow = decide(active.shadow, client, facts, path)
        # 4. Refuse or forward.
        try:
            if bad is not None:
                await self.fail(send, bad, request_id, ex)
            elif limited is not None:
                await self.fail(send, limited, request_id, ex)
            elif decision.verdict == DENY:
                await _send_error(
                    send, policy.spec.block.status, policy.block_body, request_id, retry=False, policy=active.header
                )
                ex.status, ex.sent = policy.spec.block.status, len(policy.block_body)
            else:
                await self.forward(scope, receive, send, path, decision, request_id, peer, client, ex)  # type: ignore[arg-type]
        except Exception:
            # A bug of ours must still give the client an OpenAI-shaped answer.
            log.exception("request %s failed", request_id)
            if not ex.response_started:
                await self.fail(send, errors.INTERNAL, request_id, ex)
            ex.error = ex.error or errors.INTERNAL.code
        # 5. Record.
        self.record(scope, path, request_id, client, facts, decision, ex, time.perf_counter() - started)

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: str,
        decision: Decision,
        request_id: str,
        peer: str | None,
        client: ClientAddress,
        ex: _Exchange,
    ) -> None:
        upstream = ex.active.upstreams.get(decision.upstream or "")
        if upstream is None or self.session is None:
            await self.fail(send, errors.NO_UPSTREAM, request_id, ex)
            return
        try:
            url = upstream.target(path, scope["query_string"])
            # A missing client's address is its proxy's: no client address to vouch for.
            decided = str(client.ip) if client.ip is not None and client.kind != MISSING else None
            headers = request_headers(scope["headers"], peer, decided, upstream)
        except BadTarget as e:
            await self.fail(send, errors.bad_request(str(e), "invalid_path"), request_id, ex)
            return
        except BadHeader as e:
            await self.fail(send, errors.bad_request(str(e), "invalid_header"), request_id, ex)
            return
        message = await receive()
        if message["type"] == "http.disconnect":
            ex.client_gone, ex.status, ex.error = True, 499, "client_disconnected"
            return
        first: bytes = message.get("body", b"")
        body: bytes | AsyncIterator[bytes] | None = first or None
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        watch_timer: asyncio.TimerHandle | None = None
        if message.get("more_body", False):
            body = self._stream_request(receive, first, ex, task)
        else:
            watch_timer = loop.call_later(_WATCH_AFTER, _start_watcher, receive, ex, task)
        timeouts = upstream.timeouts
        sent_at = loop.time()  # deadlines are on the loop's clock (whole ms under uvloop) ...
        clock = time.perf_counter()  # ... measurements on a fine one
        total_deadline = sent_at + timeouts.total
        response: aiohttp.ClientResponse | None = None
        ex.attempted = True
        try:
            async with asyncio.timeout_at(min(sent_at + timeouts.first_byte, total_deadline)) as deadline:
                response = await self.session.request(
                    scope["method"],
                    url,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=upstream.client_timeout,
                )
                ex.ttfb = time.perf_counter() - clock
                await self.relay(scope, send, response, upstream, request_id, ex, deadline, total_deadline)
        except asyncio.CancelledError:
            if not ex.client_gone:
                raise
            task.uncancel()
            ex.status, ex.error = 499, "client_disconnected"
        except TimeoutError as e:
            if isinstance(e, aiohttp.ConnectionTimeoutError):
                await self.fail(send, errors.UPSTREAM_CONNECT_TIMEOUT, request_id, ex)
            elif not ex.response_started:
                await self.fail(send, errors.UPSTREAM_TIMEOUT, request_id, ex)
            elif loop.time() >= total_deadline:
                await self.cut(send, response, errors.UPSTREAM_TOTAL_TIMEOUT, ex)
            else:
                await self.cut(send, response, errors.UPSTREAM_IDLE_TIMEOUT, ex)
        except aiohttp.ClientConnectorError:
            await self.fail(send, errors.UPSTREAM_UNREACHABLE, request_id, ex)
        except aiohttp.ClientError:
            if ex.response_started:
                await self.cut(send, response, errors.UPSTREAM_STREAM_CUT, ex)
            else:
                await self.fail(send, errors.UPSTREAM_BAD_RESPONSE, request_id, ex)
        finally:
            ex.done = True
            if watch_timer is not None:
                watch_timer.cancel()
            if ex.watcher is not None:
                ex.watcher.cancel()
            if response is not None:
                response.release()

    async def relay(
        self,
        scope: Scope,
        send: Send,
        response: aiohttp.ClientResponse,
        upstream: Upstream,
        request_id: str,
        ex: _Exchange,
        deadline: asyncio.Timeout,
        total_deadline: float,
    ) -> None:
        """Send the upstream's response on, keeping the stream a stream."""
        loop = asyncio.get_running_loop()
        idle = upstream.timeouts.idle
        headers = response_headers(response.raw_headers)
        headers.append((b"x-regiongate-request-id", request_id.encode()))
        headers.append(ex.active.header)
        ex.status = response.status
        length = response.content_length
        no_body = scope["method"] == "HEAD" or response.status in _NO_BODY_STATUS
        if not no_body and length is not None and length <= _WHOLE_BODY_LIMIT:
            # A small body follows its headers at once: it is read under the
            # first-byte deadline rather than paying for a reschedule.
            data = await response.read()
            ex.response_started = True
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            ex.done = True
            await send({"type": "http.response.body", "body": data})
            ex.sent = len(data)
            return
        ex.response_started = True
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        if not no_body:
            content = response.content
            while True:
                deadline.reschedule(min(loop.time() + idle, total_deadline))
                chunk = await content.readany()
                if not chunk:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                ex.sent += len(chunk)
        ex.done = True
        await send({"type": "http.response.body", "body": b""})

    async def fail(self, send: Send, error: GatewayError, request_id: str, ex: _Exchange) -> None:
        """Answer with the gateway's own error, before any upstream byte went out."""
        body = error.body()
        ex.status, ex.error, ex.sent = error.status, error.code, len(body)
        ex.done = True
        await _send_error(
            send, error.status, body, request_id, retry=error.retry, policy=ex.active.header, extra=error.headers
        )

    async def cut(
        self, send: Send, response: aiohttp.ClientResponse | None, error: GatewayError, ex: _Exchange
    ) -> None:
        """The response already started and the upstream failed.

        An event stream gets a final error event, which OpenAI's SDKs raise
        as an ``APIError``; any other body is left incomplete (the server
        closes the connection), so the client cannot take it for a whole one.
        """
        ex.error = error.code
        ex.done = True
        content_type = response.headers.get("content-type", "") if response is not None else ""
        if content_type.startswith("text/event-stream"):
            event = error.sse_event()
            await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            ex.sent += len(event)

    def _stream_request(
        self, receive: Receive, first: bytes, ex: _Exchange, task: asyncio.Task[Any]
    ) -> AsyncIterator[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            yield first
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    # Raise, not return: a generator that ends normally makes the
                    # client write the final chunk, and the upstream would take a
                    # truncated body for a whole one.
                    ex.client_gone = True
                    task.cancel()
                    raise _ClientGone
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    break
            # The body is read; from here on a receive() can only mean the client left.
            _start_watcher(receive, ex, task)

        return chunks()

    def record(
        self,
        scope: Scope,
        path: str | None,
        request_id: str,
        client: ClientAddress,
        facts: GeoFacts,
        decision: Decision,
        ex: _Exchange,
        seconds: float,
    ) -> None:
        country = facts.country or (client.kind if client.kind != PUBLIC else "unknown")
        m = self.metrics
        if ex.error is not None and ex.error in _BAD_REQUEST_CODES:
            m.bad_request(ex.error)
        if decision is not REJECTED:
            m.decision(decision.verdict, decision.rule, country)
        m.request(decision.verdict, seconds)
        for rule in decision.shadow:
            m.shadow_match(rule)
        shadow = ex.shadow
        if shadow is not None and shadow.verdict != decision.verdict:
            m.shadow_disagreement(decision.verdict, shadow.verdict, shadow.rule)
        if ex.attempted and not (ex.client_gone and ex.ttfb is None):
            # The upstream's own status if it answered, else 0 ("error": unreachable, timed out).
            m.upstream(decision.upstream or "", ex.status if ex.ttfb is not None else 0, ex.ttfb)
        log_ = self.runtime.access_log
        # The audit stream (gateway.shared): refusals, or every decision; queued, never waited for.
        audit = self.runtime.audit
        verdict = "rate_limited" if ex.error == "rate_limit_exceeded" else decision.verdict
        if audit.enabled and audit.wants(verdict):
            audit.put(
                audit_entry(
                    request_id, verdict, decision.rule,
                    facts.country, facts.subdivisions, facts.asn, path, ex.active.policy.sha256, log_.redact(client.ip),
                )
            )
        if not log_.enabled:
            return
        entry: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "method": scope["method"][:32],
            # The path as judged and forwarded; a refused one as the client sent it.
            "path": path if path is not None else _raw_path_text(scope),
            "client": log_.redact(client.ip),
            "client_via": client.via,
            "decision": decision.verdict,
            "action": decision.action,
            "rule": decision.rule,
            "country": facts.country,
            "upstream": decision.upstream if decision.verdict != DENY else None,
            "status": ex.status,
            "duration_ms": round(seconds * 1000, 3),
            "bytes": ex.sent,
            "policy": ex.active.tag,
        }
        if facts.subdivisions:
            entry["subdivisions"] = facts.subdivisions
        if facts.asn is not None:
            entry["asn"] = facts.asn
        if facts.anonymizer:
            entry["anonymizer"] = sorted(facts.anonymizer)
        if client.problem:
            entry["client_problem"] = log_.redact_text(client.problem)
        if decision.shadow:
            entry["shadow"] = decision.shadow
        if shadow is not None and shadow.verdict != decision.verdict:
            entry["shadow_decision"] = {"decision": shadow.verdict, "rule": shadow.rule, "policy": ex.active.shadow_tag}
        if ex.ttfb is not None:
            entry["ttfb_ms"] = round(ex.ttfb * 1000, 3)
        if ex.error:
            entry["error"] = ex.error
        log_.write(entry)

    def parser_error(self, reason: str, detail: str, *, count: bool) -> None:
        """Bytes the HTTP parser refused (called by :mod:`gateway.httpprotocol`)."""
        if count:
            self.metrics.bad_request(reason)
        self._throttled.warning(reason, "bad request on the proxy port (%s): %s", reason, detail)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = new_session()
                self.runtime.access_log.on_drop = self.metrics.access_log_dropped.inc
                self.runtime.ready = True
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.runtime.ready = False
                if self.session is not None:
                    await self.session.close()
                self.runtime.access_log.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _start_watcher(receive: Receive, ex: _Exchange, task: asyncio.Task[Any]) -> None:
    if not ex.done and ex.watcher is None:
        ex.watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, ex, task))


async def _watch_disconnect(receive: Receive, ex: _Exchange, task: asyncio.Task[Any]) -> None:
    """Cancel the request's task when its client hangs up, so the upstream request stops too."""
    while not ex.done:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not ex.done:
                ex.client_gone = True
                task.cancel()
            return


_JSON = (b"content-type", b"application/json")
_RETRY = {True: (b"x-should-retry", b"true"), False: (b"x-should-retry", b"false")}


async def _send_error(
    send: Send,
    status: int,
    body: bytes,
    request_id: str,
    *,
    retry: bool,
    policy: tuple[bytes, bytes],
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    rid = request_id.encode()
    headers = [
        _JSON,
        (b"content-length", b"%d" % len(body)),
        _RETRY[retry],
        (b"x-request-id", rid),
        (b"x-regiongate-request-id", rid),
        policy,
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_BAD_REQUEST_CODES = frozenset({"invalid_path", "invalid_header", "method_not_allowed"})
# The decision recorded for a request refused before the policy was asked
# (a method not allowed, a path that cannot be forwarded safely).
REJECTED = Decision("rejected", "rejected", "invalid_request", "refused before the policy: bad method or path", None)


def _raw_path_text(scope: Scope) -> str:
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    return raw[:2048].decode("latin-1")


def _request_target(scope: Scope, rt: Runtime) -> tuple[str | None, GatewayError | None]:
    """The canonical path, or the 400/405 that answers a request that has none."""
    method = scope["method"]
    if method not in rt.allow_methods:
        return None, errors.method_not_allowed(method, rt.allow_methods)
    try:
        return canonical(scope.get("raw_path") or scope["path"].encode()), None
    except BadPath as e:
        return None, errors.bad_request(str(e), "invalid_path")
