"""Token budgets and concurrency slots in Redis: the two Lua scripts, what they are asked and what they answer.

Pure (no I/O): :mod:`.budgetredis` sends what is built here, :mod:`.budgets`
reads the answers. The arithmetic is :mod:`gateway.policy.tokenlimit`'s
(``gcra_cost``, ``gcra_settle``, ``quota_window``, ``quota_check``), done in
whole microseconds of Redis's own ``TIME`` (as the requests' GCRA script), so
replicas whose clocks disagree share one budget, and every number the script
handles is an integer a Lua number holds exactly (now is about 1.8e15 µs; 2^53
is 9.0e15).

- ``kind: rate`` keeps one TAT per subject (a string, µs). A request of
  ``cost`` tokens moves it on by :func:`span` (``cost * per / tokens``, rounded
  up to the µs, so rounding never lets more through); the tolerance is the span
  of the whole burst. The key lives as long as the TAT is ahead of now: a
  subject at a full burst costs Redis nothing.
- ``kind: quota`` keeps a hash ``{w: window, used: tokens}`` per subject; the
  window is ``floor(now / per)`` counted from the Unix epoch, so a ``1d`` quota
  is whole again at 00:00 UTC, and the key expires (``PEXPIREAT``) when its
  window ends.
- ``max_concurrent`` keeps a sorted set per subject: member = the request's
  unique id, score = its lease's end (µs). Acquiring drops expired members
  first, so the slots of a replica that died come back within one lease.

:data:`ADMIT_LUA` checks every entry of one request and writes all of them or
none. :data:`SETTLE_LUA` replaces reservations by what was used (a refund is a
settle to zero).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..policy.tokenlimit import TokenCheck, TokenLimit

# KEYS: one per token entry, then the concurrency key when a slot is asked for.
# ARGV[1]: the number of token entries, n; then four per entry: 'r', span of the cost, tolerance, 0 (rate) or
# 'q', cost, tokens, per (quota; µs); then, for a slot: member, lease (µs), streams.
# Returns now, then four per entry (and four for the slot): allowed, value, wait, window, where value is the
# TAT's lead over now (rate; after the request when allowed), the tokens used in the window (quota; ditto) or
# the slots held (concurrency; ditto); wait is until the request would fit (rate, concurrency) or until the
# window ends (quota); window is the quota's window (0 otherwise). Nothing is written unless all fit.
ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local out = {now}
local fits = true
local writes = {}
for i = 1, n do
  local a = 4 * i - 2
  local x, y, z = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local m = #out
  if ARGV[a] == 'r' then
    local tat = tonumber(redis.call('GET', KEYS[i]))
    if tat == nil or tat < now then tat = now end
    local new_tat = tat + x
    if new_tat - now > y then
      fits = false
      out[m + 1], out[m + 2], out[m + 3], out[m + 4] = 0, tat - now, new_tat - y - now, 0
    else
      writes[i] = new_tat
      out[m + 1], out[m + 2], out[m + 3], out[m + 4] = 1, new_tat - now, 0, 0
    end
  else
    local w = math.floor(now / z)
    local got = redis.call('HMGET', KEYS[i], 'w', 'used')
    local used = 0
    if tonumber(got[1]) == w then used = tonumber(got[2]) or 0 end
    if used + x > y then
      fits = false
      out[m + 1], out[m + 2], out[m + 3], out[m + 4] = 0, used, (w + 1) * z - now, w
    else
      writes[i] = used + x
      out[m + 1], out[m + 2], out[m + 3], out[m + 4] = 1, used + x, (w + 1) * z - now, w
    end
  end
end
local member = ARGV[4 * n + 2]
local slots = KEYS[n + 1]
if member then
  local lease, streams = tonumber(ARGV[4 * n + 3]), tonumber(ARGV[4 * n + 4])
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', string.format('%d', now))
  local held = redis.call('ZCARD', slots)
  local m = #out
  if held >= streams then
    fits = false
    local first = redis.call('ZRANGE', slots, 0, 0, 'WITHSCORES')
    local wait = 0
    if first[2] then wait = tonumber(first[2]) - now end
    out[m + 1], out[m + 2], out[m + 3], out[m + 4] = 0, held, wait, 0
  else
    out[m + 1], out[m + 2], out[m + 3], out[m + 4] = 1, held + 1, 0, 0
  end
end
if fits then
  for i = 1, n do
    local a = 4 * i - 2
    if ARGV[a] == 'r' then
      local ms = math.max(1, math.ceil((writes[i] - now) / 1000))
      redis.call('SET', KEYS[i], string.format('%d', writes[i]), 'PX', ms)
    else
      local z = tonumber(ARGV[a + 3])
      local w = math.floor(now / z)
      redis.call('HSET', KEYS[i], 'w', string.format('%d', w), 'used', string.format('%d', writes[i]))
      redis.call('PEXPIREAT', KEYS[i], string.format('%d', math.ceil((w + 1) * z / 1000)))
    end
  end
  if member then
    local lease = tonumber(ARGV[4 * n + 3])
    redis.call('ZADD', slots, string.format('%d', now + lease), member)
    local last = redis.call('ZRANGE', slots, -1, -1, 'WITHSCORES')
    redis.call('PEXPIREAT', slots, string.format('%d', math.ceil(tonumber(last[2]) / 1000) + 1))
  end
end
return out
"""

