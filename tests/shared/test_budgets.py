"""Token budgets and concurrency slots in memory (one process): reserve, settle, refund, release, the 429s.

The same semantics against a real redis-server, single and Cluster, are in
test_budgets_redis.py.
"""

from __future__ import annotations

import pytest

from gateway.errors import ErrorReply
from gateway.policy.tokenlimit import Budget, Concurrency, TokenLimit
from gateway.shared import budgetmemory
from gateway.shared.budgetlua import admit_args, settle_args, span, tokens_in
from gateway.shared.budgets import Held, admit, never_fits, refund, release, settle
from gateway.shared.store import OverrideStore
from support.budgets import Recorder

RATE = TokenLimit("r", 0, 1000, 60.0, ("api_key",))  # 1000 tokens a minute, a burst of 1000
QUOTA = TokenLimit("r", 1, 5000, 86400.0, ("country", "model"), kind="quota")
SLOTS = Concurrency("r", 2, ("api_key",))


class Clock:
    """The memory store's clocks, moved by hand (a lease or a refill without waiting for it)."""

    def __init__(self) -> None:
        self.mono, self.wall = 1000.0, 1_764_806_400.0 + 3600  # 01:00 UTC

    def on(self, store: OverrideStore) -> None:
        assert isinstance(store.budgets, budgetmemory.MemoryBudgets)
        store.budgets.monotonic, store.budgets.wall = lambda: self.mono, lambda: self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> OverrideStore:
    s = OverrideStore({})
    s.observer = Recorder()
    clock.on(s)
    return s


def ask(
    store: OverrideStore,
    budget: Budget,
    costs: list[int],
    subjects: list[str] | None = None,
    slot: tuple[str, str] | None = None,
    lease: float = 60.0,
) -> Held | ErrorReply:
    got: list[Held | ErrorReply] = []
    admit(store, budget, subjects or ["k1"] * len(costs), costs, slot, lease, "closed", got.append)
    assert len(got) == 1  # memory answers at once
    return got[0]


def headers(reply: Held | ErrorReply) -> dict[bytes, bytes]:
    assert isinstance(reply, ErrorReply)
    return dict(reply.headers)


def events(store: OverrideStore) -> list[tuple[str, str, str]]:
    assert isinstance(store.observer, Recorder)
    return store.observer.events


def test_a_rate_lets_its_burst_through_then_refuses_with_openais_429(store: OverrideStore, clock: Clock) -> None:
    budget = Budget("r", (RATE,))
    held = ask(store, budget, [600])
    assert isinstance(held, Held) and held.costs == (600,) and not held.fallback
    assert isinstance(ask(store, budget, [400]), Held)
    refused = ask(store, budget, [100])
    assert isinstance(refused, ErrorReply) and refused.status == 429 and refused.retry
    assert (refused.type, refused.code) == ("tokens", "rate_limit_exceeded")
    h = headers(refused)
    assert h[b"x-ratelimit-limit-tokens"] == b"1000" and h[b"x-ratelimit-remaining-tokens"] == b"0"
    assert h[b"retry-after-ms"] == b"6000" and h[b"retry-after"] == b"6"  # 100 tokens refill in 6 s
    assert h[b"x-ratelimit-reset-tokens"] == b"60s"
    assert "requested 100" in refused.message and "'r'" in refused.message
    assert isinstance(ask(store, budget, [100], ["k2"]), Held)  # another subject has its own budget
    clock.advance(6)
    assert isinstance(ask(store, budget, [100]), Held)
    assert events(store) == [("refused", "r", "rate")]


def test_a_quota_empties_and_is_whole_again_when_its_utc_window_ends(store: OverrideStore, clock: Clock) -> None:
    budget = Budget("r", (QUOTA,))
    assert isinstance(ask(store, budget, [5000]), Held)
    refused = ask(store, budget, [1])
    assert isinstance(refused, ErrorReply) and refused.status == 429 and not refused.retry
    assert (refused.type, refused.code) == ("insufficient_quota", "insufficient_quota")
    h = headers(refused)
    assert h[b"x-ratelimit-remaining-tokens"] == b"0" and h[b"x-ratelimit-reset-tokens"] == b"82800s"  # 23 h
    assert h[b"retry-after"] == b"82800"
    clock.advance(82800 - 1)
    assert isinstance(ask(store, budget, [1]), ErrorReply)
    clock.advance(1)  # 00:00 UTC
    assert isinstance(ask(store, budget, [5000]), Held)
    assert events(store) == [("refused", "r", "quota")] * 2


