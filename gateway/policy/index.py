"""The rule index: the first rule a request matches, found without trying the rules one by one.

:func:`~.decide.decide` asks for the first rule (in the policy's order) whose
conditions all hold. Trying each rule costs 0.5-0.8 µs a rule, so 1,000
per-customer rules cost more than the rest of the gateway; here the rules are
compiled once per load into lookup tables, and a request costs a handful of
dict lookups and bisects whatever the number of rules.

Rules are grouped by their *signature*, the keys they constrain (``cidrs``;
``countries`` + ``paths``; none at all), since a rule can only match when
every one of its own keys holds and a group's rules share their keys. Within
a group each key has a table from a request's fact to the ascending tuple of
the group's rules that the fact satisfies:

* ``cidrs``: sorted disjoint address intervals per family, each with the rules
  whose CIDRs hold all of it (one bisect);
* ``countries``, ``asns``: a dict; ``subdivisions`` and ``anonymizer`` (a
  request can have several): a dict, one lookup per value the request has;
* ``paths`` and ``models``: exact names in a dict, prefixes in a dict per
  prefix length, so a path costs one lookup per distinct prefix length.

A group's candidates are the rules in every one of its keys' tuples (a
leapfrog over the sorted tuples, by bisect); the request's first match is the
lowest candidate over all groups, and the next match after a ``mode: monitor``
rule is the next lowest. The walk that ``explain --trace`` shows stays the
ordered one (:func:`.decide.decide_in_order`), and the fast tier's property
test holds the two to the same :class:`~.compiled.Decision`.

The same tables find, for :mod:`.compile`'s unreachable-rule check, the
earlier rules that could cover a later one, so that check no longer compares
every pair.

Memory: each interval holds the rules whose CIDRs contain it, so a policy
whose rules nest CIDRs many levels deep pays once per level; tuples that
repeat are shared.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterator, Sequence

from ..addresses import IPAddress
from ..geo import GeoFacts
from .compiled import UNREAD, Patterns, Rule, Unread

Ids = tuple[int, ...]  # positions of rules in the policy, ascending
Union = tuple[Ids, ...]  # a rule is in a union when it is in any of its tuples
KEYS = ("countries", "subdivisions", "asns", "anonymizer", "cidrs", "paths", "models")


def _next(union: Union, k: int) -> int | None:
    """The lowest rule at or after ``k`` in ``union``."""
    best: int | None = None
    for ids in union:
        if ids[-1] < k:
            continue
        v = ids[bisect_left(ids, k)] if ids[0] < k else ids[0]
        if best is None or v < best:
            best = v
    return best


def first_common(unions: Sequence[Union], k: int) -> int | None:
    """The lowest rule at or after ``k`` that is in every union (a leapfrog: each step skips ahead by bisect)."""
    n = len(unions)
    agreed = 0
    i = 0
    while agreed < n:
        v = _next(unions[i], k)
        if v is None:
            return None
        if v == k:
            agreed += 1
        else:
            k, agreed = v, 1
        i = i + 1 if i + 1 < n else 0
    return k


class _Tuples:
    """Shares equal tuples of rule positions between tables (a policy repeats them often)."""

    def __init__(self) -> None:
        self._seen: dict[Ids, Ids] = {}

    def share(self, ids: Sequence[int]) -> Ids:
        t = tuple(ids)
        return self._seen.setdefault(t, t)


class Intervals:
    """Addresses of one family (as integers), mapped to the rules whose CIDRs hold them."""

    __slots__ = ("ids", "starts")

    def __init__(self, spans: Sequence[tuple[int, int, int]], tuples: _Tuples | None = None) -> None:
        """``spans``: (first, last, rule) for each merged range of each rule's CIDRs."""
        tuples = tuples or _Tuples()
        events: list[tuple[int, int, int]] = []  # (where, +1 or -1, rule)
        for lo, hi, rule in spans:
            events.append((lo, 1, rule))
            events.append((hi + 1, -1, rule))
        events.sort()
        self.starts: list[int] = []
        self.ids: list[Ids] = []
        active: list[int] = []
        for j, (where, change, rule) in enumerate(events):
            if change > 0:
                insort(active, rule)
            else:
                active.remove(rule)
            if j + 1 < len(events) and events[j + 1][0] == where:
                continue  # the set is read once every event at this address is applied
            current = tuples.share(active)
            if self.ids and self.ids[-1] == current:
                continue
            if self.starts and self.starts[-1] == where:
                self.ids[-1] = current
            else:
                self.starts.append(where)
                self.ids.append(current)

    def at(self, value: int) -> Ids:
        i = bisect_right(self.starts, value) - 1
        return self.ids[i] if i >= 0 else ()


