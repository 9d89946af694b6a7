"""Who the caller is when client keys are in force: a valid key of the gateway's own, named, or OpenAI's 401.

A rule's ``client_keys: required`` (or its upstream's) makes the request
path check the bearer token against the keys the gateway issued
(:mod:`gateway.shared.clientkeys`: a keyed hash looked up in a table swapped
whole, so a revoke on any replica holds here within a second). The key's
*name* is then the caller: rate limits, token budgets, the access log and the
audit stream name it, never the token, which reaches no log, metric or Redis
key. A missing token, an unknown, expired or revoked one all get OpenAI's
``401 invalid_api_key``, which the SDKs raise as ``AuthenticationError`` and
do not retry; the token is not echoed, not even masked.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from ..errors import ErrorReply
from ..policy.callerkey import bearer_token

NO_KEY = ErrorReply(
    401,
    "invalid_request_error",
    "invalid_api_key",
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
)
BAD_KEY = ErrorReply(
    401,
    "invalid_request_error",
    "invalid_api_key",
    "Incorrect API key provided. Ask the operator of this gateway for a valid key.",
)
# The keys' hashing key is held in Redis: until a replica has read it no token can be checked, and
# refusing every caller with a 401 would tell them their key is wrong. Retried, as a 503 is.
KEYS_UNAVAILABLE = ErrorReply(
    503,
    "server_error",
    "client_keys_unavailable",
    "The gateway cannot check API keys right now; try again shortly.",
    retry=True,
    headers=((b"retry-after", b"1"),),
)


def identify(keys: Any, headers: Iterable[tuple[bytes, bytes]]) -> str | ErrorReply:
    """The name of the valid client key the request's bearer token is, or the answer that refuses it."""
    token = bearer_token(headers)
    if token is None:
        return NO_KEY
    if keys is None:
        return BAD_KEY  # client keys required, and none configured: no token can be one of ours
    token_hash = keys.hash(token)
    if token_hash is None:
        return KEYS_UNAVAILABLE
    key = keys.table.find(token_hash, time.time())
    if key is None:
        return BAD_KEY
    name: str = key.name
    return name
