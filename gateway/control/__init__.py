"""The control plane: health, readiness, metrics and the admin API, on a port, thread and event loop of their own.

- :mod:`~gateway.control.app`: the FastAPI app and its routes;
- :mod:`~gateway.control.schemas`: the one model per record that the admin API,
  its OpenAPI document and the CLI's ``--json`` output share;
- :mod:`~gateway.control.gate`: token first, then a bounded body, then the app;
- :mod:`~gateway.control.listener`: uvicorn on its own thread and loop, with
  bounds on connections, heads and idle time;
- :mod:`~gateway.control.proxyloop`: work run on the proxy's loop from the control plane's;
- :mod:`~gateway.control.plane`: all of it, and the live policy, around one worker's data plane.

Nothing on the decision side (policy, explain, trace, diff, live reload)
imports this package; it imports them.
"""