class _Names:
    """Exact names and prefixes (``Patterns``) mapped to their rules: request paths or model names."""

    __slots__ = ("exact", "fold", "lengths", "prefixes", "slash")

    def __init__(self, fold: bool, slash: bool, rules: Sequence[tuple[int, Patterns]], tuples: _Tuples) -> None:
        self.fold = fold  # paths_case: insensitive (the patterns are folded already)
        self.slash = slash  # an exact path matches with one trailing '/' too (PathSet)
        exact: dict[str, list[int]] = {}
        prefixes: dict[str, list[int]] = {}
        for i, patterns in rules:
            for p in patterns.exact:
                exact.setdefault(p, []).append(i)
            for p in patterns.prefixes:
                prefixes.setdefault(p, []).append(i)
        self.exact = {k: tuples.share(v) for k, v in exact.items()}
        self.prefixes = {k: tuples.share(v) for k, v in prefixes.items()}
        self.lengths = tuple(sorted({len(p) for p in prefixes}))

    def holding(self, text: str, out: list[Ids]) -> None:
        """Adds the rules whose patterns hold ``text`` (``text in patterns``)."""
        if self.fold:
            text = text.lower()
        ids = self.exact.get(text)
        if ids:
            out.append(ids)
        if self.slash and len(text) > 1 and text[-1] == "/":
            ids = self.exact.get(text[:-1])
            if ids:
                out.append(ids)
        self.under(text, out)

    def under(self, prefix: str, out: list[Ids]) -> None:
        """Adds the rules with a prefix that ``prefix`` starts with (what ``Patterns.covers`` asks of a prefix)."""
        size = len(prefix)
        for n in self.lengths:
            if n > size:
                break
            ids = self.prefixes.get(prefix[:n])
            if ids:
                out.append(ids)


# What a request brings to the tables: the address, the country (by geo.field), facts, path and model.
Request = tuple[IPAddress | None, str | None, GeoFacts, str, str | Unread | None]


class _Key:
    """One key of one group: ``request`` gives the union of the group's rules a request satisfies
    on this key (None: none), ``covering`` the unions that hold every rule that may cover a rule's
    values on this key (an empty list: no constraint; None: no rule can)."""

    def request(
        self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: object
    ) -> Union | None:
        raise NotImplementedError

    def covering(self, rule: Rule) -> list[Union] | None:
        raise NotImplementedError

    def first(self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: object) -> int | None:
        """The lowest rule of ``request``'s union: a group of one key needs no more."""
        union = self.request(ip, country, facts, path, model)
        return None if union is None else min(ids[0] for ids in union)


class _Values(_Key):
    """countries, subdivisions, asns, anonymizer: a set of values per rule, a dict per key."""

    def __init__(self, key: str, rules: Sequence[tuple[int, Rule]], tuples: _Tuples) -> None:
        self.key = key
        table: dict[object, list[int]] = {}
        for i, rule in rules:
            for value in getattr(rule, key):
                table.setdefault(value, []).append(i)
        self.table: dict[object, Ids] = {k: tuples.share(v) for k, v in table.items()}

    def request(
        self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: object
    ) -> Union | None:
        get = self.table.get
        found = [ids for v in getattr(facts, self.key) if (ids := get(v))]  # a request's subdivisions or flags
        return tuple(found) if found else None

    def covering(self, rule: Rule) -> list[Union] | None:
        out: list[Union] = []
        for value in getattr(rule, self.key):
            ids = self.table.get(value)
            if not ids:
                return None
            out.append((ids,))
        return out