def test_a_request_that_can_never_fit_is_told_so_without_asking_the_store(store: OverrideStore) -> None:
    burst = TokenLimit("r", 0, 1000, 60.0, ("api_key",), burst=200)
    refused = ask(store, Budget("r", (burst,)), [201])
    assert isinstance(refused, ErrorReply) and refused.status == 429 and not refused.retry
    assert "can never fit" in refused.message and "more than the 200" in refused.message
    assert headers(refused)[b"x-ratelimit-limit-tokens"] == b"1000"
    assert b"retry-after" not in headers(refused)
    assert never_fits(QUOTA, 5001).code == "insufficient_quota"
    assert isinstance(ask(store, Budget("r", (burst,)), [200]), Held)  # its whole burst fits
    assert events(store) == [("refused", "r", "rate")]


def test_every_entry_is_reserved_or_none(store: OverrideStore, clock: Clock) -> None:
    budget = Budget("r", (RATE, QUOTA))
    assert isinstance(ask(store, Budget("r", (QUOTA,)), [4900]), Held)
    refused = ask(store, budget, [500, 500])  # the rate has room, the quota not: the rate keeps its room
    assert isinstance(refused, ErrorReply) and refused.code == "insufficient_quota"
    assert isinstance(ask(store, Budget("r", (RATE,)), [1000]), Held)
    # Both refuse: the quota (not retried) is the one told.
    both = ask(store, budget, [500, 500])
    assert isinstance(both, ErrorReply) and both.code == "insufficient_quota"


def test_settle_gives_back_what_was_not_used_and_charges_an_overshoot_as_debt(
    store: OverrideStore, clock: Clock
) -> None:
    budget = Budget("r", (RATE, QUOTA))
    held = ask(store, budget, [800, 800])
    assert isinstance(held, Held)
    settle(store, held, [100, 100])  # 700 given back to each
    again = ask(store, budget, [900, 900])
    assert isinstance(again, Held)
    settle(store, again, [1500, 1500])  # 600 more than reserved: the rate is 600 tokens in debt
    refused = ask(store, Budget("r", (RATE,)), [1])
    assert isinstance(refused, ErrorReply) and headers(refused)[b"x-ratelimit-remaining-tokens"] == b"0"
    clock.advance(36)  # 600 tokens of debt take 36 s to pay back: then the next token is due
    assert isinstance(ask(store, Budget("r", (RATE,)), [1]), ErrorReply)
    clock.advance(0.06)
    assert isinstance(ask(store, Budget("r", (RATE,)), [1]), Held)
    # The quota has 5000 - 100 - 1500 = 3400 left.
    assert isinstance(ask(store, Budget("r", (QUOTA,)), [3401]), ErrorReply)
    assert isinstance(ask(store, Budget("r", (QUOTA,)), [3400]), Held)


def test_refund_gives_everything_back(store: OverrideStore, clock: Clock) -> None:
    budget = Budget("r", (RATE, QUOTA))
    held = ask(store, budget, [1000, 5000])
    assert isinstance(held, Held)
    assert isinstance(ask(store, budget, [1, 1]), ErrorReply)
    refund(store, held)
    assert isinstance(ask(store, budget, [1000, 5000]), Held)


def test_a_settle_after_its_quota_window_ended_leaves_the_new_window_alone(store: OverrideStore, clock: Clock) -> None:
    budget = Budget("r", (QUOTA,))
    held = ask(store, budget, [3000])
    assert isinstance(held, Held)
    clock.advance(86400)
    settle(store, held, [5000])  # its window ended, and the reservation with it
    assert isinstance(ask(store, budget, [5000]), Held)


