"""The detector kernels agree with their plain reference and keep the detector contract.

Run once more with NUMBA_DISABLE_JIT=1 (test_the_same_tests_pass_without_the_jit) so that the
kernels' Python source is what runs and coverage sees it.
"""

import dataclasses
import io
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kota.contract import RELATIONS
from processing import kernels as k
from processing.detect import Detectors, PlainReading, deserialize, serialize
from processing.processor import apply_settings, new_detectors
from processing.settings import ProcessorSettings
from tests.reference_detectors import reference_relation_scores, reference_scores

# Properties of the detectors' behaviour over long streams (a million readings and more), not of
# the kernels' Python: the run with the JIT holds them, and the code they run is the code the
# other tests cover without it, where they would take three quarters of that run's minute.
behaviour_at_jit_speed = pytest.mark.skipif(
    os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="a long stream's behaviour, held by the run with the JIT"
)


def run_both(
    series, ts, values, ranges=None, batches=1, params=k.DEFAULT_PARAMS, codes=frozenset(), switched=frozenset()
):
    kinds = {**dict.fromkeys(codes, k.STATE_CODE), **dict.fromkeys(switched, k.SWITCHED)}
    detector = Detectors(params, kind_of=lambda key: kinds.get(key, k.MEASURED))
    detector.series_ids(range(int(max(series, default=-1)) + 1), ranges)
    scores, reasons = [], []
    for chunk in np.array_split(np.arange(len(series)), batches) if len(series) else [np.arange(0)]:
        s, r = detector.score(np.asarray(series)[chunk], np.asarray(ts)[chunk], np.asarray(values)[chunk])
        scores += list(s)
        reasons += list(r)
    reference = reference_scores(list(zip(series, ts, values, strict=True)), params, ranges or {}, {}, codes, switched)
    return np.array(scores), np.array(reasons), reference


def assert_agree(scores, reasons, reference):
    assert len(scores) == len(reference)
    np.testing.assert_allclose(scores, [r[0] for r in reference], rtol=1e-9, atol=1e-12)
    assert list(reasons) == [r[1] for r in reference]


def random_stream(seed, n=3000, n_series=7):
    rng = np.random.default_rng(seed)
    series = rng.integers(0, n_series, n)
    ts = np.cumsum(rng.integers(1, 120_000, n)).astype(float)
    values = rng.normal(20, 3, n) + 8 * np.sin(ts / 3_600_000 / 24 * 2 * np.pi)
    spikes = rng.random(n) < 0.01
    values[spikes] += rng.choice([-40, 40], spikes.sum())
    return series, ts, values


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("batches", [1, 13])
@pytest.mark.parametrize("params", [k.DEFAULT_PARAMS, k.ALL_DETECTORS_PARAMS], ids=["default", "all-on"])
def test_random_streams_agree_with_the_reference_in_any_batching(seed, batches, params):
    scores, reasons, reference = run_both(*random_stream(seed), batches=batches, params=params)
    assert_agree(scores, reasons, reference)
    assert k.REPEAT in set(reasons)  # the repeat path is exercised too
    if params is k.ALL_DETECTORS_PARAMS:
        # the rate and gap paths are exercised, not just agreed on
        assert {k.RATE_OF_CHANGE, k.DROPOUT} <= set(reasons)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("batches", [1, 13])
def test_random_switched_loads_agree_with_the_reference_in_any_batching(seed, batches):
    series, ts, values = random_stream(seed)
    off = np.random.default_rng(seed + 10).random(len(values)) < 0.3
    values = np.where(off, 0.0, np.abs(values))  # three in ten readings off, the rest on
    ranges = {s: (0.0, 1e6) for s in range(7)}
    scores, reasons, reference = run_both(
        series, ts, values, ranges=ranges, batches=batches, params=k.ALL_DETECTORS_PARAMS, switched={0, 1, 2, 3}
    )
    assert_agree(scores, reasons, reference)
    judged = np.isin(series, [0, 1, 2, 3])
    assert set(reasons[judged & off]) == {k.NONE} and (scores[judged & ~off] > 0).any()
    assert (scores[~judged & off] > 0).any()  # measured series: a zero among twenties is news


def daily_stream(seed, days=6, n_series=3):
    """Series with a strong daily cycle (low at night, high by day) every 5 minutes for `days` days,
    interleaved; series 0's day 5 stays at its night level from 10:00 to 13:00."""
    rng = np.random.default_rng(seed)
    steps = np.arange(days * 288)
    ts = np.repeat(steps * 300_000.0, n_series)
    series = np.tile(np.arange(n_series), len(steps))
    hour = ts / 3_600_000 % 24
    values = 20 + 60 * ((hour >= 8) & (hour < 20)) + rng.normal(0, 2, len(ts))
    flat_noon = (series == 0) & (ts >= (4 * 24 + 10) * 3_600_000) & (ts < (4 * 24 + 13) * 3_600_000)
    values[flat_noon] = 20 + rng.normal(0, 2, flat_noon.sum())
    return series, ts, values, flat_noon


WEEKENDS_PARAMS = k.DEFAULT_PARAMS.copy()
WEEKENDS_PARAMS[k.P_WEEKENDS] = 1.0
WEEKENDS_PARAMS[k.P_UTC_OFFSET_HOURS] = 7.0


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("batches", [1, 13])
@pytest.mark.parametrize("params", [k.DEFAULT_PARAMS, WEEKENDS_PARAMS], ids=["daily", "weekends"])
def test_daily_cycles_agree_with_the_reference_in_any_batching(seed, batches, params):
    series, ts, values, _ = daily_stream(seed, days=10)
    spikes = np.random.default_rng(seed).random(len(values)) < 0.005  # some on weekends, at rush hours
    values[spikes] += 25
    assert_agree(*run_both(series, ts, values, batches=batches, params=params))


def test_a_smooth_daily_curve_read_every_minute_is_not_news_at_each_hour_boundary():
    """The profile of an hour must stand for that hour over days, not for its last few minutes
    yesterday: the first minute of each hour on the steep part of a daily curve is usual."""
    rng = np.random.default_rng(9)
    ts = np.arange(5 * 1440) * 60_000.0
    values = 50 + 40 * np.sin(ts / 86_400_000 * 2 * np.pi) + rng.normal(0, 0.5, len(ts))
    scores, reasons, reference = run_both(np.zeros(len(ts), np.int64), ts, values)
    assert_agree(scores, reasons, reference)
    assert scores[ts >= 2 * 86_400_000].max() < 0.1  # learning per reading, some scored 0.3