# KEYS: one per reservation to change. ARGV: four per key: 'r', the change of the TAT (µs, signed), 0, 0
# (rate) or 'q', the change in tokens (signed), the reservation's window, per (µs) (quota). More than was
# reserved is charged from now on (a TAT in the past is first brought to now), less is given back. A quota
# reservation whose window has ended is left alone: it ended with its window. Returns now (µs).
SETTLE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local a = 4 * i - 3
  local d = tonumber(ARGV[a + 1])
  if ARGV[a] == 'r' then
    local tat = tonumber(redis.call('GET', KEYS[i]))
    if d > 0 and (tat == nil or tat < now) then tat = now end
    if tat ~= nil then
      tat = tat + d
      if tat > now then
        redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.max(1, math.ceil((tat - now) / 1000)))
      else
        redis.call('DEL', KEYS[i])
      end
    end
  else
    local w, z = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    if math.floor(now / z) == w then
      local got = redis.call('HMGET', KEYS[i], 'w', 'used')
      local used = 0
      if tonumber(got[1]) == w then used = tonumber(got[2]) or 0 end
      used = math.max(0, used + d)
      redis.call('HSET', KEYS[i], 'w', string.format('%d', w), 'used', string.format('%d', used))
      redis.call('PEXPIREAT', KEYS[i], string.format('%d', math.ceil((w + 1) * z / 1000)))
    end
  end
end
return now
"""


@dataclass(frozen=True, slots=True)
class Ask:
    """One token entry of a request to reserve: its limit, the subject's key and the tokens."""

    limit: TokenLimit
    key: str
    cost: int


@dataclass(frozen=True, slots=True)
class SlotAsk:
    """A concurrency slot to acquire: the subject's key, this request's unique member, the limit, the lease."""

    key: str
    member: str
    streams: int
    lease: float  # seconds


