"""The proxy port's request path, one straight line per request:

    address  ->  geo facts  ->  decision  ->  refuse or forward  ->  record

Everything that decides is a pure function in another module
(:func:`clientip.resolve`, :meth:`geo.Geo.lookup`, :func:`policy.decide`);
how bytes move is :mod:`gateway.dataplane`'s. This file joins them and
keeps the promises about the gateway's own answers: they are OpenAI-shaped
JSON (:mod:`.replies`), a method outside ``--allow-method`` gets a 405, the
path is judged, forwarded and logged in one canonical form
(:mod:`gateway.requestpath`) and one that has none gets a 400, every answer
names the policy that judged it, and every request is recorded once, when its
answer is over (:mod:`.record`).

``handle`` is called by the server for each request, in the loop turn that
read its head: no task per request. It makes the request's one
:class:`.exchange.Exchange`, and each step below takes it, reading top to
bottom: ``handle -> (identified ->) (read_model -> with_model ->) proceed ->
(limited -> checked ->) (budgeted -> admitted ->) forward``, with ``fail``
and ``crashed`` as the two ways out. A forwarded request's record is written
by the relay's completion callback. Three steps may wait, and only requests
that need them pay for them: reading a JSON body (a rule that looks at the
model, ``allow_models``, an upstream that renames models, a token budget;
callbacks, :mod:`gateway.dataplane.bodyhold`), asking the rate limiter and
reserving a token budget (answered when Redis's batch is).

Client keys (``client_keys: required`` on the rule or its upstream) are
checked before any body is read, and the key's name is the caller from then
on (:meth:`Gateway.identified`). A token budget's request is settled, refunded
and released exactly once, whichever way it ends, by :mod:`.tokens` when the
exchange is recorded. A request no budget limits, on a path whose usage shape
is known, passes an observing tap (``--record-usage all``, the default): it
never changes a byte, so the relay keeps the upstream's framing and stays
zero-copy (the measurement is in :mod:`.tokens`); its usage, when the provider
reports one, is recorded like a budgeted request's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING

from ..clientip import MISSING, PUBLIC, ClientAddress, resolve
from ..dataplane.bodyhold import hold
from ..dataplane.failover import Route, prepare
from ..dataplane.limits import Limits
from ..dataplane.pool import Pools
from ..dataplane.relay import Relay, error_headers, send_error
from ..dataplane.server import Request, header
from ..dataplane.upstream import BadTarget, BodyFor, UpstreamGroup
from ..errors import ErrorReply, bad_request
from ..geo import NO_FACTS
from ..modelfield import BadBody, ModelField, is_json, read_model, rename
from ..policy import DENY, NEEDS_MODEL, decide, decide_model, model_refusal
from ..policy.callerkey import bearer_token, hash_key
from ..policy.overrides import judge as judge_override
from ..policy.overrides import request_key_hash
from ..requestid import RequestIds
from ..shared.budgets import Held, admit, unavailable
from ..shared.clientkeys import authenticate
from ..shared.ratelimit import check as check_rate
from ..usage.estimate import input_tokens
from ..usage.request import UNREADABLE, BadTokens, read_request, with_usage
from ..usage.shapes import INCLUDE_USAGE, shape_of
from ..usage.tap import UsageTap
from .exchange import Asked, Exchange, Via
from .record import REJECTED, Metrics, Record
from .replies import INTERNAL, NO_UPSTREAM, model_not_allowed, request_target
from .tokens import Metered, address_of, caller_of, costs, key_unknown, lease, slot_of, subjects

if TYPE_CHECKING:  # runtime imports proxy.upstreams, which runs this package's __init__
    from ..runtime import Runtime

log = logging.getLogger("regiongate")


class Gateway:
    def __init__(self, runtime: Runtime, metrics: Metrics, limits: Limits) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.limits = limits
        self.pools = Pools(limits)
        self.recorder = Record(runtime, metrics)
        # --record-usage all: every forwarded request on a usage path is observed for the tokens metric.
        self.observe = runtime.settings.record_usage == "all"
        self._ids = RequestIds()

    def open(self, bound: int) -> None:
        """Keep-alive pools are made per upstream as requests need them (inside the running loop)."""
        self.pools.bound = bound

    def close(self) -> None:
        self.pools.close()

    def retire_upstreams(self, old: Mapping[str, UpstreamGroup], new: Mapping[str, UpstreamGroup]) -> None:
        """After a reload: pools (and passive health) of URLs no longer configured close as their requests end.

        A URL configured exactly as before keeps its pool and what its health learnt. Any other pool
        goes, including one a request that started before the last reload made when it failed over.
        """
        self.pools.retire({m for g in new.values() for m in g.members})

    # Who asks: the proxy port; a decision service's contract names itself (gateway.authz).
    via: Via = "proxy"

    def handle(self, request: Request) -> None:
        started = time.perf_counter()
        # 1. Who is asking (first, since a decision service finds its client by its own contract's header).
        self.judge(request, resolve(request.peer, request.headers, self.runtime.clientip), started)

    def judge(self, request: Asked, client: ClientAddress, started: float) -> None:
        """The judging steps every way in shares (the proxy port, :mod:`gateway.authz`): what is asked,
        where the client is, what is decided; then refuse (``fail``, ``block``) or ``forward``, which a
        decision service overrides to answer instead of sending bytes on."""
        rt = self.runtime
        active = rt.active
        policy = active.policy

        # 0. What is asked, in the one form that is both judged and forwarded.
        path = request_target(request.method, request.raw_path, rt.allow_methods)
        # 2. Where they are.
        facts = rt.geo.lookup(client.ip) if client.kind == PUBLIC and client.ip is not None else NO_FACTS
        # 3. What an operator's runtime override says (gateway.shared), else what the policy says
        #    (and a shadow policy, judged too, never enforced).
        ov = rt.overrides
        override = judge_override(ov.compiled, client, facts, request_key_hash(ov.compiled, ov.key, request.headers))
        via = self.via
        if isinstance(path, ErrorReply):
            ex = Exchange(self.recorder, request, next(self._ids), started, active, "", client, facts, REJECTED, via)
            try:
                self.fail(ex, path)
            except Exception:
                self.crashed(ex)
            return
        decision = override or decide(policy, client, facts, path)
        ex = Exchange(self.recorder, request, next(self._ids), started, active, path, client, facts, decision, via)
        if active.shadow is not None:
            ex.shadow = decide(active.shadow, client, facts, path)
        # 4. Refuse or forward; 5. record, now or when the answer is over.
        try:
            if decision is not NEEDS_MODEL and (
                decision.client_keys or decision.upstream in policy.client_keys_required
            ):
                # 3a. Client keys in force (an override's decision names the upstream only): the key is
                #     checked before any body is read.
                if decision.verdict != DENY and not self.identified(ex):
                    return
                decision = ex.decision  # an override on the key's name may have taken over
            if (
                decision is NEEDS_MODEL
                or decision.allow_models is not None  # needs_body's first half, without a call on the plain path
                or (decision.budget is not None and decision.needs_body)
                or decision.upstream in active.renaming
            ):
                # 3b. The decision needs the request's model, or a token budget its body: read the body
                #     (JSON only, bounded), then go on.
                self.read_model(ex)
            else:
                self.proceed(ex)
        except Exception:
            self.crashed(ex)

    def proceed(self, ex: Exchange) -> None:
        """Refuse, or forward (after the client key, the rate limit and the token budget, where the
        deciding rule has them)."""
        decision = ex.decision
        if decision.verdict == DENY:
            if decision.model_refused:
                self.metrics.model_refused(decision.rule)
                self.fail(ex, model_not_allowed(ex.model))
                return
            self.block(ex)
        elif (
            ex.caller is None
            and (decision.client_keys or decision.upstream in ex.active.policy.client_keys_required)
            and not self.identified(ex)
        ):
            return  # the 401 (a decision that needed the model is final only now)
        elif decision.limit is not None:
            # 3c. The deciding rule's rate limit: a step that may wait (on Redis), with a
            # callback like every other step (answered when the batch of checks is).
            self.limited(ex)
        elif decision.budget is not None:
            self.budgeted(ex)  # 3d. The deciding rule's token budget: reserved before anything goes up.
        else:
            self.forward(ex)

    def identified(self, ex: Exchange) -> bool:
        """Client keys are in force (the rule's ``client_keys: required``, or its upstream's): the bearer
        token must be a valid key of ours, whose name is then the caller; else OpenAI's 401 and False."""
        found = authenticate(ex.request.headers, self.runtime.client_keys)
        if isinstance(found, ErrorReply):
            self.fail(ex, found)
            return False
        ex.caller = found.name
        # An API-key override names a caller by the keyed hash of what identifies it: with client keys
        # in force that is the key's name (`override add --api-key team-a`), so it holds for every
        # token the name is issued. It beats the policy as every override does.
        ov = self.runtime.overrides
        if ov.compiled.by_key and ov.key is not None:
            named = judge_override(ov.compiled, ex.client, ex.facts, hash_key(ov.key, found.name))
            if named is not None:
                ex.decision = named
                if named.verdict == DENY:
                    self.block(ex)
                    return False
        return True

    def block(self, ex: Exchange) -> None:
        """The policy's refusal (``block``: status and body), then the record."""
        policy = ex.active.policy
        block = policy.spec.block
        request: Request = ex.request  # type: ignore[assignment]  # the proxy port's exchanges hold its Request
        request.respond(block.status, error_headers(ex.rid, False, ex.active.header), policy.block_body)
        ex.status, ex.sent = block.status, len(policy.block_body)
        ex.record()

    def read_model(self, ex: Exchange) -> None:
        """Learn the model from a JSON body of at most ``body.max_bytes``, then decide with it.

        Any other body (not JSON, too large, none) is streamed untouched and its model
        is unknown (``body.unknown_model``). A held body goes up as bytes, renamed for
        the upstream that gets it; it can then be sent again on failover.
        """
        request: Request = ex.request  # type: ignore[assignment]  # the proxy port's exchanges hold its Request
        spec = ex.active.policy.spec.body
        if not request.has_body or not is_json(header(request.headers, b"content-type")):
            self.with_model(ex, None)
            return

        def held(body: bytes | None) -> None:
            request.on_gone = None
            try:
                self.with_model(ex, body)
            except Exception:
                self.crashed(ex)

        def gone() -> None:  # left before the body was whole: nothing was sent anywhere
            ex.client_gone, ex.status, ex.error = True, 499, "client_disconnected"
            if ex.decision is NEEDS_MODEL:  # recorded as for a request whose model is unknown
                ex.decision = decide_model(ex.active.policy, ex.client, ex.facts, ex.path, None)
            ex.record()

        request.on_gone = gone
        hold(request, spec.max_bytes, held)

    def with_model(self, ex: Exchange, body: bytes | None) -> None:
        """Decide with the model the held body names (``None``: too large, too slow, or not read)."""
        field: ModelField | None = None
        if body:  # an empty body has no model; a body too large or too slow was given back (None)
            try:
                field = read_model(body)
            except BadBody as e:
                self.fail(ex, bad_request(e.message, "invalid_body"))
                return
        model = field.model if field is not None else None
        active = ex.active
        decision = ex.decision
        if decision is NEEDS_MODEL:
            decision = decide(active.policy, ex.client, ex.facts, ex.path, model)
        ex.decision = model_refusal(active.policy, decision, model) or decision
        ex.model = model
        if active.shadow is not None:
            ex.shadow = decide_model(active.shadow, ex.client, ex.facts, ex.path, model)
        if body is not None:
            ex.body_for = _renamer(body, field)
            ex.body = body
        self.proceed(ex)

    def limited(self, ex: Exchange) -> None:
        """Forward unless the deciding rule's rate limit says no (a 429; Redis trouble follows ``on_error``)."""
        limit = ex.decision.limit
        assert limit is not None
        on_error = ex.active.policy.spec.redis.on_error
        # A partial, not a closure: fewer objects per waiting request for the garbage collector to count.
        then = partial(self.checked, ex)
        check_rate(self.runtime.overrides, limit, ex.client, ex.facts, ex.request.headers, on_error, then, ex.caller)

    def checked(self, ex: Exchange, refused: ErrorReply | None) -> None:
        """The rate limit's answer: on to the token budget and forward, or the 429 (or 503)."""
        try:
            if refused is not None:
                self.fail(ex, refused)
            elif ex.decision.budget is not None:
                self.budgeted(ex)
            else:
                self.forward(ex)
        except Exception:
            self.crashed(ex)

    def budgeted(self, ex: Exchange) -> None:
        """Reserve the request's estimate under each of the rule's token limits (and its concurrency slot),
        all or none, then forward with a usage tap; a refusal is its 429 (Redis trouble: ``on_error``).

        The estimate is the held body's input (:func:`gateway.usage.estimate.input_tokens`) plus its
        output cap (``max_tokens`` and kin, else the rule's ``token_reserve.output``); a body that could
        not be held or is not JSON reserves ``token_reserve.unreadable``. A stream on a path that knows
        ``stream_options`` goes up asking for usage, and the tap strips it again for a client that did
        not ask for it.
        """
        budget = ex.decision.budget
        assert budget is not None
        store = self.runtime.overrides
        body, path, model = ex.body, ex.path, ex.model
        shape = shape_of(path)
        sse_strip = False
        input: int | None = None
        try:
            asked = read_request(body, path) if body else UNREADABLE
            if asked.readable and asked.stream and shape in INCLUDE_USAGE and ex.body_for is not None and body:
                injected = with_usage(body)  # refused here (a 400), not once per upstream
                sse_strip = not asked.wants_usage
                ex.body_for = _with_usage(ex.body_for, body, injected)
        except BadTokens as e:
            self.fail(ex, ErrorReply(400, "invalid_request_error", e.code, e.message, param=e.param))
            return
        if asked.readable:
            input = input_tokens(body or b"", model)
            output = asked.output_cap if asked.output_cap is not None else budget.output_default
            reserved = costs(budget, input, output)
        else:  # not JSON, too large to hold, or no body: the rule's charge for what cannot be read
            reserved = [budget.unreadable] * len(budget.tokens)
        ex.meter = Metered(store, UsageTap(shape, sse_strip, model), budget, input, reserved)
        group = ex.active.upstreams.get(ex.decision.upstream or "")
        if group is None:
            self.fail(ex, NO_UPSTREAM)
            return
        caller = caller_of(ex, store)
        on_error = ex.active.policy.spec.redis.on_error
        if key_unknown(budget, store, caller, bearer_token(ex.request.headers) is not None):
            self.admitted(ex, unavailable(store, budget, on_error))
            return
        address = address_of(budget, ex.client, store)
        who = subjects(budget, ex.client, ex.facts, caller, model, address)
        slot = slot_of(budget, ex.client, ex.facts, caller, model, ex.request_id, address)
        admit(store, budget, who, reserved, slot, lease(group), on_error, partial(self.admitted, ex))

    def admitted(self, ex: Exchange, held: Held | ErrorReply) -> None:
        """The budget's answer: forward with what was reserved, or its 429 (or 503)."""
        try:
            if isinstance(held, ErrorReply):
                ex.meter = None  # nothing reserved, nothing forwarded: nothing to settle
                self.fail(ex, held)
            else:
                ex.held = held
                self.forward(ex)
        except Exception:
            self.crashed(ex)

    def forward(self, ex: Exchange) -> None:
        """Send the request to ``decision.upstream``'s first URL that is not ejected (see :mod:`.dataplane.failover`).

        ``ex.body_for``: the whole body was read already; it gives the bytes to send to each upstream.
        """
        request: Request = ex.request  # type: ignore[assignment]  # the proxy port's exchanges hold its Request
        client, path, body_for = ex.client, ex.path, ex.body_for
        meter = ex.meter
        if meter is None and self.observe:
            shape = shape_of(path)
            if shape is not None:  # not budgeted: read for the metrics alone, never changing a byte
                ex.meter = meter = Metered(self.runtime.overrides, UsageTap.observing(shape), None, None, ())
        headers = request.headers
        if meter is not None and meter.tap.strips:
            # The tap strips the usage chunk the gateway asked for, but never from a compressed body: the
            # upstream must send this one plain, or the client would see a chunk it did not ask for.
            headers = [h for h in headers if h[0].lower() != b"accept-encoding"]
            headers.append((b"accept-encoding", b"identity"))
        groups = ex.active.upstreams
        group = groups.get(ex.decision.upstream or "")
        if group is None:
            self.fail(ex, NO_UPSTREAM)
            return
        # A missing client's address is its proxy's: no client address to vouch for.
        decided = str(client.ip) if client.ip is not None and client.kind != MISSING else None
        chain = group.chain
        route = None
        if len(chain) == 1:
            upstream = chain[0]
        else:
            route = Route(chain, groups, self.pools, headers, request.peer, decided, path, request.query, body_for)
            upstream = route.first()
        body = None if body_for is None else body_for(groups[upstream.name])
        try:
            target, headers = prepare(upstream, path, request.query, headers, request.peer, decided)
        except BadTarget as e:
            self.fail(ex, bad_request(str(e), "invalid_path"))
            return
        pool = self.pools.made.get(upstream)
        if pool is None:
            pool = self.pools.pool(upstream)
        tap = meter.tap if meter is not None else None
        Relay(request, pool, target, headers, ex.rid, ex.active.header, ex, ex.record, route, body, tap).start()

    def crashed(self, ex: Exchange) -> None:
        """A bug of ours must still give the client an OpenAI-shaped answer (or a cut, once it started)."""
        log.exception("request %s failed", ex.request_id)
        request: Request = ex.request  # type: ignore[assignment]  # the proxy port's exchanges hold its Request
        if not request.started:
            self.fail(ex, INTERNAL)
        else:
            request.abort()
            ex.error = ex.error or INTERNAL.code
            ex.record()

    def fail(self, ex: Exchange, reply: ErrorReply) -> None:
        """The gateway's own answer, before any upstream byte went out; then the record."""
        body = reply.body()
        ex.status, ex.error, ex.sent = reply.status, reply.code, len(body)
        request: Request = ex.request  # type: ignore[assignment]  # the proxy port's exchanges hold its Request
        send_error(request, reply, ex.rid, ex.active.header)
        ex.record()


def _with_usage(body_for: BodyFor, body: bytes, injected: bytes) -> BodyFor:
    """The bytes each upstream gets, asking for usage on the stream (``stream_options.include_usage``):
    ``injected`` (the held ``body`` with it, worked out once) for an upstream that renames nothing."""

    def body_with_usage(group: UpstreamGroup) -> bytes:
        renamed = body_for(group)
        return injected if renamed is body else with_usage(renamed)

    return body_with_usage


def _renamer(body: bytes, field: ModelField | None) -> BodyFor:
    """The bytes each upstream gets: the body with only its model renamed, if that upstream maps it."""
    model = field.model if field is not None else None

    def body_for(group: UpstreamGroup) -> bytes:
        new = group.models.get(model) if model is not None else None
        if new is None or field is None:
            return body
        return rename(body, field, new)

    return body_for