def test_concurrency_slots_are_taken_released_once_and_expire(store: OverrideStore, clock: Clock) -> None:
    budget = Budget("r", (), SLOTS)
    one = ask(store, budget, [], slot=("k1", "a"), lease=30)
    two = ask(store, budget, [], slot=("k1", "b"), lease=60)
    assert isinstance(one, Held) and isinstance(two, Held) and one.slot is not None
    full = ask(store, budget, [], slot=("k1", "c"))
    assert isinstance(full, ErrorReply) and full.status == 429 and full.retry
    assert (full.type, full.code) == ("requests", "rate_limit_exceeded") and headers(full)[b"retry-after"] == b"1"
    assert "2 in flight" in full.message
    assert isinstance(ask(store, budget, [], slot=("k2", "c")), Held)  # another subject
    release(store, one)
    release(store, one)  # idempotent: never frees another's slot
    assert isinstance(ask(store, budget, [], slot=("k1", "d")), Held)
    assert isinstance(ask(store, budget, [], slot=("k1", "e")), ErrorReply)
    clock.advance(60)  # b's and d's leases end (a request that never released, e.g. a bug)
    assert isinstance(ask(store, budget, [], slot=("k1", "f")), Held)
    assert events(store) == [("refused", "r", "concurrency")] * 2


def test_tokens_and_a_slot_are_one_step(store: OverrideStore, clock: Clock) -> None:
    budget = Budget("r", (RATE,), Concurrency("r", 1, ("api_key",)))
    held = ask(store, budget, [100], slot=("k1", "a"))
    assert isinstance(held, Held) and held.slot is not None and held.tokens
    refused = ask(store, budget, [100], slot=("k1", "b"))  # the slot refuses: the tokens are not taken
    assert isinstance(refused, ErrorReply) and refused.type == "requests"
    release(store, held)
    refund(store, held)
    assert isinstance(ask(store, budget, [1000], slot=("k1", "c")), Held)


def test_a_budget_with_nothing_to_ask_and_bad_arguments() -> None:
    store = OverrideStore({})
    held = ask(store, Budget("r"), [])
    assert held == Held("r")
    settle(store, held, [])
    refund(store, held)
    release(store, held)
    with pytest.raises(ValueError, match="1 token limits"):
        admit(store, Budget("r", (RATE,)), [], [], None, 1.0, "open", print)
    with pytest.raises(ValueError, match="a reservation of -1 tokens"):
        admit(store, Budget("r", (RATE,)), ["k"], [-1], None, 1.0, "open", print)
    with pytest.raises(ValueError, match="needs a slot"):
        admit(store, Budget("r", (), SLOTS), [], [], None, 1.0, "open", print)
    settle(store, Held("r", fallback=True), [10, 20])  # a fallback reserved nothing: its settle is a no-op
    refused = ask(store, Budget("r", (RATE,)), [10])
    assert isinstance(refused, Held)
    with pytest.raises(ValueError, match="1 reservations, 2 actual"):
        settle(store, refused, [1, 2])


def test_the_sweep_forgets_subjects_with_their_whole_budget(store: OverrideStore, clock: Clock) -> None:
    budgets = store.budgets
    assert isinstance(budgets, budgetmemory.MemoryBudgets)
    budget = Budget("r", (RATE, QUOTA), SLOTS)
    held = ask(store, budget, [10, 10], slot=("k1", "a"), lease=5)
    assert isinstance(held, Held)
    budgets.sweep()
    assert budgets._tats and budgets._used and budgets._slots
    clock.advance(82800)
    budgets.sweep()
    assert not budgets._tats and not budgets._used and not budgets._slots


def test_the_script_arguments_round_up_against_the_caller() -> None:
    odd = TokenLimit("r", 0, 7, 1.0, ("ip",))  # 142857.14... µs a token
    assert span(1, odd) == 142858 and span(7, odd) == 1_000_000
    assert tokens_in(142857, odd) == 0 and tokens_in(142858, odd) == 1
    keys, args = admit_args([], None)
    assert (keys, args) == ([], [b"0"])
    from gateway.shared.budgetlua import Reserved

    _, args = settle_args([(Reserved(odd, "k", 3), 0)])
    assert args == [b"r", b"-%d" % span(3, odd), b"0", b"0"]  # a refund gives back exactly what was taken
