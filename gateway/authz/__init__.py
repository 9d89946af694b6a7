"""The decision service: the proxy port's judging, answered to another proxy instead of forwarded.

:mod:`.query` holds the values that cross into and out of the core (a
:class:`.query.Query` in, an :class:`.query.Answer` out), :mod:`.judge` the
core itself (the proxy port's own steps, :class:`gateway.proxy.path.Gateway`,
with the terminal steps answering), :mod:`.contracts` how each proxy's HTTP request
becomes a query and an answer becomes that proxy's response (the listener's
handler), :mod:`.config` the serve options that shape them. The gRPC contract (Envoy ``ext_authz``) builds on
the same core.
"""
