"""The suite's fixtures (they live in ``support.processes``) and its tiers.

A test is ``e2e`` when it runs a real process or an external server: it lives in ``tests/e2e/`` or
``tests/deploy/``, or uses a fixture that starts one, or its module says ``pytestmark = pytest.mark.e2e``.
Everything else is the fast tier (``scripts/test-fast``, that is ``pytest -m "not e2e"``): in-process,
and a fast-tier test that starts a subprocess fails, so the tier stays what it says.
"""

from __future__ import annotations

pytest_plugins = ["support.processes"]
