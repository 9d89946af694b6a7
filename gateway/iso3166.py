"""ISO 3166 codes, for checking what a policy names.

A typo in a country code (``UK`` for ``GB``) would make a rule silently
never match, which for a block rule means letting a region through. So every
code in a policy is checked against ISO 3166-1 alpha-2 and ISO 3166-2 (from
``pycountry``, which tracks the ISO standard) when the policy is loaded.
This runs at load time only; the request path never imports it.
"""

from __future__ import annotations

from functools import cache

# Codes that GeoIP vendors use and ISO does not assign (Kosovo), accepted so
# that a policy can name what the databases actually return.
EXTRA_COUNTRIES = frozenset({"XK"})


@cache
def countries() -> frozenset[str]:
    import pycountry

    return frozenset(c.alpha_2 for c in pycountry.countries) | EXTRA_COUNTRIES


@cache
def subdivisions() -> frozenset[str]:
    import pycountry

    return frozenset(s.code for s in pycountry.subdivisions)


def is_country(code: str) -> bool:
    return code in countries()


def is_subdivision(code: str) -> bool:
    return code in subdivisions()
