"""The gateway's token buckets (ingest/ratelimit.py): what they let through in any stretch of time
is bounded by the burst plus the rate, a refusal costs nothing, and a full readings bucket always
takes one full message."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ingest.ratelimit import RateLimit, SenderBuckets

requests = st.lists(
    st.tuples(st.floats(0, 5, allow_nan=False), st.integers(1, 400)),  # (seconds since the last, cost)
    min_size=1,
    max_size=200,
)


@given(
    per_s=st.floats(0.1, 500, allow_nan=False),
    burst_s=st.floats(0, 120, allow_nan=False),
    steps=requests,
    window=st.data(),
)
def test_what_passes_in_any_stretch_is_at_most_the_burst_plus_the_rate(per_s, burst_s, steps, window):
    limit = RateLimit.of(per_s, burst_s)
    buckets = SenderBuckets()
    now, passed = 1000.0, []
    for gap, cost in steps:
        now += gap
        if buckets.allow("sender", limit, now, cost=cost):
            passed.append((now, cost))
    if not passed:
        return
    first = window.draw(st.integers(0, len(passed) - 1))
    last = window.draw(st.integers(first, len(passed) - 1))
    spent = sum(cost for _, cost in passed[first : last + 1])
    elapsed = passed[last][0] - passed[first][0]
    assert spent <= limit.burst + limit.per_s * elapsed + 1e-6 * spent


@given(per_s=st.floats(0.1, 100, allow_nan=False), cost=st.integers(1, 10_000))
def test_a_refusal_spends_nothing(per_s, cost):
    limit = RateLimit.of(per_s, 60)
    buckets = SenderBuckets()
    too_much = int(limit.burst) + 1
    assert not buckets.allow("sender", limit, 0.0, cost=too_much)
    # Everything the refused request would have spent is still there.
    assert buckets.allow("sender", limit, 0.0, cost=int(limit.burst))


@given(
    per_s=st.floats(0.01, 2000, allow_nan=False),
    burst_s=st.floats(0, 600, allow_nan=False),
    readings_per_message=st.floats(0.1, 100, allow_nan=False),
)
def test_a_full_readings_bucket_takes_one_full_message(per_s, burst_s, readings_per_message):
    readings = RateLimit.of(per_s, burst_s).in_readings(readings_per_message, least_burst=10_000)
    assert readings.per_s == per_s * readings_per_message
    assert SenderBuckets().allow("sender", readings, 0.0, cost=10_000)


def test_no_message_limit_means_no_readings_limit():
    unlimited = RateLimit.of(0, 60).in_readings(10, least_burst=10_000)
    buckets = SenderBuckets()
    assert all(buckets.allow("sender", unlimited, 0.0, cost=10_000) for _ in range(1000))
    assert len(buckets) == 0  # nothing is kept for an unlimited account
    off = RateLimit.of(20, 60).in_readings(0, least_burst=10_000)
    assert all(buckets.allow("sender", off, 0.0, cost=10_000) for _ in range(1000))


def test_senders_are_separate_and_memory_is_bounded():
    limit = RateLimit.of(1, 1)  # one message, then one a second
    buckets = SenderBuckets(max_senders=100)
    assert buckets.allow("a", limit, 0.0) and not buckets.allow("a", limit, 0.0)
    assert buckets.allow("b", limit, 0.0)  # a's flood does not spend b's tokens
    for i in range(1000):
        buckets.allow(f"s{i}", limit, 1.0 + i)
    assert len(buckets) <= 100