class _Several(_Values):
    """subdivisions or anonymizer: a request may have several values, any of which may match."""

    def first(self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: object) -> int | None:
        best: int | None = None
        get = self.table.get
        for value in facts.subdivisions if self.key == "subdivisions" else facts.anonymizer:
            ids = get(value)
            if ids and (best is None or ids[0] < best):
                best = ids[0]
        return best


class _Country(_Values):
    def request(
        self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: object
    ) -> Union | None:
        ids = self.table.get(country)
        return (ids,) if ids else None

    def first(self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: object) -> int | None:
        ids = self.table.get(country)
        return ids[0] if ids else None


class _Asn(_Values):
    def request(
        self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: object
    ) -> Union | None:
        ids = self.table.get(facts.asn)
        return (ids,) if ids else None

    def first(self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: object) -> int | None:
        ids = self.table.get(facts.asn)
        return ids[0] if ids else None


class _Cidrs(_Key):
    def __init__(self, rules: Sequence[tuple[int, Rule]], tuples: _Tuples) -> None:
        spans: dict[int, list[tuple[int, int, int]]] = {4: [], 6: []}
        for i, rule in rules:
            assert rule.cidrs is not None
            for version, family in spans.items():
                starts, ends = rule.cidrs.spans(version)
                family.extend((lo, hi, i) for lo, hi in zip(starts, ends, strict=True))
        self.v4 = Intervals(spans[4], tuples)
        self.v6 = Intervals(spans[6], tuples)

    def request(
        self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: object
    ) -> Union | None:
        if ip is None:
            return None
        ids = (self.v4 if ip.version == 4 else self.v6).at(int(ip))
        return (ids,) if ids else None

    def first(self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: object) -> int | None:
        if ip is None:
            return None
        ids = (self.v4 if ip.version == 4 else self.v6).at(int(ip))
        return ids[0] if ids else None

    def covering(self, rule: Rule) -> list[Union] | None:
        assert rule.cidrs is not None
        out: list[Union] = []
        for net in rule.cidrs.networks:
            family = self.v4 if net.version == 4 else self.v6
            for end in (int(net.network_address), int(net.broadcast_address)):
                ids = family.at(end)
                if not ids:
                    return None
                out.append((ids,))
        return out


class _Patterns(_Key):
    """paths (with PathSet's trailing '/' and case folding) or models (with body.unknown_model)."""

    def __init__(self, key: str, rules: Sequence[tuple[int, Rule]], tuples: _Tuples) -> None:
        self.key = key
        by_case: dict[bool, list[tuple[int, Patterns]]] = {}
        for i, rule in rules:
            patterns: Patterns = getattr(rule, key)
            by_case.setdefault(bool(getattr(patterns, "ignore_case", False)), []).append((i, patterns))
        self.tables = tuple(_Names(fold, key == "paths", some, tuples) for fold, some in by_case.items())
        unknown = [i for i, rule in rules if rule.unknown_matches]
        self.members = tuples.share([i for i, _ in rules])
        self.unknown = tuples.share(unknown)

    def holding(self, text: str) -> Union | None:
        out: list[Ids] = []
        for names in self.tables:
            names.holding(text, out)
        return tuple(out) if out else None

    def request(
        self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: object
    ) -> Union | None:
        if self.key == "paths":
            return self.holding(path)
        if model is UNREAD:  # every rule can match until the body says: decide() then reads it
            return (self.members,)
        if model is None:
            return (self.unknown,) if self.unknown else None
        assert isinstance(model, str)
        return self.holding(model)

    def covering(self, rule: Rule) -> list[Union] | None:
        patterns: Patterns = getattr(rule, self.key)
        out: list[Union] = []
        for p in patterns.exact:
            union = self.holding(p)
            if union is None:
                return None
            out.append(union)
        for p in patterns.prefixes:
            found: list[Ids] = []
            for names in self.tables:
                names.under(p, found)
            if not found:
                return None
            out.append(tuple(found))
        if self.key == "models" and rule.unknown_matches:
            if not self.unknown:
                return None
            out.append((self.unknown,))
        return out


