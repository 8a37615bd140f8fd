"""The gateway's token buckets (ingest/ratelimit.py): for each account, what passes in messages,
bytes and readings in any stretch of time is bounded by the burst plus the rate; a refusal spends
nothing from the bucket that refused; a full budget always takes one largest message."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ingest.ratelimit import AccountBudgets, RateLimit
from ingest.settings import GatewaySettings


def _budgets(**overrides) -> AccountBudgets:
    shape = dict(
        bytes_per_message=16_384,
        readings_per_message=10,
        volume_burst_s=600,
        largest_payload=262_144,
        most_readings=10_000,
    )
    return AccountBudgets(**(shape | overrides))


messages = st.lists(
    st.tuples(
        st.floats(0, 3, allow_nan=False),  # seconds since the last message
        st.integers(1, 262_144),  # its bytes
        st.integers(0, 10_000),  # its readings, once parsed
    ),
    min_size=1,
    max_size=150,
)


@settings(max_examples=200, deadline=None)
@given(
    per_s=st.floats(0.05, 50, allow_nan=False),
    burst_s=st.floats(0, 120, allow_nan=False),
    sent=messages,
    data=st.data(),
)
def test_in_any_stretch_messages_bytes_and_readings_stay_within_burst_plus_rate(per_s, burst_s, sent, data):
    budgets = _budgets()
    limit = RateLimit.of(per_s, burst_s)
    now, spent = 1000.0, []  # (time, messages, bytes, readings) each bucket granted
    for gap, size, readings in sent:
        now += gap
        over = budgets.admit("sender", limit, size, now)
        if over == "messages":
            continue
        taken = (1, 0, 0) if over == "bytes" else (1, size, 0)
        if over is None and budgets.admit_readings("sender", limit, readings, now):
            taken = (1, size, readings)
        spent.append((now, *taken))
    if not spent:
        return
    first = data.draw(st.integers(0, len(spent) - 1))
    last = data.draw(st.integers(first, len(spent) - 1))
    elapsed = spent[last][0] - spent[first][0]
    for column, unit in enumerate(("messages", "bytes", "readings"), start=1):
        amount = sum(row[column] for row in spent[first : last + 1])
        budget = budgets.budget(unit, limit)
        assert amount <= budget.burst + budget.per_s * elapsed + 1e-6 * amount, unit


def test_a_refusal_spends_nothing_from_the_bucket_that_refused():
    budgets = _budgets(bytes_per_message=1_000, volume_burst_s=60, largest_payload=5_000, most_readings=100)
    limit = RateLimit.of(1, 60)  # 60 messages; 60,000 bytes; 600 readings
    assert budgets.budget("bytes", limit) == RateLimit(1_000, 60_000)
    assert budgets.budget("readings", limit) == RateLimit(10, 600)
    assert budgets.admit("sender", limit, 55_000, 0.0) is None
    assert budgets.admit("sender", limit, 5_001, 0.0) == "bytes"
    assert budgets.admit("sender", limit, 5_000, 0.0) is None  # the refused 5,001 took nothing
    assert budgets.admit("sender", limit, 1, 0.0) == "bytes"
    assert budgets.admit("other", limit, 5_000, 0.0) is None  # another account's budget is its own
    assert not budgets.admit_readings("sender", limit, 601, 0.0)
    assert budgets.admit_readings("sender", limit, 600, 0.0)  # the refused 601 took nothing
    assert not budgets.admit_readings("sender", limit, 1, 0.0)
    assert budgets.admit_readings("sender", limit, 0, 0.0)  # a message of no readings costs none
    assert budgets.admit_readings("sender", limit, 10, 1.0)  # a second later, ten more


def test_messages_over_the_rate_are_refused_before_their_bytes_are_counted():
    budgets = _budgets()
    limit = RateLimit.of(1, 2)  # 2 messages, then one a second
    assert [budgets.admit("sender", limit, 10, 0.0) for _ in range(3)] == [None, None, "messages"]
    assert budgets.admit("sender", limit, 10, 1.0) is None


@given(
    per_s=st.floats(0.01, 2000, allow_nan=False),
    burst_s=st.floats(0, 600, allow_nan=False),
    per_message=st.floats(0.1, 100, allow_nan=False),
    volume_burst_s=st.floats(0, 7200, allow_nan=False),
)
def test_a_full_budget_takes_one_largest_message(per_s, burst_s, per_message, volume_burst_s):
    budgets = _budgets(
        bytes_per_message=per_message * 1000, readings_per_message=per_message, volume_burst_s=volume_burst_s
    )
    limit = RateLimit.of(per_s, burst_s)
    assert budgets.budget("readings", limit).per_s == per_s * per_message
    assert budgets.admit("sender", limit, 262_144, 0.0) is None
    assert budgets.admit_readings("sender", limit, 10_000, 0.0)


def test_no_message_limit_means_no_budget_and_zero_per_message_turns_one_off():
    budgets = _budgets()
    unlimited = RateLimit.of(0, 60)
    assert all(budgets.admit("sender", unlimited, 262_144, 0.0) is None for _ in range(1000))
    assert all(budgets.admit_readings("sender", unlimited, 10_000, 0.0) for _ in range(1000))
    assert len(budgets) == 0  # nothing is kept for an unlimited account
    off = _budgets(bytes_per_message=0, readings_per_message=0)
    limit = RateLimit.of(1000, 60)
    assert all(off.admit("sender", limit, 262_144, 0.0) is None for _ in range(1000))
    assert all(off.admit_readings("sender", limit, 10_000, 0.0) for _ in range(1000))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_a_rate_that_is_not_a_finite_number_is_refused(bad):
    # nan passes every comparison a bucket makes: it would turn the limit off unseen.
    with pytest.raises(ValueError):
        RateLimit.of(bad, 60)
    with pytest.raises(ValueError):
        RateLimit.of(20, bad)
    with pytest.raises(ValidationError):
        GatewaySettings(readings_per_message=bad)


def test_accounts_are_separate_and_memory_is_bounded():
    budgets = _budgets(max_senders=100)
    limit = RateLimit.of(1, 1)  # one message, then one a second
    assert budgets.admit("a", limit, 10, 0.0) is None and budgets.admit("a", limit, 10, 0.0) == "messages"
    assert budgets.admit("b", limit, 10, 0.0) is None  # a's flood does not spend b's tokens
    for i in range(1000):
        budgets.admit(f"s{i}", limit, 10, 1.0 + i)
    assert len(budgets) <= 100


def test_a_payload_over_the_largest_is_left_to_the_parser_to_call_oversized():
    budgets = _budgets()
    slow = RateLimit.of(0.001, 60)  # its bytes burst is the least: one largest payload, 262,144
    assert budgets.budget("bytes", slow).burst == 262_144
    assert budgets.admit("sender", slow, 262_145, 0.0) is None  # on to the parser: `oversized`


def test_only_accounts_whose_buckets_are_full_again_are_forgotten_first():
    budgets = _budgets(max_senders=3, volume_burst_s=60)
    slow = RateLimit.of(0.01, 60)  # its readings bucket (at least 10,000) refills in 100,000 s
    fast = RateLimit.of(10, 60)  # every bucket refills in 60 s
    assert budgets.admit_readings("slow", slow, 10_000, 0.0)  # emptied
    budgets.admit("fast", fast, 10, 0.0)
    budgets.admit("other", fast, 10, 0.0)
    budgets.admit("new", fast, 10, 1_000.0)  # full: the quiet fast accounts go, the slow one stays
    assert not budgets.admit_readings("slow", slow, 10_000, 1_000.0)  # still nearly empty