def weekly_stream(seed, weeks=3):
    """A road's occupancy every 5 minutes from a Monday (UTC): rush hours on working days only."""
    rng = np.random.default_rng(seed)
    monday = 20_003 * 86_400_000.0  # (20,003 + 3) % 7 == 0
    ts = monday + np.arange(weeks * 7 * 288) * 300_000.0
    hour = ts / 3_600_000 % 24
    working_day = (ts // 86_400_000 + 3) % 7 < 5
    rush = ((hour >= 7) & (hour < 10)) | ((hour >= 16) & (hour < 19))
    values = 0.1 + 0.6 * (rush & working_day) + rng.normal(0, 0.02, len(ts))
    return np.zeros(len(ts), np.int64), ts, values, ~working_day & rush


def test_with_weekend_profiles_a_saturday_without_rush_hours_is_not_news():
    series, ts, values, weekend_rush = weekly_stream(5)
    weekends = WEEKENDS_PARAMS.copy()
    weekends[k.P_UTC_OFFSET_HOURS] = 0.0  # the stream's weekdays are UTC ones
    scores, _, reference = run_both(series, ts, values, params=weekends)
    assert_agree(scores, _, reference)
    first_day = ts < ts[0] + 86_400_000  # where the first rush hour ever is news
    assert scores[first_day].max() >= 0.3 and scores[~first_day].max() < 0.3
    # Judged against working days alone, every weekend's missing rush hours are dips.
    scores_without, reasons_without, _ = run_both(series, ts, values)
    assert scores_without[weekend_rush].max() >= 0.3
    assert set(reasons_without[weekend_rush & (scores_without >= 0.3)]) <= {k.DIP, k.REPEAT}


def test_a_daily_cycle_makes_a_usual_night_value_at_noon_a_dip():
    series, ts, values, flat_noon = daily_stream(4)
    scores, reasons, _ = run_both(series, ts, values)
    first = int(np.argmax(flat_noon))
    assert scores[first] >= 0.3 and reasons[first] == k.DIP
    # The same values at night, on the other series and on the other days, are usual.
    night = (ts / 3_600_000 % 24 < 7) & (ts >= 3 * 86_400_000)
    assert scores[night].max() < 0.3
    # Without the daily cycle the dip sits inside the series' overall range and goes unseen.
    flat = k.DEFAULT_PARAMS.copy()
    flat[k.P_DAILY_TIGHTNESS] = 0.0
    scores_without, _, _ = run_both(series, ts, values, params=flat)
    assert scores_without[flat_noon].max() < 0.3


def test_a_water_level_rising_fast_is_a_rate_of_change():
    levels = [80.0 + 0.5 * (i % 3) for i in range(200)] + [80.0 + 15.0 * i for i in range(1, 6)]
    scores, reasons, reference = run_both(
        [0] * 205, [i * 60_000.0 for i in range(205)], levels, params=k.ALL_DETECTORS_PARAMS
    )
    assert_agree(scores, reasons, reference)
    assert reasons[200] in (k.RATE_OF_CHANGE, k.SPIKE) and scores[200] > 0.3


def test_nan_scores_zero_and_teaches_nothing():
    series, ts, values = random_stream(4, n=500, n_series=2)
    with_nan = values.copy()
    with_nan[::17] = np.nan
    scores, reasons, reference = run_both(series, ts, with_nan)
    assert_agree(scores, reasons, reference)
    assert (scores[::17] == 0).all() and (reasons[::17] == k.NONE).all()


def test_nan_times_all_nan_batches_and_unknown_ids():
    series, ts, values = random_stream(6, n=400, n_series=3)
    bad_times = ts.copy()
    bad_times[5::11] = np.inf
    scores, reasons, reference = run_both(series, bad_times, values)
    assert_agree(scores, reasons, reference)
    assert (scores[5::11] == 0).all()

    detector = Detectors()
    detector.series_ids(range(3))
    scores, reasons = detector.score(np.array([0, 1, 2]), np.array([1.0, 2.0, 3.0]), np.full(3, np.nan))
    assert (scores == 0).all() and (reasons == k.NONE).all()
    assert (detector.state[:3, k.COUNT] == 0).all()  # taught nothing
    for ids in ([0, 3], [-1, 0]):
        with pytest.raises(ValueError, match="unknown series id"):
            detector.score(np.array(ids), np.array([1.0, 2.0]), np.array([1.0, 2.0]))


def test_constant_runs_are_stuck_only_for_series_that_usually_move():
    rng = np.random.default_rng(5)
    moving = list(rng.normal(10, 1, 100)) + [7.25] * 40
    flat = [3.0] * 140
    series = [0] * 140 + [1] * 140
    ts = [i * 60_000.0 for i in range(140)] * 2
    scores, reasons, reference = run_both(series, ts, moving + flat)
    assert_agree(scores, reasons, reference)
    assert k.STUCK in set(reasons[:140])
    assert set(reasons[140:]) == {k.NONE}  # a flat series that was always flat is not "stuck"


def test_a_run_resting_at_the_bottom_of_the_range_is_not_stuck():
    # A street light's power by day, a meter with no flow at night: zero is how "off" reads.
    rng = np.random.default_rng(8)
    moving = list(rng.normal(120, 2, 100))
    series = [0] * 160 + [1] * 160
    ts = [i * 60_000.0 for i in range(160)] * 2
    values = moving + [0.0] * 60 + moving + [117.5] * 60
    scores, reasons, reference = run_both(series, ts, values, ranges={0: (0.0, 10_000.0), 1: (0.0, 10_000.0)})
    assert_agree(scores, reasons, reference)
    assert k.STUCK not in set(reasons[:160])
    assert k.STUCK in set(reasons[160:])  # the same run above the floor is a stuck sensor


def test_a_state_code_is_judged_only_by_its_range():
    # A street light's powerState: off by day, on by night, one fault code out of range.
    day = [0.0] * 100 + [1.0] * 100 + [0.0] * 100
    values = day + [1.0, 0.0, 7.0]
    ts = [i * 60_000.0 for i in range(len(values))]
    series = [0] * len(values)
    scores, reasons, reference = run_both(series, ts, values, ranges={0: (0.0, 2.0)}, codes={0})
    assert_agree(scores, reasons, reference)
    assert set(reasons[:-1]) == {k.NONE} and reasons[-1] == k.OUT_OF_RANGE
    _, measured_reasons, _ = run_both(series, ts, values, ranges={0: (0.0, 2.0)})
    assert set(measured_reasons[:-1]) - {k.NONE}  # judged as a quantity, the switching looks anomalous


def street_light_days(seed, days=3):
    """A street light's power draw every minute: about 120 W from 18:00 to 06:00, 0 W by day
    (starting at midnight, on), with a 200 W spike on the second night."""
    rng = np.random.default_rng(seed)
    ts = np.arange(days * 1440) * 60_000.0
    hour = ts / 3_600_000 % 24
    on = (hour >= 18) | (hour < 6)
    values = np.where(on, 120 + rng.normal(0, 2, len(ts)), 0.0)
    spike = 1440 + 22 * 60
    values[spike] = 200.0
    return ts, values, on, spike


def test_a_switched_load_is_judged_only_while_on():
    ts, values, on, spike = street_light_days(4)
    series = np.zeros(len(ts), np.int64)
    ranges = {0: (0.0, 10_000.0)}
    scores, reasons, reference = run_both(series, ts, values, ranges=ranges, switched={0})
    assert_agree(scores, reasons, reference)
    found = set(np.flatnonzero(scores >= 0.3))
    assert found == {spike}  # dawn, dusk and the evenings after are usual; the spike is not
    assert set(reasons[~on]) == {k.NONE}
    # Judged as a quantity (as before), dawn and dusk on the first days look anomalous.
    measured_scores, _, _ = run_both(series, ts, values, ranges=ranges)
    assert len(set(np.flatnonzero(measured_scores >= 0.3)) - {spike}) >= 2


def test_a_switched_load_that_is_off_is_not_silent():
    ts, values, _, _ = street_light_days(5)
    params = k.DEFAULT_PARAMS.copy()
    params[k.P_GAP_FACTOR] = 5.0
    ranges = {0: (0.0, 10_000.0)}
    scores, reasons, reference = run_both(
        np.zeros(len(ts), np.int64), ts, values, ranges=ranges, params=params, switched={0}
    )
    assert_agree(scores, reasons, reference)
    assert k.DROPOUT not in set(reasons)  # twelve hours off is not twelve hours of silence
    detector = Detectors(kind_of=lambda key: k.SWITCHED)
    sid = detector.series_ids(["lamp"], {"lamp": (0.0, 10_000.0)})
    detector.score(np.repeat(sid, len(ts)), ts, values)
    assert detector.state[sid[0], k.LAST_TS] == ts[-1]  # the dropout timer sees it report


def test_how_a_series_is_judged_follows_the_catalogue_over_a_checkpoint():
    from processing.processor import catalogue_kind

    keys = [("lamp-1", "powerConsumption"), ("lamp-1", "powerState"), ("aq-1", "pm25"), ("x", "unknownMetric")]
    old = Detectors()
    old.series_ids(keys)  # as a checkpoint from before switched loads: everything measured
    restored = Detectors(kind_of=catalogue_kind)  # as the processor makes them (new_detectors)
    restored.restore(deserialize(*serialize(old.snapshot())))
    assert list(restored.measured[:4]) == [k.SWITCHED, k.STATE_CODE, k.MEASURED, k.MEASURED]


def test_a_reading_after_a_long_silence_in_event_time_is_a_dropout():
    params = k.DEFAULT_PARAMS.copy()
    params[k.P_GAP_FACTOR] = 5.0
    ts = [i * 60_000.0 for i in range(100)] + [(100 + 90) * 60_000.0]  # then 90 minutes of nothing
    values = [10.0 + (i % 4) for i in range(101)]
    scores, reasons, reference = run_both([0] * 101, ts, values, params=params)
    assert_agree(scores, reasons, reference)
    assert reasons[-1] == k.DROPOUT and scores[-1] > 0.5 and set(reasons[:-1]) == {k.NONE}
    assert run_both([0] * 101, ts, values)[1][-1] == k.NONE  # off in the kernels' defaults


def test_a_checkpoint_from_before_a_new_parameter_restores_with_its_default():
    detector = Detectors()
    detector.score(detector.series_ids(["a"]), np.array([0.0]), np.array([1.0]))
    series, blob = serialize(detector.snapshot())
    with np.load(io.BytesIO(zlib.decompress(blob))) as arrays:  # before checkpoints were deflated
        old = dict(arrays)
    old["params"] = old["params"][: k.P_GAP_FACTOR]  # as written before the gap detector existed
    old["state"] = old["state"][:, : k.ROUTINE]  # and before the routine-outlier rate
    old["hourly"] = old["hourly"][0]  # and before weekend profiles: (series, hours, 3)
    del old["measured"]
    buffer = io.BytesIO()
    np.savez(buffer, **old)
    restored = deserialize(series, buffer.getvalue())
    np.testing.assert_array_equal(restored.params, k.DEFAULT_PARAMS)
    assert list(restored.measured) == [1.0]
    assert restored.state.shape == (1, k.STATE_COLUMNS) and not restored.state[0, k.ROUTINE :].any()
    assert restored.hourly.shape == (k.DAY_KINDS, 1, k.HOURS, 3) and not restored.hourly[1].any()
    assert restored.hourly[0, 0, 0, 0] == 1.0
    Detectors().restore(restored)


def test_a_checkpoint_from_a_newer_version_restores_without_what_it_does_not_know():
    """A rollback: a checkpoint written by a version with a parameter and a state column more. They
    are only ever appended, so this version sets them aside and scores on exactly as the newer
    checkpoint's known part says (before, the restore raised on every start: a crash loop)."""
    series, ts, values = random_stream(11)
    detector = Detectors(LIKELIHOOD_SOON)
    detector.series_ids(range(7))
    detector.score(series[:2000], ts[:2000], values[:2000])
    names, blob = serialize(detector.snapshot())
    with np.load(io.BytesIO(zlib.decompress(blob))) as arrays:
        newer = dict(arrays)
    newer["params"] = np.concatenate([newer["params"], [42.0]])  # a parameter this version lacks
    newer["state"] = np.concatenate([newer["state"], np.full((len(newer["state"]), 1), 7.0)], axis=1)
    buffer = io.BytesIO()
    np.savez(buffer, **newer)
    restored, same = Detectors(), Detectors()
    restored.restore(deserialize(names, buffer.getvalue()))
    same.restore(deserialize(names, blob))
    rest = series[2000:], ts[2000:], values[2000:]
    np.testing.assert_array_equal(restored.score(*rest)[0], same.score(*rest)[0])


def test_single_element_series_and_empty_batch():
    assert_agree(*run_both([0], [0.0], [1.0]))
    assert_agree(*run_both([], [], []))


def test_out_of_declared_range_scores_one():
    scores, reasons, reference = run_both([0, 0, 0], [0.0, 1.0, 2.0], [5.0, 500.0, -1.0], ranges={0: (0.0, 100.0)})
    assert_agree(scores, reasons, reference)
    assert list(reasons) == [k.NONE, k.OUT_OF_RANGE, k.OUT_OF_RANGE] and list(scores[1:]) == [1.0, 1.0]


def test_scores_stay_in_unit_interval_and_zero_while_warming_up():
    series, ts, values = random_stream(6, n=4000, n_series=3)
    scores, _, _ = run_both(series, ts, values)
    assert ((scores >= 0) & (scores <= 1)).all()
    first_reads = {s: i for i, s in reversed(list(enumerate(series)))}
    warm = int(k.DEFAULT_PARAMS[k.P_WARMUP])
    for s in set(series):
        idx = np.flatnonzero(series == s)[:warm]
        assert (scores[idx] == 0).all(), first_reads[s]


# The likelihood with a learning period the short random streams get past (288 readings by default).
LIKELIHOOD_SOON = k.params_with(likelihood=1.0, routine_rate=0.0, likelihood_learning=50.0)
ENSEMBLE_SOON = k.params_with(likelihood=2.0, routine_rate=0.0, likelihood_learning=50.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("batches", [1, 13])
@pytest.mark.parametrize(
    "params",
    [k.LIKELIHOOD_PARAMS, LIKELIHOOD_SOON, k.ENSEMBLE_PARAMS, ENSEMBLE_SOON],
    ids=["likelihood", "learnt-soon", "ensemble", "ensemble-learnt-soon"],
)
def test_the_anomaly_likelihood_agrees_with_the_reference_in_any_batching(seed, batches, params):
    scores, reasons, reference = run_both(*random_stream(seed, n=6000), batches=batches, params=params)
    assert_agree(scores, reasons, reference)
    assert scores.max() >= 0.5 and {k.SPIKE, k.DIP} <= set(reasons)  # exercised, with the raw reasons


def test_the_anomaly_likelihood_makes_a_spike_mean_less_on_a_series_that_often_scores():
    """A series whose detectors score a spike every 15 readings: once the likelihood has learnt
    that (288 raw scores), those spikes are not news, though raw most would alert;
    a spike twice as big scores above them, and the same spike on a quiet series is an anomaly (Ahmad et al. 2017)."""
    rng = np.random.default_rng(3)
    n = 1500
    quiet = rng.normal(50, 1, n)
    busy = rng.normal(50, 1, n)
    routine = np.arange(40, n - 100, 15)
    busy[routine] += rng.choice([-9.0, 9.0], len(routine))
    quiet[-50] = busy[-50] = 70.0
    ts = np.arange(n) * 60_000.0
    (busy_scores, busy_reasons, reference) = run_both([0] * n, ts, busy, params=k.LIKELIHOOD_PARAMS)
    assert_agree(busy_scores, busy_reasons, reference)
    (quiet_scores, quiet_reasons, reference) = run_both([0] * n, ts, quiet, params=k.LIKELIHOOD_PARAMS)
    assert_agree(quiet_scores, quiet_reasons, reference)
    learnt = routine[routine > 30 + 288]
    raw_busy, _, _ = run_both([0] * n, ts, busy, params=k.params_with(routine_rate=0.0, quiet_points=0.0))
    assert (raw_busy[learnt] >= 0.3).sum() >= 20 and (busy_scores[learnt] >= 0.3).mean() < 0.05
    # The same spike on a quiet series is an anomaly at the processor's threshold.
    threshold = ProcessorSettings().anomaly_threshold
    assert busy_scores[learnt].max() < threshold <= quiet_scores[-50]
    assert quiet_reasons[-50] == k.SPIKE
    # Judged reading by reading (no quiet period), the bigger spike scores above the routine ones,
    # and the same spike on the quiet series more still.
    no_quiet = k.LIKELIHOOD_PARAMS.copy()
    no_quiet[k.P_QUIET_POINTS] = 0.0
    each_busy, _, _ = run_both([0] * n, ts, busy, params=no_quiet)
    each_quiet, _, _ = run_both([0] * n, ts, quiet, params=no_quiet)
    assert each_busy[learnt].max() < each_busy[-50] < each_quiet[-50]
    # On the busy series the routine spikes make one event that goes on; the bigger spike breaks its
    # quiet only if it scores `quiet_margin` above the spike that signalled it, which a spike twice as
    # big may or may not: either it stands out of the routine, or the raw detectors call it a spike
    # and it is a repeat, which holds the series' open alert (a sensor flapping harder is not back
    # to normal). It is never silently nothing.
    assert busy_scores[-50] > busy_scores[learnt].max() or busy_reasons[-50] == k.REPEAT
    assert busy_scores[-50] >= threshold or busy_reasons[-50] == k.REPEAT


@pytest.mark.parametrize(
    "params", [k.DEFAULT_PARAMS, LIKELIHOOD_SOON, ENSEMBLE_SOON], ids=["default", "likelihood", "ensemble"]
)
def test_snapshot_restored_gives_identical_scores(params):
    series, ts, values = random_stream(7)
    a = Detectors(params)
    a.series_ids(range(7))
    a.score(series[:1500], ts[:1500], values[:1500])
    b = Detectors()
    b.restore(deserialize(*serialize(a.snapshot())))
    np.testing.assert_array_equal(
        a.score(series[1500:], ts[1500:], values[1500:])[0], b.score(series[1500:], ts[1500:], values[1500:])[0]
    )
    assert a.state[:7, k.LL_VAR].any() == bool(params[k.P_LIKELIHOOD])  # its windows are in the state
    assert a.state[:7, k.LL_SHIFT_VAR].any() == (params[k.P_LIKELIHOOD] == 2.0)
    # It counts what it has judged itself: a series that ran without it starts it learning.
    judged = a.state[:7, k.COUNT] - k.DEFAULT_PARAMS[k.P_WARMUP] if params[k.P_LIKELIHOOD] else 0.0
    np.testing.assert_array_equal(a.state[:7, k.LL_COUNT], judged)


def test_state_rows_start_on_cache_lines_when_new_grown_and_restored():
    """The kernel prefetches a reading's state row as three cache lines: a row must not straddle four."""

    def aligned(d: Detectors) -> bool:
        return d.state.ctypes.data % 64 == 0 and d.hourly.ctypes.data % 64 == 0

    a = Detectors(initial_series=4)
    assert aligned(a)
    a.series_ids(range(100))  # grown past its first size
    assert aligned(a) and a.state.shape[0] >= 100
    b = Detectors()
    b.restore(a.snapshot())
    assert aligned(b)


@pytest.mark.parametrize("routine_rate", [0.0, float(k.DEFAULT_PARAMS[k.P_ROUTINE_RATE])], ids=["all", "routine"])
def test_a_labelled_stream_scores_its_anomalies_above_its_normal_points(routine_rate):
    rng = np.random.default_rng(8)
    n = 3000
    values = rng.normal(100, 5, n)
    # spaced wider than the quiet period: each is its own event
    anomalies = 500 + 120 * np.arange(20) + rng.integers(0, 20, 20)
    values[anomalies] += 60
    params = k.DEFAULT_PARAMS.copy()
    params[k.P_ROUTINE_RATE] = routine_rate
    scores, _, _ = run_both(np.zeros(n, dtype=int), np.arange(n) * 60_000.0, values, params=params)
    normal = np.setdiff1d(np.arange(500, n), anomalies)
    if routine_rate == 0:
        assert scores[anomalies].mean() > 0.5 > 10 * scores[normal].mean()
    else:
        # Twenty spikes two hours apart become routine: the first ones are anomalies (processor
        # threshold 0.3), later ones less so, yet every one still scores well above the normal points.
        assert scores[anomalies[0]] > 0.5 and scores[anomalies[1]] > 0.3
        assert scores[anomalies].min() > 10 * scores[normal].mean()


def test_silence_is_scored_on_a_timer():
    detector = Detectors()
    ids = detector.series_ids(["quiet", "chatty"])
    for step in range(60):
        detector.score(ids, np.array([step * 60_000.0] * 2), np.array([1.0 + step % 3, 2.0 + step % 2]))
    detector.score(ids[1:], np.array([61 * 60_000.0 * 4]), np.array([2.0]))  # only "chatty" speaks again
    silence = detector.silence(now_ms=61 * 60_000.0 * 4)
    assert silence[0] > 0.5 and silence[1] == 0.0


def test_the_same_tests_pass_without_the_jit():
    if os.environ.get("NUMBA_DISABLE_JIT") == "1":
        pytest.skip("already running without the JIT")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not without_the_jit"],
        env={**os.environ, "NUMBA_DISABLE_JIT": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_a_flapping_series_signals_once_per_event_not_per_reading():
    rng = np.random.default_rng(9)
    values = rng.normal(50, 1, 400)
    values[200:260:2] += 30  # flapping: every other reading for a while
    scores, reasons, reference = run_both(np.zeros(400, dtype=int), np.arange(400) * 60_000.0, values)
    assert_agree(scores, reasons, reference)
    quiet = int(k.DEFAULT_PARAMS[k.P_QUIET_POINTS])
    signalled = np.flatnonzero(scores[200:260] > k.DEFAULT_PARAMS[k.P_QUIET_LEVEL])
    assert 1 <= signalled.size <= 2, signalled  # the first, and at most one clear escalation
    assert quiet >= 60
    # A flap that would have been an anomaly, but is the same event, is a repeat: not stored, but it
    # keeps the processor's alert open. (Flapping this fast soon looks usual for the hour of day.)
    repeats = np.flatnonzero(reasons == k.REPEAT)
    assert repeats.size and set(repeats) <= set(range(202, 260, 2)), repeats
    assert (scores[repeats] < k.DEFAULT_PARAMS[k.P_REPEAT_BELOW]).all()


def test_a_train_of_spikes_is_one_event_until_it_has_stopped_for_a_quiet_period():
    # Spikes every 60 readings for 600 readings (each inside the quiet period the one before left),
    # then one 150 readings after the last: the train is one event, the lone spike a new one.
    rng = np.random.default_rng(11)
    n = 1400
    values = rng.normal(50, 1, n)
    train = list(range(400, 1000, 60))
    values[train] += 12
    values[1150] += 12
    params = k.params_with(routine_rate=0.0)  # every spike judged in full: only the quiet period decides
    scores, reasons, reference = run_both(np.zeros(n, dtype=int), np.arange(n) * 60_000.0, values, params=params)
    assert_agree(scores, reasons, reference)
    signalled = np.flatnonzero(scores > k.DEFAULT_PARAMS[k.P_QUIET_LEVEL])
    assert list(signalled) == [400, 1150], signalled
    assert set(np.flatnonzero(reasons == k.REPEAT)) == set(train[1:])


def test_a_serialized_checkpoint_restores_exactly_the_same_scores():
    rng = np.random.default_rng(7)
    keys = [("dev-a", "pm25"), ("dev-b", "currentLevel"), ("dev-a", "pm10")]
    picks = rng.integers(0, 3, 3000)
    ts = np.arange(3000, dtype=np.float64) * 60_000
    values = rng.normal(50, 5, 3000)
    values[2500] = 500.0
    original = Detectors(kind_of=lambda key: k.STATE_CODE if key == keys[2] else k.MEASURED)
    ids = original.series_ids([keys[i] for i in picks[:2000]], {keys[1]: (-500.0, 5000.0)})
    original.score(ids, ts[:2000], values[:2000])
    restored = Detectors()
    restored.restore(deserialize(*serialize(original.snapshot())))
    later = [keys[i] for i in picks[2000:]]
    expected = original.score(original.series_ids(later), ts[2000:], values[2000:])
    got = restored.score(restored.series_ids(later), ts[2000:], values[2000:])
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert expected[0].max() > 0.5  # the restored copy saw the spike too
    assert restored.keys() == original.keys()
    assert [restored.measured[restored.series_ids([key])[0]] for key in keys] == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("n", [0, 1, 7, 2000])
def test_minute_partials_equal_a_plain_grouping(n):
    rng = np.random.default_rng(n)
    series = rng.integers(0, 5, n).astype(np.int64)
    ts = np.sort(rng.uniform(0, 10 * 60_000, n)).round()
    ts[rng.random(n) < 0.1] -= 120_000  # some late arrivals, out of order
    values = rng.normal(10, 3, n)
    out_series, out_bucket, out_stats = np.empty(n, np.int64), np.empty(n), np.empty((n, k.AGG_COLUMNS))
    rows = k.minute_partials(series, ts, values, 60_000.0, out_series, out_bucket, out_stats)
    expected: dict[tuple[int, float], list[tuple[float, float]]] = {}
    for s, t, x in zip(series.tolist(), ts.tolist(), values.tolist(), strict=True):
        expected.setdefault((s, t // 60_000 * 60_000), []).append((t, x))
    assert rows == len(expected)
    for i in range(rows):
        points = expected[(int(out_series[i]), float(out_bucket[i]))]
        xs = [x for _, x in points]
        first = min(points, key=lambda p: p[0])
        last = max(reversed(points), key=lambda p: p[0])  # the last to arrive among equal times
        np.testing.assert_allclose(
            out_stats[i],
            [len(xs), sum(xs), sum(x * x for x in xs), min(xs), max(xs), first[0], first[1], last[0], last[1]],
        )


def test_silence_since_arrival_counts_from_the_wall_clock_not_event_time():
    detector = Detectors()
    ids = detector.series_ids(["replayed"])
    for step in range(60):  # a recording from long ago, arriving now
        detector.score(ids, np.array([step * 60_000.0]), np.array([1.0 + step % 3]))
    now_ms = 1_800_000_000_000.0
    detector.mark_arrivals(ids, now_ms)
    assert detector.silence(now_ms)[0] > 0.5  # by event time it looks silent for decades
    assert detector.silence(now_ms + 60_000.0, since_arrival=True)[0] == 0.0
    assert detector.silence(now_ms + 60 * 60_000.0, since_arrival=True)[0] > 0.5
    assert Detectors().silence(now_ms, since_arrival=True).shape == (0,)


def test_a_series_that_spikes_routinely_stops_alerting_on_every_spike_but_a_quiet_one_does_not():
    """Spikes every 150 readings (a load balancer's bursts) become routine; the same spike in a series
    that never spiked still scores in full; and the usual tails of plain noise are not "routine"."""
    rng = np.random.default_rng(5)
    n = 3000
    noise = rng.normal(10.0, 0.5, n)
    bursts = noise.copy()
    bursts[100::150] += 30.0
    rare = noise.copy()
    rare[2500] += 30.0
    series = [0] * n + [1] * n
    ts = [i * 60_000.0 for i in range(n)] * 2
    scores, reasons, reference = run_both(series, ts, list(bursts) + list(rare))
    assert_agree(scores, reasons, reference)
    burst_scores = scores[:n][100::150]
    assert burst_scores[0] > 0.5, "the first burst is news"
    assert burst_scores[-5:].max() < 0.3, "the twentieth is not an anomaly for the processor (threshold 0.3)"
    assert (reasons[:n][100::150][-5:] == k.REPEAT).all(), "but a repeat: not normal either"
    off = k.DEFAULT_PARAMS.copy()
    off[k.P_ROUTINE_RATE] = 0.0
    assert run_both(series[:n], ts[:n], list(bursts), params=off)[0][100::150][-5:].min() > 0.5  # the control
    rare_without = run_both(series[n:], ts[n:], list(rare), params=off)[0]
    np.testing.assert_array_equal(scores[n:], rare_without)  # noise alone never counts as routine
    assert scores[n + 2500] > 0.5


def test_the_processor_settings_choose_dropouts_and_routine_spikes_also_over_a_checkpoint():
    assert new_detectors(ProcessorSettings()).params[k.P_WEEKENDS] == 1.0  # a city follows the week
    settings = ProcessorSettings(
        anomaly_likelihood=False,
        dropout_factor=7.0,
        routine_spike_rate=0.004,
        anomaly_threshold=0.4,
        weekend_profiles=False,
        utc_offset_hours=8.0,
        daily_tightness=0.0,
    )
    detectors = new_detectors(settings)
    # Silences are found while they last (processor.py), not again at the reading that ends them.
    assert detectors.params[k.P_GAP_FACTOR] == 0.0 and detectors.params[k.P_ROUTINE_RATE] == 0.004
    assert detectors.params[k.P_WEEKENDS] == 0.0 and detectors.params[k.P_UTC_OFFSET_HOURS] == 8.0
    assert detectors.params[k.P_DAILY_TIGHTNESS] == 0.0
    assert detectors.params[k.P_REPEAT_BELOW] == 0.4  # a repeat is whatever the processor would not store
    saved = Detectors()  # a checkpoint saved under other settings (the kernels' defaults)
    saved.series_ids(["a"])
    restored = Detectors()
    restored.restore(deserialize(*serialize(saved.snapshot())))
    apply_settings(restored.params, settings)  # as Processor.seek_to_stored does
    np.testing.assert_array_equal(restored.params, detectors.params)
    # The anomaly likelihood, on by default: what bench.nab's likelihood row scores, with the
    # processor's own choices; over a checkpoint saved without it as well.
    calibrated = ProcessorSettings()
    np.testing.assert_array_equal(
        new_detectors(calibrated).params, apply_settings(k.LIKELIHOOD_PARAMS.copy(), calibrated)
    )
    apply_settings(restored.params, calibrated)
    np.testing.assert_array_equal(restored.params, new_detectors(calibrated).params)
    for name in k.LIKELIHOOD_SETS:
        assert new_detectors(calibrated).params[k.param_index(name)] == k.LIKELIHOOD_PARAMS[k.param_index(name)]
    assert new_detectors(calibrated).params[k.P_LIKELIHOOD] == 1.0
    assert new_detectors(ProcessorSettings(anomaly_likelihood=False)).params[k.P_LIKELIHOOD] == 0.0


def test_a_series_that_switches_level_has_not_spiked():
    """A street light: 0 W by day, 100 W by night. Its switching is a change of level, not a spike,
    so a real spike on the third night scores as it would with routine spikes off (counting every
    outlying reading of a switch, as a first version did, made it score 0.26 instead of 0.33: under
    the processor's threshold)."""
    rng = np.random.default_rng(6)
    minutes = np.arange(3 * 1440)
    night = (minutes % 1440 < 360) | (minutes % 1440 >= 1080)
    values = np.where(night, 100.0, 0.0) + rng.normal(0, 0.5, minutes.size)
    spike_at = 2 * 1440 + 1200
    values[spike_at] += 200.0
    ts = minutes * 60_000.0
    scores, reasons, reference = run_both([0] * minutes.size, ts, values)
    assert_agree(scores, reasons, reference)
    off = k.DEFAULT_PARAMS.copy()
    off[k.P_ROUTINE_RATE] = 0.0
    without = run_both([0] * minutes.size, ts, values, params=off)[0]
    assert scores[spike_at] == without[spike_at] > 0.3  # an anomaly for the processor


def partials_of(series, ts, values):
    """minute_partials as {(series, window start): row}."""
    n = len(series)
    out_series, out_bucket, out_stats = np.empty(n, np.int64), np.empty(n), np.empty((n, k.AGG_COLUMNS))
    rows = k.minute_partials(
        np.asarray(series, np.int64),
        np.asarray(ts, np.float64),
        np.asarray(values, np.float64),
        60_000.0,
        out_series,
        out_bucket,
        out_stats,
    )
    return {(int(out_series[i]), float(out_bucket[i])): out_stats[i].copy() for i in range(rows)}


readings_strategy = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 4 * 60_000), st.integers(-1000, 1000)), max_size=60
)


@settings(max_examples=200, deadline=None)
@given(readings=readings_strategy, cut=st.integers(0, 60))
def test_merging_the_partials_of_two_parts_equals_the_partials_of_the_union(readings, cut):
    """The one-minute partials are mergeable (as agg_1m's upsert merges them): a batch's readings
    split anywhere, each part aggregated, then merged, give the partials of the whole batch."""
    series, ts, values = ([r[i] for r in readings] for i in range(3))
    cut = min(cut, len(readings))
    first = partials_of(series[:cut], ts[:cut], values[:cut])
    second = partials_of(series[cut:], ts[cut:], values[cut:])
    union = partials_of(series, ts, values)
    assert union.keys() == first.keys() | second.keys()
    for key, expected in union.items():
        if key in first and key in second:
            merged = k.merge(first[key], second[key])
        else:
            merged = first.get(key, second.get(key))
        np.testing.assert_array_equal(merged, expected)  # integer values: the sums are exact too


def test_the_parameter_table_is_the_source_of_the_defaults_and_the_kernels_names():
    assert [p.name for p in k.PARAMETERS] == list(k.Params._fields)
    np.testing.assert_array_equal(k.DEFAULT_PARAMS, [p.default for p in k.PARAMETERS])
    assert all(p.meaning for p in k.PARAMETERS)
    assert k.Params(*k.DEFAULT_PARAMS).warmup == k.DEFAULT_PARAMS[k.P_WARMUP] == 30.0
    changed = k.params_with(w_rate=1.0, gap_factor=5.0)
    np.testing.assert_array_equal(changed, k.ALL_DETECTORS_PARAMS)
    with pytest.raises(ValueError, match="unknown"):
        k.params_with(no_such_parameter=1.0)


def test_score_readings_tells_how_the_batch_found_each_series():
    """`found`: a new series has no state yet (zeros); a known one its count, last time, usual
    interval and last value from before the batch, not after it."""
    from types import SimpleNamespace

    from processing.detect import FOUND_COLUMNS

    detectors = Detectors()
    first = [SimpleNamespace(device_id="d", metric="m", ts_ms=t * 60_000, value=1.0 + t) for t in range(3)]
    batch = detectors.score_readings(first, 0.0)
    assert not batch.found.any()
    later = [SimpleNamespace(device_id="d", metric="m", ts_ms=10 * 60_000, value=9.0)]
    batch = detectors.score_readings([*later, SimpleNamespace(device_id="e", metric="m", ts_ms=0, value=1.0)], 0.0)
    assert batch.found.shape == (2, len(FOUND_COLUMNS))
    np.testing.assert_array_equal(batch.found[0], [3.0, 2 * 60_000, 60_000, 3.0])
    np.testing.assert_array_equal(batch.found[1], [0.0, 0.0, 0.0, 0.0])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 5),
    seed=st.integers(0, 2**32 - 1),
    specials=st.lists(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e308, -1e-308, 5e-324]), max_size=8),
)
def test_any_snapshot_survives_a_checkpoint_bit_for_bit(n, seed, specials):
    """serialize then deserialize gives back every array bit for bit (the blob deflated), whatever the
    values: the exactness a restart relies on does not depend on what the state holds."""
    rng = np.random.default_rng(seed)
    detectors = Detectors()
    detectors.series_ids([(f"dev-{i}", "pm25") for i in range(n)])
    snapshot = detectors.snapshot()
    state = rng.normal(0, 1e6, snapshot.state.shape)
    hourly = rng.normal(0, 1e3, snapshot.hourly.shape).astype(snapshot.hourly.dtype)
    for i, special in enumerate(specials):
        if state.size:
            state.flat[(i * 7919) % state.size] = special
        if hourly.size:
            hourly.flat[(i * 104729) % hourly.size] = special
    written = dataclasses.replace(snapshot, state=state, hourly=hourly)
    restored = deserialize(*serialize(written))
    assert restored.ids == written.ids
    for name in ("state", "hourly", "low", "high", "params", "measured"):
        expected, got = getattr(written, name), getattr(restored, name)
        assert got.tobytes() == expected.tobytes(), name


