"""Bounds on what one peer can make the proxy port hold, the process's file limit, and
each upstream URL's timeouts and health settings.

Every limit here is enforced before memory grows with the input: a header
that never ends, a connection that never speaks and a client that never
reads all cost a bounded amount and are then closed. The data plane's settings
are its own frozen dataclasses: it imports nothing from the policy, whose
specs :mod:`gateway.proxy.upstreams` translates into these.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

# File descriptors kept back from the proxy port for the control plane, the
# access log, the geo databases, the listening sockets and the interpreter.
FD_RESERVE = 64


@dataclass(frozen=True, slots=True)
class Limits:
    max_request_line: int = 8 * 1024  # request target; longer -> 414
    max_header_bytes: int = 64 * 1024  # request line and headers together; more -> 431
    max_headers: int = 100  # more header lines -> 431
    header_timeout: float = 10.0  # first byte of a request to the end of its headers
    idle_timeout: float = 30.0  # a keep-alive connection with no request in flight
    max_connections: int = 0  # concurrent proxy connections; 0: derived from the file limit
    upstream_connections: int = 0  # per upstream, in use and idle together; 0: the connection cap
    upstream_idle: float = 4.0  # below the 5 s keep-alive of uvicorn-based model servers
    write_high_water: int = 64 * 1024  # per socket: stop reading the other side above this
    body_buffer: int = 64 * 1024  # request body held while the upstream connects
    body_timeout: float = 60.0  # a body read whole before forwarding (to see its model) must arrive in this
    # A streamed upload: the longest wait for its next read (nginx's client_body_timeout, 60 s), counted
    # only while nothing on the gateway's side holds it back; then a 408 and a closed connection.
    body_read_timeout: float = 60.0
    grace: float = 10.0  # SIGTERM: time for in-flight requests and streams to finish


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    """One upstream URL's timeouts, in seconds (the policy's ``timeouts:``, translated by
    :mod:`gateway.proxy.upstreams`). ``first_byte`` is generous because a non-streamed completion
    sends nothing until the model has finished; ``idle`` bounds the silence between reads."""

    connect: float = 5.0
    first_byte: float = 300.0
    idle: float = 60.0
    total: float = 900.0


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Passive health of one upstream URL (the policy's ``health:``, durations resolved to
    seconds): ``failures`` in a row eject it for ``backoff`` seconds, doubled at each new
    ejection up to ``max_backoff`` (:mod:`.health`)."""

    failures: int = 3
    backoff: float = 1.0
    max_backoff: float = 60.0


def raise_nofile() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one; return both as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def connection_cap(limits: Limits, nofile: int) -> int:
    """Proxy connections allowed at once, kept below the file limit.

    Each proxy connection may hold one upstream connection, so half of what
    is left after the reserve; the control plane keeps its descriptors even
    when the proxy port is full.
    """
    fit = max(1, (nofile - FD_RESERVE) // 2)
    return min(limits.max_connections, fit) if limits.max_connections else fit
