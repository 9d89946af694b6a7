"""What may change while the gateway serves, and how a change gets in.

The policy, the shadow policy and the GeoIP files can be replaced on disk
at any time. This package owns noticing that (a ``watchfiles`` watcher,
SIGHUP, ``POST /admin/reload``), judging the candidate exactly as startup
would plus the policy's own tests, and swapping it in as one immutable
:class:`~gateway.live.active.Active` so that a request is judged wholly by
the old policy or wholly by the new one. A bad candidate changes nothing
but the status that ``/readyz``, ``/metrics`` and the log report.
"""