@behaviour_at_jit_speed
def test_an_hour_profile_follows_a_small_shift_of_a_reading_a_second():
    """An hour's mean learns at `hour_alpha` per hour of readings: at a reading a second each step is
    3e-5 of the distance, which a float32 profile rounds away at a level of 1,000 (its mean stayed at
    1013.00). A pressure of 1,013 hPa that rises by 0.5 after twelve days moves its hour's usual."""
    rng = np.random.default_rng(5)
    seconds = 16 * 86_400
    ts = np.arange(seconds, dtype=np.float64) * 1_000.0
    values = 1013.0 + rng.normal(0, 0.3, seconds)
    values[12 * 86_400 :] += 0.5  # past the profile's first ten days, a running mean
    detectors = Detectors()
    ids = np.zeros(seconds, dtype=np.int64)
    detectors.series_ids(["pressure"])
    for start in range(0, seconds, 100_000):
        detectors.score(ids[start : start + 100_000], ts[start : start + 100_000], values[start : start + 100_000])
    means = detectors.hourly[0, 0, :, k.HOUR_MEAN]
    # Four days of each hour at the new level: 1 - exp(-0.4), a third of the way, 0.16 hPa.
    assert (means > 1013.1).all(), means


def random_paired_stream(seed, ticks=1500):
    """Three devices a minute apart in time order, each tick's metrics together (as one message):
    an air station (pm1, pm25, pm10), a noise meter (LAeq, LAmax) and a station that drifts; some
    metrics missing, some NaN, some spikes, so pairs form, break and are skipped."""
    rng = np.random.default_rng(seed)
    readings = []
    for tick in range(ticks):
        ts = 1_700_000_000_000 + tick * 60_000
        day = np.sin(tick / 1440 * 2 * np.pi)
        for device, drift in (("air-1", 0.0), ("air-2", 40.0 * max(0.0, tick - 900) / 360), ("noise-1", 0.0)):
            if device.startswith("air"):
                pm25 = 30 + 15 * day + rng.normal(0, 3)
                values = {
                    "pm1": 0.6 * pm25 + rng.normal(0, 1),
                    "pm25": pm25 + drift,
                    "pm10": 1.6 * pm25 + rng.normal(0, 3),
                }
            else:
                laeq = 60 + 10 * day + rng.normal(0, 1.5)
                values = {"LAeq": laeq, "LAmax": laeq + 12 + abs(rng.normal(0, 3))}
            for metric, value in values.items():
                roll = rng.random()
                if roll < 0.03:
                    continue  # missing: no pair this tick
                if roll < 0.04:
                    value = float("nan")
                elif roll < 0.05:
                    value += rng.choice([-30.0, 30.0])
                readings.append(PlainReading(device, metric, ts, float(value)))
    return readings


