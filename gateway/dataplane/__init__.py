"""The proxy port's HTTP/1.1 data plane: asyncio Protocols on uvloop, ``httptools`` both ways.

It owns how bytes move, not what is decided: the client-facing server
(:mod:`.server`: parsing, framing, pipelining, limits, slow-peer timeouts,
the connection cap, graceful drain), the upstream side (:mod:`.pool`: a
keep-alive pool per upstream, TLS with verification, connect timeouts) and
the relay between them (:mod:`.relay`: upstream timeouts, backpressure both
ways, error events in a started stream, retry on a stale pooled connection),
and what an upstream URL is and which headers pass (:mod:`.upstream`).
:mod:`gateway.proxy` calls into it with the request path written out in one
place. It imports nothing from :mod:`gateway.policy`, :mod:`gateway.proxy` or
the control plane: its settings are its own frozen dataclasses (:mod:`.limits`),
which :mod:`gateway.proxy.upstreams` fills from the policy.

Why not a framework: a measured sketch of this design served ~3.5x the
requests of uvicorn's ASGI cycle plus an aiohttp client request on the same
core, and a streamed event costs one parser callback and one write instead
of an ``await`` in each of two libraries.
"""