@dataclass(frozen=True, slots=True)
class Reserved:
    """One reservation made: what a settle or refund changes (``window``: the quota's, 0 for a rate)."""

    limit: TokenLimit
    key: str
    cost: int
    window: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the store answered for one request: every token entry's check, in order, and the slot's."""

    checks: tuple[TokenCheck, ...]
    windows: tuple[int, ...]  # the quota window each entry was judged in (0 for a rate)
    slot_allowed: bool = True
    in_flight: int = 0  # slots held, with this request's when allowed
    slot_wait: float = 0.0  # seconds until the first slot held expires, when refused

    @property
    def allowed(self) -> bool:
        return self.slot_allowed and all(c.allowed for c in self.checks)


def capacity(limit: TokenLimit) -> int:
    """The most one request may cost under ``limit``: a rate's burst, a quota's whole window."""
    if limit.kind == "quota":
        return limit.tokens
    return limit.burst or limit.tokens


@functools.lru_cache(maxsize=1024)  # a policy has a few limits; a request asks each several times
def per_us(limit: TokenLimit) -> int:
    return max(1, round(limit.per * 1e6))


@functools.lru_cache(maxsize=1024)
def _fixed(limit: TokenLimit) -> tuple[bytes, bytes]:
    """What :data:`ADMIT_LUA` is told of a limit whatever the request: a rate's tolerance (µs) or a quota's
    tokens, and its period (µs)."""
    if limit.kind == "quota":
        return b"%d" % limit.tokens, b"%d" % per_us(limit)
    return b"%d" % span(capacity(limit), limit), b"0"


def span(tokens: int, limit: TokenLimit) -> int:
    """The µs that ``tokens`` take to refill under a rate (rounded up: a rounding never lets more through)."""
    return -(-tokens * per_us(limit) // limit.tokens)


def tokens_in(us: int, limit: TokenLimit) -> int:
    """The whole tokens that refill in ``us`` µs under a rate (none for a subject in debt)."""
    return max(0, us * limit.tokens // per_us(limit))


def admit_args(asks: Sequence[Ask], slot: SlotAsk | None) -> tuple[list[str], list[bytes]]:
    """KEYS and ARGV of :data:`ADMIT_LUA` for one request."""
    keys = [a.key for a in asks]
    args = [b"%d" % len(asks)]
    for a in asks:
        limit = a.limit
        if limit.kind == "quota":
            args += (b"q", b"%d" % a.cost, *_fixed(limit))
        else:
            args += (b"r", b"%d" % span(a.cost, limit), *_fixed(limit))
    if slot is not None:
        keys.append(slot.key)
        args += (slot.member.encode(), b"%d" % max(1, round(slot.lease * 1e6)), b"%d" % slot.streams)
    return keys, args


def settle_args(changes: Sequence[tuple[Reserved, int]]) -> tuple[list[str], list[bytes]]:
    """KEYS and ARGV of :data:`SETTLE_LUA`: each reservation with the tokens it really cost."""
    keys: list[str] = []
    args: list[bytes] = []
    for r, actual in changes:
        keys.append(r.key)
        limit = r.limit
        if limit.kind == "quota":
            args += (b"q", b"%d" % (actual - r.cost), b"%d" % r.window, b"%d" % per_us(limit))
        else:  # the TAT moves by the difference of the two spans, so a refund gives back exactly what was taken
            args += (b"r", b"%d" % (span(actual, limit) - span(r.cost, limit)), b"0", b"0")
    return keys, args


def outcome_of(reply: Sequence[Any], asks: Sequence[Ask], slot: SlotAsk | None) -> Outcome:
    """:data:`ADMIT_LUA`'s flat reply as an :class:`Outcome` (its numbers as the pure checks give them)."""
    expected = 1 + 4 * (len(asks) + (slot is not None))
    if len(reply) != expected:
        raise ValueError(f"the budget script answered {len(reply)} values, not {expected}")
    checks: list[TokenCheck] = []
    windows: list[int] = []
    for i, a in enumerate(asks):  # integers: Redis answers a Lua number as one
        allowed, value, wait, window = reply[1 + 4 * i : 5 + 4 * i]
        checks.append(_check(a.limit, allowed == 1, value, wait))
        windows.append(window)
    if slot is None:
        return Outcome(tuple(checks), tuple(windows))
    allowed, held, wait, _ = reply[-4:]
    return Outcome(tuple(checks), tuple(windows), allowed == 1, held, wait / 1e6)


def _check(limit: TokenLimit, allowed: bool, value: int, wait: int) -> TokenCheck:
    if limit.kind == "quota":  # value: tokens used; wait: until the window ends
        return TokenCheck(allowed, max(0, limit.tokens - value), 0.0 if allowed else wait / 1e6, wait / 1e6)
    # value: the TAT's lead over now; wait: until the request would fit
    left = tokens_in(span(capacity(limit), limit) - value, limit)
    return TokenCheck(allowed, left, wait / 1e6, value / 1e6)
