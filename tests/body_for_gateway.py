"""``python -m body_for_gateway serve ...``: the gateway, with every forwarded request given a body of the
gateway's own, as a caller that has read and rewritten the client's body does (``Gateway.forward``'s
``body_for``): ``{"model":"<the upstream's name>"}``, so a test sees which upstream's bytes arrived where.

For requests without a body of their own (nothing else reads the client's).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from gateway import proxy
from gateway.cli import main
from gateway.upstream import UpstreamGroup

_forward = proxy.Gateway.forward


def _body_for(group: UpstreamGroup) -> bytes:
    return b'{"model":"%s"}' % group.name.encode()


def forward(self: proxy.Gateway, *args: Any, body_for: Callable[[UpstreamGroup], bytes] | None = None) -> None:
    _forward(self, *args, body_for=_body_for)


proxy.Gateway.forward = forward  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
