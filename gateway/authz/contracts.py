"""The decision service's HTTP contracts: each proxy's auth request in, that proxy's answer out.

One handler serves the ``--authz-port`` listener (the proxy port's own
:class:`gateway.dataplane.server.Listener`, so parsing, limits, slow peers
and draining are the proxy port's), one path per contract:

* ``/authz/forward[/...]``, Traefik ``forwardAuth`` and Caddy ``forward_auth``: the
  original method and target in ``X-Forwarded-Method`` and ``X-Forwarded-Uri``;
  a body (Traefik ``forwardBody``) is read for the model. An allow is a 200 with
  the facts; a refusal is exactly the proxy port's answer, which both proxies
  pass on to the client.
* ``/authz/nginx``, nginx ``auth_request``: the original target in
  ``X-Original-URI`` and method in ``X-Original-Method``. nginx only understands
  2xx, 401 and 403, so a refusal is a 403 whose ``x-regiongate-status`` and
  ``x-regiongate-body`` (plus ``retry-after``, ``x-request-id``) an
  ``error_page 403 = @regiongate`` location turns back into the exact answer
  (``deploy/edges/nginx``).
* ``/authz/envoy/<original path>``, Envoy ``ext_authz`` in HTTP mode with
  ``path_prefix: /authz/envoy``: the method is the request's own, the target
  follows the prefix, the body is there with ``with_request_body``. A refusal's
  status, headers and body go to the client as they are.
* ``/authz/haproxy[/...]``, HAProxy's Lua action (``deploy/edges/haproxy/regiongate.lua``): the
  forward contract, counted as ``via="haproxy"``.

A request that fits no contract (another path, a missing header) is answered
with an OpenAI-shaped 400 or 404 that names what was expected: the calling
proxy then fails closed, and its operator reads why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..dataplane.bodyhold import hold
from ..dataplane.limits import Limits
from ..dataplane.relay import send_error
from ..dataplane.server import Header, Request, header
from ..errors import ErrorReply, bad_request
from ..proxy.record import Metrics
from ..proxy.replies import INTERNAL
from ..requestid import RequestIds
from .config import AuthzConfig
from .judge import Judge
from .query import FACT_HEADERS, Answer, Contract, Query

if TYPE_CHECKING:  # runtime imports proxy.upstreams, which runs the proxy package's __init__
    from ..runtime import Runtime

log = logging.getLogger("regiongate")

# How one contract writes an answer to the calling proxy.
Writer = Callable[[Request, Answer], None]

FORWARD = b"/authz/forward"
HAPROXY = b"/authz/haproxy"
NGINX = b"/authz/nginx"
ENVOY = b"/authz/envoy"
# What an nginx refusal carries for the error_page location to rebuild the client's answer.
STATUS = b"x-regiongate-status"
BODY = b"x-regiongate-body"
# The proxy port's refusal headers that nginx's error_page location sets again for the client.
_NGINX_KEPT = (
    b"retry-after", b"allow", b"x-should-retry", b"x-request-id", b"x-regiongate-request-id", b"x-regiongate-policy"
)  # fmt: skip

NOT_FOUND = ErrorReply(
    404,
    "invalid_request_error",
    "authz_not_found",
    "This is Regiongate's decision service: ask /authz/forward (Traefik forwardAuth, Caddy forward_auth), "
    "/authz/nginx (nginx auth_request), /authz/envoy/... (Envoy ext_authz HTTP, path_prefix /authz/envoy) or "
    "/authz/haproxy (HAProxy's Lua action).",
)


def _missing(contract: str, names: str) -> ErrorReply:
    return bad_request(f"The {contract} contract needs {names} (see docs/edges).", "authz_bad_request")


class Contracts:
    """The ``--authz-port`` handler: one :class:`.judge.Judge` per contract, sharing the worker's recorder."""

    def __init__(self, runtime: Runtime, metrics: Metrics, limits: Limits, config: AuthzConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.forward = Judge(runtime, metrics, limits, "forward")
        self.nginx = Judge(runtime, metrics, limits, "nginx")
        self.envoy = Judge(runtime, metrics, limits, "envoy_http")
        self.haproxy = Judge(runtime, metrics, limits, "haproxy")
        self.metrics = metrics
        self._ids = RequestIds()

    def handle(self, request: Request) -> None:
        try:
            self._route(request)
        except Exception:
            log.exception("the decision service failed on a request")
            if not request.started:
                send_error(request, INTERNAL, next(self._ids).encode(), self.runtime.active.header)

    def _route(self, request: Request) -> None:
        path = request.raw_path
        if path == NGINX:
            self._nginx(request)
        elif path == FORWARD or path.startswith(FORWARD + b"/"):
            self._forward(request)
        elif path.startswith(ENVOY + b"/"):
            self._envoy(request)
        elif path == HAPROXY or path.startswith(HAPROXY + b"/"):
            self._forward(request, self.haproxy, "haproxy")
        else:
            self._refuse(request, NOT_FOUND)

    def _refuse(self, request: Request, reply: ErrorReply) -> None:
        self.metrics.bad_request(reply.code)
        send_error(request, reply, next(self._ids).encode(), self.runtime.active.header)

    # --- the contracts -----------------------------------------------------------------

    def _forward(self, request: Request, judge: Judge | None = None, via: Contract = "forward") -> None:
        """Forward auth; HAProxy's Lua action (deploy/edges/haproxy) asks the same way, counted as ``haproxy``."""
        headers = request.headers
        method, uri = header(headers, b"x-forwarded-method"), header(headers, b"x-forwarded-uri")
        if not method or not uri:
            self._refuse(request, _missing(via, "X-Forwarded-Method and X-Forwarded-Uri"))
            return
        self._ask(request, judge or self.forward, via, method.decode("latin-1"), uri, _plain)

    def _nginx(self, request: Request) -> None:
        headers = request.headers
        uri = header(headers, b"x-original-uri")
        method = header(headers, b"x-original-method")
        if not uri or not method:
            self._refuse(request, _missing("nginx", "X-Original-URI and X-Original-Method"))
            return
        self._ask(request, self.nginx, "nginx", method.decode("latin-1"), uri, _for_nginx)

    def _envoy(self, request: Request) -> None:
        target = request.raw_path[len(ENVOY) :] + (b"?" + request.query if request.query else b"")
        self._ask(request, self.envoy, "envoy_http", request.method, target, _plain)

    def _ask(self, request: Request, judge: Judge, via: Contract, method: str, target: bytes, write: Writer) -> None:
        client_header = self.config.client_headers[via]
        headers = tuple(request.headers)
        peer = request.peer

        def answered(answer: Answer) -> None:
            if not request.finished:
                write(request, answer)

        def asked(body: bytes | None) -> None:
            request.on_gone = None
            judge.ask(Query(via, method, target, headers, peer, client_header, body), answered)

        if not request.has_body or via == "nginx":
            asked(None)
            return
        request.on_gone = _nothing  # the proxy went away before its body was whole: nothing was decided
        hold(request, self.runtime.active.policy.spec.body.max_bytes, asked)


def _nothing() -> None:
    return None


def _plain(request: Request, answer: Answer) -> None:
    """Forward auth and Envoy: a refusal exactly as the proxy port sends it (the proxy passes it to the
    client); an allow with the facts, for the proxy to copy to the upstream request."""
    if answer.allowed:
        request.respond(200, [*answer.headers, *_every_fact(answer.facts)], b"")
    else:
        request.respond(answer.status, list(answer.headers), answer.body)


def _every_fact(facts: tuple[Header, ...]) -> list[Header]:
    """Each fact header, empty when unknown: a proxy that copies a header the answer lacks may send the
    client's own on (or, Caddy 2.6, its placeholder's name), where an empty one replaces it."""
    known = {n for n, _ in facts}
    return [*facts, *((n, b"") for n in FACT_HEADERS if n not in known)]


def _for_nginx(request: Request, answer: Answer) -> None:
    """nginx: a refusal is a 403 carrying the real status and body, for ``error_page`` to rebuild."""
    if answer.allowed:
        request.respond(200, [*answer.headers, *answer.facts], b"")
        return
    kept: list[Header] = [(n, v) for n, v in answer.headers if n in _NGINX_KEPT]
    status = b"%d" % answer.status
    request.respond(403, [(STATUS, status), (BODY, answer.body), *kept, *answer.facts], b"")