def reference_with_relations(readings, params, relations):
    """Each reading's own score (reference_scores), then each pair's (reference_relation_scores),
    merged as the detectors merge them: the higher score with its reason, a REPEAT where that is under
    `repeat_below` and either said REPEAT."""
    own = reference_scores([((r.device_id, r.metric), r.ts_ms, r.value) for r in readings], params, {}, {})
    merged = [list(x) for x in own]
    forms, pairs, primaries = {}, [], []
    by_time: dict = {}
    for i, r in enumerate(readings):
        if np.isfinite(r.value):
            by_time.setdefault((r.device_id, r.ts_ms), {})[r.metric] = i
    for (device, ts), metrics in by_time.items():
        for relation in relations:
            if relation.primary in metrics and relation.reference in metrics:
                key = (device, relation.series_name)
                forms[key] = relation.form
                i, j = metrics[relation.primary], metrics[relation.reference]
                pairs.append((key, ts, readings[i].value, readings[j].value))
                primaries.append(i)
    repeat_below = params[k.P_REPEAT_BELOW]
    for i, (score, reason) in zip(primaries, reference_relation_scores(pairs, params, forms, {}), strict=True):
        if reason == k.NONE:
            continue
        own = tuple(merged[i])
        best = [score, reason] if score > own[0] else list(own)
        if best[0] < repeat_below and k.REPEAT in (own[1], reason):
            best[1] = k.REPEAT
        merged[i] = best
    return [tuple(x) for x in merged]


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("batches", [1, 13])
@pytest.mark.parametrize("params", [k.DEFAULT_PARAMS, k.LIKELIHOOD_PARAMS], ids=["raw", "likelihood"])
def test_relations_between_metrics_agree_with_the_reference_in_any_batching(seed, batches, params):
    readings = random_paired_stream(seed)
    detector = Detectors(params, relations=RELATIONS)
    scores, reasons = [], []
    ticks = sorted({r.ts_ms for r in readings})
    for chunk in np.array_split(np.array(ticks), batches):  # a tick's readings stay in one batch, as one message's do
        batch = [r for r in readings if chunk[0] <= r.ts_ms <= chunk[-1]]
        _, s, r, _ = detector.score_readings(batch, now_ms=0)
        scores += list(s)
        reasons += list(r)
    reference = reference_with_relations(readings, params, RELATIONS)
    assert_agree(np.array(scores), np.array(reasons), reference)
    assert k.INCONSISTENT in set(reasons)  # the drifting station is judged, not just agreed on
    assert detector.knows(("noise-1", "LAeq~LAmax")) and detector.knows(("air-1", "pm1~pm25"))


