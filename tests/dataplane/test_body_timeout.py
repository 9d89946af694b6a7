"""A streamed upload that stops arriving is given up on after ``Limits.body_read_timeout``, not after first_byte.

The data plane runs in this process (:mod:`support.wire`) so that the bound can be set small;
the client stops sending and waits for the gateway to act (no sleep: the answer is the event).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from gateway.dataplane.limits import Limits
from support.processes import RawUpstream
from support.raw_http import parse_responses, read_until_closed
from support.wire import GB, GUARD, inprocess_gateway

STARTS = {
    "content-length": b"Content-Length: 100\r\n\r\n" + b"x" * 10,
    "chunked": b"Transfer-Encoding: chunked\r\n\r\na\r\n" + b"x" * 10 + b"\r\n",
    "chunked, mid-chunk": b"Transfer-Encoding: chunked\r\n\r\n64\r\n" + b"x" * 10,
}


@pytest.mark.parametrize("name", sorted(STARTS))
def test_a_stalled_upload_gets_a_408_and_never_reaches_the_upstream_whole(
    tmp_path: Path, raw_upstream: RawUpstream, name: str
) -> None:
    with inprocess_gateway(tmp_path, raw_upstream.url, Limits(body_read_timeout=0.3)) as gw:
        head = f"POST /v1/files HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {GB}\r\n".encode()
        with socket.create_connection(("127.0.0.1", gw.port), timeout=GUARD) as s:
            s.sendall(head + STARTS[name])
            raw, closed = read_until_closed(s, GUARD)
    lines = [json.loads(line) for line in gw.access_log.read_text().splitlines()]  # written whole on shutdown
    (r,) = parse_responses(raw)
    assert closed and r.status == 408 and r.header("connection") == "close"
    assert r.json()["error"]["code"] == "request_body_timeout"
    assert raw_upstream.complete == [0] and raw_upstream.requests() == []  # went up, never whole
    assert [(e["status"], e["error"]) for e in lines] == [(408, "request_body_timeout")]