def _key(key: str, rules: Sequence[tuple[int, Rule]], tuples: _Tuples) -> _Key:
    if key == "cidrs":
        return _Cidrs(rules, tuples)
    if key in ("paths", "models"):
        return _Patterns(key, rules, tuples)
    if key == "countries":
        return _Country(key, rules, tuples)
    if key == "asns":
        return _Asn(key, rules, tuples)
    return _Several(key, rules, tuples)


_CHEAPEST_FIRST = ("countries", "asns", "cidrs", "subdivisions", "anonymizer", "models", "paths")


def signature(rule: Rule) -> tuple[str, ...]:
    """The keys a rule constrains, in :data:`KEYS` order."""
    return tuple(k for k in KEYS if getattr(rule, k) is not None)


class _Group:
    """The rules that constrain the same keys."""

    __slots__ = ("first", "keys", "lowest", "members", "signature")

    def __init__(self, sig: tuple[str, ...], rules: Sequence[tuple[int, Rule]], tuples: _Tuples) -> None:
        self.signature = frozenset(sig)
        self.members: Union = (tuples.share([i for i, _ in rules]),)
        self.lowest = rules[0][0]
        # A dict lookup first: a request that fails it costs no more.
        self.keys = tuple(_key(k, rules, tuples) for k in sorted(sig, key=_CHEAPEST_FIRST.index))
        # The group's first match, by the cheapest means: one key's own lookup, or the leapfrog.
        self.first: Callable[[IPAddress | None, str | None, GeoFacts, str, object], int | None] = (
            self.keys[0].first if len(self.keys) == 1 else self._first
        )

    def request(
        self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: object
    ) -> list[Union] | None:
        if not self.keys:
            return [self.members]
        unions = []
        for key in self.keys:
            union = key.request(ip, country, facts, path, model)
            if union is None:
                return None
            unions.append(union)
        return unions

    def _first(
        self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: object
    ) -> int | None:
        unions = []
        for key in self.keys:  # as request(), one call less: this runs for every request
            union = key.request(ip, country, facts, path, model)
            if union is None:
                return None
            unions.append(union)
        return first_common(unions, 0)


_NEVER = 1 << 62  # past any rule


def _table(key: _Key | None) -> dict[object, Ids]:
    return key.table if isinstance(key, _Values) else {}