def unit_streams(seed):
    """Three series a sensor could send: a noisy daily cycle with spikes, a load resting at 0 with
    bursts, and a constant value that steps once and sticks (stuck runs and the scale's floor)."""
    rng = np.random.default_rng(seed)
    n = 2400
    ts = np.arange(n) * 60_000.0
    cycle = rng.normal(20, 3, n) + 8 * np.sin(ts / 86_400_000 * 2 * np.pi)
    cycle[rng.random(n) < 0.01] += 40
    bursts = np.where(rng.random(n) < 0.03, rng.exponential(2.0, n), 0.0)
    steps = np.full(n, 7.25)
    steps[1500:] = 7.5
    series = np.repeat([0, 1, 2], n)
    return series, np.tile(ts, 3), np.concatenate([cycle, bursts, steps])


THRESHOLD = ProcessorSettings().anomaly_threshold


@behaviour_at_jit_speed
@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(1e-6, 1e6).flatmap(lambda a: st.sampled_from([a, -a])),
    offset=st.floats(-1e5, 1e5),
    seed=st.integers(0, 3),
)
def test_a_series_units_change_no_anomaly(scale, offset, seed):
    """A reading's units are the sensor's business: the same series in other units (times `scale`),
    or from another zero (plus `offset` of its own units: kelvin and degrees, gauge and absolute
    pressure), raises the same anomalies. A floor of 0.1% of the mean on the robust scale broke
    this: 10,000 added to every NAB value took `bench.nab` from 69.0 to 56.8 (docs/processing.md,
    "A series' units")."""
    series, ts, values = unit_streams(seed)
    for params in (k.LIKELIHOOD_PARAMS, k.DEFAULT_PARAMS, k.ENSEMBLE_PARAMS):
        scores, reasons = unit_scores(params, series, ts, values)
        scaled_scores, scaled_reasons = unit_scores(params, series, ts, scale * values)
        moved_scores, moved_reasons = unit_scores(params, series, ts, values + offset)
        if scale < 0:  # a series upside down: its spikes are dips and its dips spikes
            swap = {k.SPIKE: k.DIP, k.DIP: k.SPIKE}
            scaled_reasons = np.array([swap.get(int(r), int(r)) for r in scaled_reasons])
        # In other units every score is the same, to float rounding (which a series resting at one
        # value for long makes its spread).
        np.testing.assert_allclose(scaled_scores, scores, atol=1e-6)
        np.testing.assert_array_equal(scaled_reasons, reasons)
        # From another zero, the same readings are anomalies, at the same scores, for the same
        # reasons. Scores under the threshold may differ a little where a series has rested so long
        # that its spread is down to its scale's floor, a trillionth of its level (`_scale_floor`).
        anomalies = np.flatnonzero(scores >= THRESHOLD)
        assert len(anomalies) >= 3  # something to agree on
        np.testing.assert_array_equal(np.flatnonzero(moved_scores >= THRESHOLD), anomalies)
        np.testing.assert_allclose(moved_scores[anomalies], scores[anomalies], atol=1e-3)
        np.testing.assert_array_equal(moved_reasons[anomalies], reasons[anomalies])


