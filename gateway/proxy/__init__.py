"""The request path: where decisions (:mod:`gateway.policy`) and bytes (:mod:`gateway.dataplane`) meet.

:mod:`.path` is the path itself (``Gateway.handle`` and its steps), :mod:`.exchange`
the one object per request the steps pass along, :mod:`.replies` the gateway's own
OpenAI-shaped answers and :mod:`.record` the metrics, audit and access-log record
written once per request.
"""

from .exchange import Exchange
from .path import Gateway
from .record import REJECTED

__all__ = ["REJECTED", "Exchange", "Gateway"]
