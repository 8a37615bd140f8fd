"""Series silent past `evict_after_days` (event time) leave the detectors' state and checkpoints;
the rest keep their state exactly, and a restored checkpoint equals the evicting detectors."""

import numpy as np

from processing import kernels as k
from processing.detect import Detectors, deserialize, serialize
from processing.processor import PartitionState
from processing.settings import ProcessorSettings

DAY = float(k.DAY_MS)
STEP = 600_000.0  # a reading every 10 minutes
KEYS = [("dev-a", "pm25"), ("dev-b", "pm25"), ("dev-c", "noise"), ("dev-d", "pm10")]


def stream(keys, start_ms, days, seed):
    """Every key read every 10 minutes for `days`, a daily cycle with noise and a few spikes."""
    rng = np.random.default_rng(seed)
    times = start_ms + np.arange(0, days * DAY, STEP)
    picks = [key for _ in times for key in keys]
    ts = np.repeat(times, len(keys))
    values = 50 + 10 * np.sin(ts / DAY * 2 * np.pi) + rng.normal(0, 2, ts.size)
    values[rng.random(ts.size) < 0.005] += 60
    return picks, ts, values


def feed(detectors, picks, ts, values, batch=997):
    scores, reasons = [], []
    for start in range(0, len(ts), batch):
        part = slice(start, start + batch)
        s, r = detectors.score(detectors.series_ids(picks[part]), ts[part], values[part])
        scores.append(s)
        reasons.append(r)
    return np.concatenate(scores), np.concatenate(reasons)


def assert_same_state(a: Detectors, b: Detectors) -> None:
    sa, sb = a.snapshot(), b.snapshot()
    assert sa.ids == sb.ids
    for name in ("state", "hourly", "low", "high", "params", "measured"):
        np.testing.assert_array_equal(getattr(sa, name), getattr(sb, name))


def setup():
    """Four series for 10 days; then dev-a goes silent and the others report for 35 days more."""
    d = Detectors(kind_of=lambda key: k.MEASURED, range_of=lambda key: (-100.0, 1000.0))
    feed(d, *stream(KEYS, 0.0, 10, seed=1))
    feed(d, *stream(KEYS[1:], 10 * DAY, 35, seed=2))
    return d


def test_a_series_silent_past_the_bound_is_gone_from_state_and_checkpoint_and_the_rest_are_kept():
    d = setup()
    before = d.snapshot()
    now_ms = 45 * DAY
    new_id = d.evict_silent(now_ms, 30 * DAY)
    assert new_id.tolist() == [-1, 0, 1, 2]
    assert d.keys() == KEYS[1:] and not d.knows(KEYS[0]) and d.n_series == 3
    series, blob = serialize(d.snapshot())
    assert series == [list(key) for key in KEYS[1:]]
    _, blob_before = serialize(before)
    assert len(blob) < len(blob_before)
    # The series kept have exactly the rows they had, renumbered.
    after = d.snapshot()
    np.testing.assert_array_equal(after.state, before.state[1:])
    np.testing.assert_array_equal(after.hourly, before.hourly[:, 1:])
    # Nothing silent for less than the bound goes: dev-a was last seen 35 days before the newest reading.
    assert (d.evict_silent(now_ms, 36 * DAY) >= 0).all()


def test_the_series_kept_score_as_if_nothing_had_been_evicted():
    evicting, keeping = setup(), setup()
    evicting.evict_silent(45 * DAY, 30 * DAY)
    later = stream(KEYS[1:], 45 * DAY, 3, seed=3)
    np.testing.assert_array_equal(feed(evicting, *later)[0], feed(keeping, *later)[0])


def test_an_evicted_series_that_comes_back_starts_fresh_as_a_new_one():
    d = setup()
    d.evict_silent(45 * DAY, 30 * DAY)
    back = stream(KEYS[:1], 45 * DAY, 3, seed=4)
    fresh = Detectors(kind_of=lambda key: k.MEASURED, range_of=lambda key: (-100.0, 1000.0))
    got, expected = feed(d, *back), feed(fresh, *back)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert (got[0][: int(k.DEFAULT_PARAMS[k.P_WARMUP])] == 0).all()  # warming up again
    sid = d.series_ids([KEYS[0]])[0]
    assert sid == 3  # a new id after the kept ones
    np.testing.assert_array_equal(d.state[sid], fresh.state[0])
    np.testing.assert_array_equal(d.hourly[:, sid], fresh.hourly[:, 0])


def test_restore_after_eviction_is_exact():
    d = setup()
    d.evict_silent(45 * DAY, 30 * DAY)
    restored = Detectors(kind_of=lambda key: k.MEASURED, range_of=lambda key: (-100.0, 1000.0))
    restored.restore(deserialize(*serialize(d.snapshot())))
    assert_same_state(restored, d)
    later = stream(KEYS, 45 * DAY, 3, seed=5)  # dev-a comes back too: new in both
    a, b = feed(d, *later), feed(restored, *later)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert_same_state(restored, d)


def test_a_device_clock_years_ahead_does_not_make_every_other_series_silent():
    d = setup()
    ahead = d.series_ids([("dev-future", "pm25")])
    d.score(ahead, np.array([7_000_000_000_000.0]), np.array([50.0]))  # year 2191
    new_id = d.evict_silent(45 * DAY, 30 * DAY)  # the wall clock bounds the newest event time
    assert new_id.tolist() == [-1, 0, 1, 2, 3]


def test_most_series_evicted_gives_memory_back():
    d = Detectors(initial_series=4)
    ids = d.series_ids([f"s{i}" for i in range(5000)])
    d.score(ids, np.where(ids < 10, 100 * DAY, 0.0) + 1.0, np.ones(ids.size))
    d.evict(50 * DAY)
    assert d.n_series == 10 and d.state.shape[0] == 1024 and d.state.ctypes.data % 64 == 0


def test_the_processor_evicts_at_most_every_check_interval_and_keeps_its_dropout_set_in_step():
    settings = ProcessorSettings(evict_after_days=30, evict_check_s=300)
    partition = PartitionState(setup(), detected_until=None)
    partition.silent = {0, 2}  # dev-a and dev-c signalled as dropped out
    partition.path_of = {f"dev-{x}": (f"dev-{x}", "") for x in "abcd"}
    assert partition.evict_if_due(45 * DAY, settings) == 1
    assert partition.silent == {1}  # dev-c, renumbered; dev-a gone
    assert sorted(partition.path_of) == ["dev-b", "dev-c", "dev-d"]  # the way dev-a came is forgotten
    again = PartitionState(setup(), detected_until=None, next_eviction=partition.next_eviction)
    assert again.evict_if_due(45 * DAY, settings) == 0  # not due yet
    off = PartitionState(setup(), detected_until=None)
    assert off.evict_if_due(45 * DAY, ProcessorSettings(evict_after_days=0)) == 0
    assert off.detectors.n_series == 4