def unit_scores(params, series, ts, values):
    detector = Detectors(params)
    detector.series_ids(range(3))
    return detector.score(series, ts, values)[:2]


@pytest.mark.parametrize(
    "params", [k.DEFAULT_PARAMS, k.LIKELIHOOD_PARAMS, LIKELIHOOD_SOON], ids=["raw", "likelihood", "learnt-soon"]
)
def test_no_level_shift_is_reported_before_the_slow_mean_has_a_level(params):
    """The slow mean spans 1/slow_alpha readings (100) and its spread grows from 0 until then, so a
    series a few readings past its warm-up met a level shift in a spread a quarter of its own (a
    corridor's speed, 32 minutes into a simulated week). A level shift is reported only once the
    slow mean has a level (under the likelihood, learnt from all the same); a slow rise later is
    one."""
    rng = np.random.default_rng(5)
    n = 400
    values = rng.normal(50.0, 2.0, n)
    values[45:] += 4.0  # two spreads, early: without the rule, level shifts from reading 50
    values[200:350] += np.linspace(0.0, 15.0, 150)  # a slow rise once the slow mean has a level
    values[350:] += 15.0
    ts = np.arange(n) * 300_000.0  # Numenta's 5-minute records: the likelihood has learnt by the rise
    scores, reasons, reference = run_both([0] * n, ts, values, params=params)
    assert_agree(scores, reasons, reference)
    slow_span = int(1 / k.Params(*params).slow_alpha)
    assert k.LEVEL_SHIFT not in set(reasons[:slow_span])
    if params is k.LIKELIHOOD_PARAMS:  # the processor's detectors call the rise a level shift
        assert k.LEVEL_SHIFT in set(reasons[200:])


