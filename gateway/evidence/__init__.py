"""Evidence: what an auditor can take away and check.

* :mod:`.entries`: the kinds of audit entries (requests, what was in force,
  gaps, hourly counts) as frozen dataclasses, and :func:`.entries.parse_entry`;
* :mod:`.chain`: the HMAC chain over them: canonical form, MAC, and
  :func:`.chain.verify`, which names the first entry altered, removed or
  reordered.

Pure: no sockets, no Redis, no clock but what callers pass in (the Redis
side is :mod:`gateway.shared.audit`), so the same code checks a live stream
and an exported file.
"""
