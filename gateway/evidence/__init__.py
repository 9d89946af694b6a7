"""Evidence: what an auditor can take away and check.

* :mod:`.entries`: the kinds of audit entries (requests, what was in force,
  gaps, hourly counts) as frozen dataclasses, and :func:`.entries.parse_entry`;
* :mod:`.chain`: the HMAC chain over them: canonical form, MAC, and
  :func:`.chain.verify`, which names the first entry altered, removed or
  reordered;
* :mod:`.report` and :mod:`.report_html`: the evidence report's data
  (:class:`gateway.reports.EvidenceReportOut`) from the entries, and its
  self-contained HTML page;
* :mod:`.policymap` and :mod:`.worldmap`: a policy, a policy change or a
  report's counts on a world map (inline SVG; shapes in ``world.svg``, built
  by :mod:`.worldmap_build`).

Pure: no sockets, no Redis, no clock but what callers pass in (the Redis
side is :mod:`gateway.shared.audit`), so the same code checks a live stream
and an exported file.
"""