# Without the JIT the kernels' arithmetic is on NumPy scalars, which warn as the distance overflows
# to inf; compiled, it overflows silently: the same IEEE inf either way, which `_score` handles.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize(
    "params", [k.DEFAULT_PARAMS, k.LIKELIHOOD_PARAMS, k.ENSEMBLE_PARAMS], ids=["raw", "likelihood", "ensemble"]
)
@pytest.mark.parametrize("value", [1e300, -1e308, 1e12])
def test_a_reading_past_any_distance_a_double_holds_is_an_anomaly(params, value):
    """After a series resting at exactly 0 (its spread the scale's floor, 1e-30), a reading of 1e300
    is a distance past a double's range: it scored NaN, which compares false with everything, so
    the wildest reading a sensor can send scored 0."""
    n = 400
    values = np.zeros(n)
    values[350] = value
    scores, reasons, reference = run_both([0] * n, np.arange(n) * 60_000.0, values, params=params)
    assert_agree(scores, reasons, reference)
    assert not np.isnan(scores).any()
    assert scores[350] >= ProcessorSettings().anomaly_threshold
    assert reasons[350] == (k.SPIKE if value > 0 else k.DIP)


@pytest.mark.parametrize(
    ("interval_ms", "learnt"), [(1_000.0, False), (60_000.0, False), (300_000.0, True), (3_600_000.0, True)]
)
def test_the_likelihood_counts_numentas_windows_in_time_for_series_faster_than_five_minutes(interval_ms, learnt):
    """Numenta's windows (10, 8,640 and 288 records) are 50 minutes, 30 days and a day of NAB's
    5-minute records. A series reporting faster keeps them in time: at one reading a minute (or a
    second) the likelihood is still learning at reading 1,000, and a spike is judged raw; at 5
    minutes, or slower, the windows stay Numenta's counts, it has learnt, and the same spike is
    measured against the series' usual surprise (here, the likelihood alone: nothing judged raw)."""
    params = k.LIKELIHOOD_PARAMS.copy()
    params[k.param_index("raw_points")] = 0.0
    rng = np.random.default_rng(1)
    n = 1200
    values = rng.normal(50.0, 1.0, n)
    values[1000] = 56.0
    scores, reasons, reference = run_both([0] * n, np.arange(n) * interval_ms, values, params=params)
    assert_agree(scores, reasons, reference)
    threshold = ProcessorSettings().anomaly_threshold
    if learnt:
        assert scores[1000] < threshold and reasons[1000] == k.REPEAT
    else:
        assert scores[1000] >= threshold and reasons[1000] == k.SPIKE
    counted = k.params_with(likelihood=1.0, routine_rate=0.0, z_floor=0.0, w_rate=1.0, raw_points=0.0)
    counted[k.param_index("likelihood_interval_ms")] = 0.0  # counted in readings, as before
    assert run_both([0] * n, np.arange(n) * interval_ms, values, params=counted)[1][1000] == k.REPEAT
