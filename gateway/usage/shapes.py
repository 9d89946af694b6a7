"""The API paths whose requests and answers the gateway knows how to read for token usage.

A shape names how a path's answer reports usage (and how its request asks for
a stream and caps its output): OpenAI's chat completions, legacy completions,
embeddings and Responses API, and Anthropic's messages. A path is matched
exactly, without its query string: a gateway that read usage from a path it
only guessed at would charge from a guess without saying so.
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
    """The shape of a request path (its query string ignored); None for a path not known here."""
    return KNOWN.get(path.partition("?")[0])
