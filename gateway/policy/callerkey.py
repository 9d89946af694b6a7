"""The caller's API key: read as the upstream would read it, and kept only as its keyed hash.

An override on an API key and a ``by: api_key`` rate limit both name a
caller by the HMAC-SHA256 of its bearer token under the override key (which
every replica sharing one Redis shares), so no token is ever stored, logged
or sent to Redis.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


def hash_key(key: bytes, token: str) -> str:
    """The keyed hash an API-key override is stored and matched under."""
    return hmac.new(key, token.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


_BEARER = b"bearer "


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The caller's bearer token (``Authorization: Bearer ...``), as the upstream would read it."""
    for name, value in headers:
        if name.lower() == b"authorization":
            if value[:7].lower() == _BEARER:
                return value[7:].strip().decode("latin-1") or None
            return None
    return None