class RuleIndex:
    """The rules of one policy as lookup tables. Immutable once built; built once per load."""

    __slots__ = (
        "anonymizer",
        "asns",
        "catch_all",
        "cidrs",
        "countries",
        "groups",
        "models",
        "multi",
        "paths",
        "subdivisions",
    )

    def __init__(self, rules: Sequence[Rule]) -> None:
        by_signature: dict[tuple[str, ...], list[tuple[int, Rule]]] = {}
        for i, rule in enumerate(rules):
            by_signature.setdefault(signature(rule), []).append((i, rule))
        tuples = _Tuples()
        groups = [_Group(sig, members, tuples) for sig, members in by_signature.items()]
        self.groups = tuple(sorted(groups, key=lambda g: g.lowest))
        # The groups of one key (at most one per key) are looked up inline by first(): a call per
        # group costs about as much as the lookup itself, and most rules have one key.
        single = {next(iter(g.signature)): g.keys[0] for g in groups if len(g.keys) == 1}
        self.countries = _table(single.get("countries"))
        self.asns = _table(single.get("asns"))
        self.subdivisions = _table(single.get("subdivisions"))
        self.anonymizer = _table(single.get("anonymizer"))
        cidrs = single.get("cidrs")
        self.cidrs = cidrs if isinstance(cidrs, _Cidrs) else None
        self.paths: _Key | None = single.get("paths")
        self.models: _Key | None = single.get("models")
        self.catch_all = next((g.lowest for g in groups if not g.keys), _NEVER)
        self.multi = tuple(g for g in self.groups if len(g.keys) > 1)

    def first(
        self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: str | Unread | None
    ) -> int | None:
        """The position of the first rule the request matches (as :meth:`matching`), or None.

        Straight-line lookups for the rules of one key, then the groups of several keys
        in the order of their first rule, stopping at a group that starts after the
        best match so far.
        """
        best = self.catch_all
        ids = self.countries.get(country)
        if ids and ids[0] < best:
            best = ids[0]
        if self.asns:
            ids = self.asns.get(facts.asn)
            if ids and ids[0] < best:
                best = ids[0]
        if self.cidrs is not None and ip is not None:
            family = self.cidrs.v4 if ip.version == 4 else self.cidrs.v6
            i = bisect_right(family.starts, int(ip)) - 1
            if i >= 0:
                ids = family.ids[i]
                if ids and ids[0] < best:
                    best = ids[0]
        if self.subdivisions:
            for value in facts.subdivisions:
                ids = self.subdivisions.get(value)
                if ids and ids[0] < best:
                    best = ids[0]
        if self.anonymizer:
            for value in facts.anonymizer:
                ids = self.anonymizer.get(value)
                if ids and ids[0] < best:
                    best = ids[0]
        for key in (self.paths, self.models):
            if key is not None:
                at = key.first(ip, country, facts, path, model)
                if at is not None and at < best:
                    best = at
        for group in self.multi:
            if group.lowest >= best:
                break
            at = group.first(ip, country, facts, path, model)
            if at is not None and at < best:
                best = at
        return None if best == _NEVER else best

    def matching(
        self, ip: IPAddress | None, country: str | None, facts: GeoFacts, path: str, model: str | Unread | None
    ) -> Iterator[int]:
        """The positions of the rules a request matches, ascending: all keys, ``models`` included
        unless the model is :data:`UNREAD` (then a rule with ``models`` matches on the others)."""
        heads: list[list[int]] = []  # [next match, group number]
        found: list[list[Union]] = []
        for group in self.groups:
            unions = group.request(ip, country, facts, path, model)
            if unions is not None:
                first = first_common(unions, 0)
                if first is not None:
                    heads.append([first, len(found)])
                    found.append(unions)
        if len(heads) == 1:  # the common case: one group holds every match
            unions = found[0]
            at: int | None = heads[0][0]
            while at is not None:
                yield at
                at = first_common(unions, at + 1)
            return
        while heads:
            head = min(heads)
            yield head[0]
            after = first_common(found[head[1]], head[0] + 1)
            if after is None:
                heads.remove(head)
            else:
                head[0] = after

    def first_cover(self, rules: Sequence[Rule], position: int, covers: Callable[[Rule, Rule], bool]) -> int | None:
        """The first rule before ``rules[position]`` that ``covers`` it (``covers(earlier, later)``, asked
        of each candidate in order). Candidates are the rules whose keys are a subset of its keys and whose
        tables hold each of its values (a superset of the rules that subsume it), so a load asks about a
        few rules per rule, not every pair."""
        rule = rules[position]
        sig = frozenset(signature(rule))
        best: int | None = None
        for group in self.groups:
            if not group.signature <= sig:
                continue
            unions: list[Union] = []
            for key in group.keys:
                some = key.covering(rule)
                if some is None:
                    break
                unions.extend(some)
            else:
                limit = position if best is None else best
                at = first_common(unions or [group.members], 0)
                while at is not None and at < limit:
                    if covers(rules[at], rule):
                        best = at
                        break
                    at = first_common(unions or [group.members], at + 1)
        return best
