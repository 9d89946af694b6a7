"""The API paths whose requests and answers the gateway knows how to read for token usage.

A shape names how a path's answer reports usage (and how its request asks for
a stream and caps its output): OpenAI's chat completions, legacy completions,
embeddings and Responses API, and Anthropic's messages. A path is matched
whole, without its query string, and in any case: a policy with ``paths_case:
insensitive`` sends ``/V1/Chat/Completions`` to an upstream that answers it as
``/v1/chat/completions`` (one that does not answers 404, which no tap reads). A
gateway that read usage from a path it only guessed at would charge from a
guess without saying so.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

CHAT = "chat"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"
RESPONSES = "responses"
MESSAGES = "messages"

KNOWN: Mapping[str, str] = MappingProxyType(
    {
        "/v1/chat/completions": CHAT,
        "/v1/completions": COMPLETIONS,
        "/v1/embeddings": EMBEDDINGS,
        "/v1/responses": RESPONSES,
        "/v1/messages": MESSAGES,
    }
)

# Shapes whose streams take OpenAI's stream_options.include_usage (the gateway may inject it).
INCLUDE_USAGE = frozenset({CHAT, COMPLETIONS})


def shape_of(path: str) -> str | None:
    """The shape of a request path (its query string ignored, any case); None for a path not known here."""
    path = path.partition("?")[0]
    shape = KNOWN.get(path)
    return shape if shape is not None or path.islower() else KNOWN.get(path.lower())
