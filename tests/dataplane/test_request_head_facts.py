"""What a ``Request`` takes from its head, held to llhttp's own answers on generated heads.

``Request`` skips two of llhttp's calls when their answer is known without them (the URL
parser for an origin-form target with no query or fragment, the version string for a kept
connection with no Connection header): these tests feed generated requests through a real
llhttp parser and compare every fact with what the calls themselves say.
"""

from __future__ import annotations

from typing import Any

import httptools
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dataplane.server import Request

# Bytes llhttp takes in a request target, and the ones that change how the URL parser splits it.
TARGET_BYTES = st.sampled_from([*b"/abcAZ09-._~%!$&'()*+,;=:@", *b"?#", 0x80, 0xFF])


class Head:
    """The parser callbacks ``ClientConnection`` has, collecting one request's head."""

    broken: Any = None
    broken_reason = ""
    peer = "203.0.113.7"

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.request: Request | None = None
        self.version = ""
        self.kept = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.version = self.parser.get_http_version()
        self.kept = self.parser.should_keep_alive()
        self.request = Request(self, "POST", self.url, self.headers)  # type: ignore[arg-type]


def oracle_path(url: bytes) -> tuple[bytes, bytes]:
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        return url, b""
    return parsed.path or b"", parsed.query or b""


@settings(max_examples=400, deadline=None)
@given(st.lists(TARGET_BYTES, min_size=0, max_size=24).map(lambda b: b"/" + bytes(b)))
def test_the_target_is_split_as_the_url_parser_splits_it(target: bytes) -> None:
    head = Head()
    try:
        head.parser.feed_data(b"GET " + target + b" HTTP/1.1\r\nhost: x\r\n\r\n")
    except httptools.HttpParserError:
        return  # llhttp refuses the request line: no Request is made
    assert head.request is not None
    assert (head.request.raw_path, head.request.query) == oracle_path(head.url)


CONNECTION = st.sampled_from(
    [
        None,
        ("Connection", "close"),
        ("Connection", "keep-alive"),
        ("Connection", "Keep-Alive"),
        ("Connection", "upgrade, keep-alive"),
        ("Connection", "te"),
        ("Proxy-Connection", "keep-alive"),
        ("proxy-connection", "close"),
        ("CONNECTION", "KEEP-ALIVE"),
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    version=st.sampled_from(["1.0", "1.1"]),
    connections=st.lists(CONNECTION, max_size=2),
    expect=st.sampled_from([None, "100-continue", "100-Continue", "nothing"]),
    chunked=st.booleans(),
)
def test_version_keep_alive_and_expectation_are_llhttps(
    version: str, connections: list[tuple[str, str] | None], expect: str | None, chunked: bool
) -> None:
    lines = ["host: x"]
    lines += [f"{name}: {value}" for c in connections if c is not None for name, value in [c]]
    if expect is not None:
        lines.append(f"Expect: {expect}")
    lines.append("Transfer-Encoding: chunked" if chunked else "Content-Length: 2")
    head = Head()
    fields = "".join(line + "\r\n" for line in lines)
    head.parser.feed_data(f"POST /v1/x HTTP/{version}\r\n{fields}\r\n".encode())
    request = head.request
    assert request is not None
    assert request.http10 == (head.version == "1.0")
    assert request.expect_continue == (expect is not None and expect.lower() == "100-continue" and version != "1.0")
    assert request.keep_alive == (head.kept and not (chunked and version == "1.0"))
