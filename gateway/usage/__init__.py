"""Token usage: read from what a provider answers (JSON or an event stream, every known shape), or estimated.

Pure and bytes-only: no sockets, no policy, no Redis. The request path hands a
:class:`UsageTap` (from :mod:`.tap`) to the relay, which feeds it each
decoded piece of the response body as it passes and sends on what the tap
gives back; when the response ends the tap says what was used.

* :mod:`.shapes`: the API paths whose usage is read, and their shapes;
* :mod:`.request`: a request's output cap, stream flag and ``include_usage``, and the body
  asking for usage (bytes spliced, nothing else changed);
* :mod:`.estimate`: token counts without a tokenizer, per model family;
* :mod:`.sse`: server-sent events split out of a byte stream as it arrives (bounded);
* :mod:`.read`: a ``usage`` object in every known shape, whole or from a stream's events;
* :mod:`.tap`: :class:`~.tap.UsageTap`, which the relay feeds (docs/usage-reading.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Source = Literal["usage", "estimate"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one response used. ``cached`` is part of ``input`` and ``reasoning`` part of ``output``,
    as providers report them; ``source`` says whether the provider reported it or it was estimated."""

    input: int
    output: int
    cached: int = 0
    reasoning: int = 0
    source: Source = "usage"

    @property
    def total(self) -> int:
        return self.input + self.output
