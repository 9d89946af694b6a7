"""ISO 3166 codes, for checking what a policy names.

A typo in a country code (``UK`` for ``GB``) would make a rule silently
never match, which for a block rule means letting a region through. So every
code in a policy is checked against ISO 3166-1 alpha-2 and ISO 3166-2 (from
``pycountry``, which tracks the ISO standard) when the policy is loaded.
This runs at load time only; the request path never imports it.
"""

from __future__ import annotations

import difflib
import re
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


# Codes people write for a country that ISO spells differently: the EU's own
# abbreviations (UK, EL) and the United Kingdom's common name.
_COMMON_MISTAKES = {"UK": "GB", "EL": "GR"}
_SUBDIVISION_FORMAT = re.compile(r"^([A-Za-z]{2})-([A-Za-z0-9]{1,3})$")


def country_hint(code: str) -> str | None:
    """A likely meant alpha-2 code for something that is not one: ``UK`` -> ``GB``,
    ``de`` -> ``DE``, ``DEU`` -> ``DE``, ``Germany`` -> ``DE``."""
    import pycountry

    text = code.strip()
    if text.upper() in _COMMON_MISTAKES:
        return _COMMON_MISTAKES[text.upper()]
    if text.upper() in countries():
        return text.upper()
    try:
        return str(pycountry.countries.lookup(text).alpha_2)
    except LookupError:
        pass
    if len(text) > 3:  # a name, perhaps misspelt; two- and three-letter guesses are noise
        try:
            found = pycountry.countries.search_fuzzy(text)
        except LookupError:
            return None
        return str(found[0].alpha_2) if found else None
    return None


def country_problem(code: str) -> str:
    """Why ``code`` is not an alpha-2 code, with the likely meant one (to follow the quoted code)."""
    hint = country_hint(code)
    meant = f"; did you mean {hint!r}?" if hint else ""
    return f"is not an ISO 3166-1 alpha-2 code{meant}"


def subdivision_problem(code: str) -> str:
    """Why ``code`` is not an ISO 3166-2 code, in the words most likely to help
    (to follow the quoted code: ``'GB-XXX' is no subdivision: ...``)."""
    m = _SUBDIVISION_FORMAT.match(code.strip())
    if m is None:
        return "is not an ISO 3166-2 code: write the country's alpha-2 code, '-', and the subdivision ('UA-43')"
    country, rest = m.group(1).upper(), m.group(2).upper()
    if f"{country}-{rest}" in subdivisions():
        return f"is not an ISO 3166-2 code: codes are upper-case, write '{country}-{rest}'"
    if country not in countries():
        hint = country_hint(country)
        meant = f"; did you mean '{hint}-{rest}'?" if hint and f"{hint}-{rest}" in subdivisions() else ""
        return f"names no country: '{m.group(1)}' is not an ISO 3166-1 alpha-2 code{meant}"
    known = sorted(s for s in subdivisions() if s.startswith(country + "-"))
    if not known:
        return f"is no such subdivision: ISO 3166-2 lists no subdivisions of {country}"
    close = difflib.get_close_matches(f"{country}-{rest}", known, n=3)
    also = f" (close: {', '.join(close)})" if close else ""
    return f"is no such subdivision: ISO 3166-2 lists no '{m.group(2)}' in {country}{also}"
