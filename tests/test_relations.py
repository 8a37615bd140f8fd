"""Relations between a device's metrics (kota.contract.RELATIONS, kernels.relation_batch): a sensor
drifting away from its partner is found as the drift builds; air or noise that changes for both
sensors is not; pairs form only within one device and one time; relation series are kept, restored
and evicted with the device's metrics and are never silent themselves."""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kota.contract import METRICS, RELATIONS, Relation
from processing import kernels as k
from processing.detect import Detectors, deserialize, serialize
from processing.detect import PlainReading as R
from processing.processor import new_detectors
from processing.rules import detector_signal
from processing.settings import ProcessorSettings
from tests.reference_detectors import reference_pairs, reference_relation_scores

MINUTE = 60_000
START = 1_764_000_000_000


def station(minutes, rng, pm25_extra=lambda t: 0.0, both_extra=lambda t: 0.0, device="air-1"):
    """An air station a reading a minute: PM2.5 with a daily cycle and sensor noise, PM10 1.6 times
    the same air with its own noise; `pm25_extra` bends the PM2.5 sensor alone, `both_extra` the air."""
    for t in range(minutes):
        air = 30 + 15 * np.sin(t / 1440 * 2 * np.pi) + both_extra(t)
        pm25 = air + rng.normal(0, 3)
        yield [
            R(device, "pm25", START + t * MINUTE, pm25 + pm25_extra(t)),
            R(device, "pm10", START + t * MINUTE, 1.6 * pm25 + rng.normal(0, 3)),
        ]


def run(ticks, detectors=None, batch_ticks=5):
    """Feed ticks in batches; return (minute, metric, reason) of every signal and the detectors."""
    detectors = detectors or new_detectors(ProcessorSettings())
    signals, pending = [], []
    threshold = ProcessorSettings().anomaly_threshold
    for tick in ticks:
        pending += tick
        if len({r.ts_ms for r in pending}) >= batch_ticks:
            signals += _flush(detectors, pending, threshold)
    if pending:
        signals += _flush(detectors, pending, threshold)
    return signals, detectors


def _flush(detectors, pending, threshold):
    _, scores, reasons, _ = detectors.score_readings(pending, now_ms=pending[-1].ts_ms)
    out = [
        ((pending[i].ts_ms - START) // MINUTE, pending[i].metric, k.REASONS[reasons[i]])
        for i in np.flatnonzero((scores >= threshold) & (reasons != k.REPEAT))
    ]
    pending.clear()
    return out


def inconsistent(signals, after=0):
    return [s for s in signals if s[2] == "inconsistent" and s[0] >= after]


def test_a_pm25_sensor_drifting_away_from_pm10_is_inconsistent_within_two_hours_and_not_before():
    drift_from = 2 * 1440  # two days to learn the station, then PM2.5 alone drifts +60 over six hours
    signals, _ = run(
        station(drift_from + 360, np.random.default_rng(1), pm25_extra=lambda t: 60 * max(0, t - drift_from) / 360)
    )
    assert inconsistent(signals) and all(s[1] == "pm25" for s in inconsistent(signals))  # on the primary
    assert inconsistent(signals)[0][0] >= drift_from, "no relation signal before the drift"
    assert inconsistent(signals)[0][0] - drift_from <= 120, inconsistent(signals)[0]


def test_air_that_changes_for_both_sensors_is_not_inconsistent():
    # A pollution episode: the air triples over two hours and falls back, both sensors see it.
    episode = lambda t: 60 * np.clip(1 - abs(t - 2 * 1440 - 120) / 120, 0, 1)  # noqa: E731
    signals, _ = run(station(3 * 1440, np.random.default_rng(2), both_extra=episode))
    assert not inconsistent(signals), inconsistent(signals)
    assert not inconsistent(run(station(4 * 1440, np.random.default_rng(3)))[0])  # and ordinary days


def test_laeq_drifting_while_lamax_holds_is_inconsistent_but_louder_traffic_is_not():
    def meter(minutes, rng, laeq_extra, both_extra):
        for t in range(minutes):
            laeq = 60 + 10 * np.sin(t / 1440 * 2 * np.pi) + both_extra(t) + rng.normal(0, 1.5)
            yield [
                R("noise-1", "LAeq", START + t * MINUTE, laeq + laeq_extra(t)),
                R("noise-1", "LAmax", START + t * MINUTE, laeq + 12 + abs(rng.normal(0, 3))),
            ]

    rush = lambda t: 15 * np.clip(1 - abs(t - 2 * 1440 - 200) / 60, 0, 1)  # noqa: E731
    quiet = lambda t: 0.0  # noqa: E731
    assert not inconsistent(run(meter(3 * 1440, np.random.default_rng(4), quiet, rush))[0])
    drift_from = 2 * 1440
    signals, _ = run(
        meter(drift_from + 360, np.random.default_rng(5), lambda t: 25 * max(0, t - drift_from) / 360, quiet)
    )
    found = inconsistent(signals)
    assert found and found[0][1] == "LAeq" and drift_from <= found[0][0] <= drift_from + 120, found


def test_a_relation_that_changes_for_good_is_learnt_again():
    # A new PM2.5 sensor reads 30% higher from day two on: signalled, then learnt (memory: a day of readings).
    signals, _ = run(station(7 * 1440, np.random.default_rng(6), pm25_extra=lambda t: 0.3 * 30 * (t >= 1440)))
    found = inconsistent(signals)
    assert found and found[0][0] >= 1440
    assert not inconsistent(signals, after=5 * 1440), "the new relation is learnt within a few memories"


def test_pairs_form_only_within_one_device_at_one_time():
    detectors = new_detectors(ProcessorSettings())
    batch = [
        R("air-1", "pm25", START, 30.0),
        R("air-2", "pm10", START, 48.0),  # another device
        R("air-3", "pm25", START, 30.0),
        R("air-3", "pm10", START + 1, 48.0),  # another time
        R("air-4", "pm25", START, float("nan")),
        R("air-4", "pm10", START, 48.0),  # not a number
        R("air-5", "pm10", START, 48.0),
        R("air-5", "pm25", START, 30.0),  # either order
    ]
    detectors.score_readings(batch, now_ms=START)
    made = [key for key in detectors.keys() if "~" in key[1]]
    assert made == [("air-5", "pm25~pm10")]


def test_relation_series_are_never_silent_and_survive_a_checkpoint_without_relations():
    signals, detectors = run(station(300, np.random.default_rng(7)))
    relation = detectors.series_ids([("air-1", "pm25~pm10")])[0]
    assert detectors.measured[relation] == k.RELATION_RATIO
    silence = detectors.silence(START + 10 * 1440 * MINUTE)
    assert silence[relation] == 0.0 and silence[detectors.series_ids([("air-1", "pm25")])[0]] > 0
    # Restored into detectors given no relations (the setting off): still a relation series, never silent.
    bare = Detectors(detectors.params, kind_of=lambda key: k.MEASURED)
    bare.restore(deserialize(*serialize(detectors.snapshot())))
    assert bare.measured[relation] == k.RELATION_RATIO
    assert bare.silence(START + 10 * 1440 * MINUTE)[relation] == 0.0


def test_a_restored_checkpoint_judges_relations_exactly_as_before():
    ticks = list(station(2 * 1440 + 360, np.random.default_rng(8), pm25_extra=lambda t: 60 * max(0, t - 2880) / 360))
    whole, _ = run(ticks)
    first, detectors = run(ticks[:2900])
    again = new_detectors(ProcessorSettings())
    again.restore(deserialize(*serialize(detectors.snapshot())))
    rest, _ = run(ticks[2900:], detectors=again)
    assert first + rest == whole and inconsistent(rest)


any_value = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),  # every finite float: subnormals, 0, -0, 1.7e308
    st.sampled_from([0.0, 5e-324, 1e-300, 1e308, -1e308]),
    st.floats(0, 100),
)


@settings(max_examples=80, deadline=None)
@given(
    pairs=st.lists(st.tuples(any_value, any_value), min_size=1, max_size=300),
    form=st.sampled_from(["ratio", "offset"]),
    warmup=st.integers(1, 50),
)
def test_any_pairs_score_in_range_as_the_reference_does_and_survive_a_checkpoint_bit_for_bit(pairs, form, warmup):
    relation = Relation("a", "b", form)
    params = k.params_with(relation_warmup=float(warmup))
    # The kernel against its plain reference, pair by pair.
    state = np.zeros((1, k.STATE_COLUMNS))
    measured = np.array([k.RELATION_RATIO if form == "ratio" else k.RELATION_OFFSET])
    n = len(pairs)
    kernel_scores, kernel_reasons = np.zeros(n), np.zeros(n, np.int64)
    k.relation_batch(
        np.zeros(n, np.int64),
        START + np.arange(n) * float(MINUTE),
        np.array([a for a, _ in pairs]),
        np.array([b for _, b in pairs]),
        measured,
        state,
        k.Params(*params.tolist()),
        kernel_scores,
        kernel_reasons,
    )
    reference = reference_relation_scores(
        [("d", START + i * MINUTE, a, b) for i, (a, b) in enumerate(pairs)], params, {"d": form}, {}
    )
    np.testing.assert_allclose(kernel_scores, [r[0] for r in reference], rtol=1e-9, atol=1e-12)
    assert list(kernel_reasons) == [r[1] for r in reference]
    assert np.all(np.isfinite(kernel_scores)) and np.all((kernel_scores >= 0) & (kernel_scores <= 1))
    # Through the detectors, and a checkpoint half way: the same scores, the same state.
    readings = [
        [R("d", "a", START + i * MINUTE, x), R("d", "b", START + i * MINUTE, y)] for i, (x, y) in enumerate(pairs)
    ]
    half = len(readings) // 2
    whole = Detectors(params, relations=[relation])
    scores = [whole.score_readings(tick, now_ms=0).scores for tick in readings]
    first = Detectors(params, relations=[relation])
    for tick in readings[:half]:
        first.score_readings(tick, now_ms=0)
    restored = Detectors(params, relations=[relation])
    restored.restore(deserialize(*serialize(first.snapshot())))
    for tick, expected in zip(readings[half:], scores[half:], strict=True):
        got = restored.score_readings(tick, now_ms=0).scores
        np.testing.assert_array_equal(got, expected)
    flat = np.concatenate(scores)
    assert np.all(np.isfinite(flat)) and np.all((flat >= 0) & (flat <= 1))
    np.testing.assert_array_equal(restored.state[: restored.n_series], whole.state[: whole.n_series])


def catalogue_range(key):
    metric = METRICS.get(key[1])
    return (metric.low, metric.high) if metric else (-np.inf, np.inf)


def test_extreme_pairs_inside_the_declared_ranges_do_not_blind_the_relation():
    # A new device's first pairs: PM10 5e-324 then 0, then PM2.5 at the top of its range with PM10 at
    # 0 and the other way round (all inside the catalogue's ranges, which the gateway holds values
    # to); the same again after two days. The relation stays finite and finds the drift that follows.
    hostile = [(30.0, 5e-324), (30.0, 0.0), (2000.0, 0.0), (0.0, 3000.0)]
    drift_from = 2 * 1440 + 720
    ticks = list(
        station(drift_from + 360, np.random.default_rng(12), pm25_extra=lambda t: 60 * max(0, t - drift_from) / 360)
    )
    for at in (0, 2 * 1440):
        for j, (pm25, pm10) in enumerate(hostile):
            ticks[at + j] = [
                R("air-1", "pm25", START + (at + j) * MINUTE, pm25),
                R("air-1", "pm10", START + (at + j) * MINUTE, pm10),
            ]
    detectors = new_detectors(ProcessorSettings(), range_of=catalogue_range)
    signals, _ = run(ticks, detectors=detectors)
    relation = detectors.series_ids([("air-1", "pm25~pm10")])[0]
    assert np.all(np.isfinite(detectors.state[relation]))
    found = inconsistent(signals, after=drift_from)
    assert found and found[0][0] - drift_from <= 120, found


def test_readings_pair_only_within_one_record_and_inside_their_declared_ranges():
    detectors = new_detectors(ProcessorSettings(), range_of=lambda key: (0.0, 1000.0))
    batch = [
        R("air-1", "pm25", START, 30.0),
        R("air-1", "pm10", START, 48.0),  # one time, but another record (below)
        R("air-2", "pm25", START, 30.0),
        R("air-2", "pm10", START, 48.0),  # one record
        R("air-3", "pm25", START, 30.0),
        R("air-3", "pm10", START, 4800.0),  # outside its range
    ]
    detectors.score_readings(batch, now_ms=START, records=[1, 2, 3, 3, 4, 4])
    assert [key for key in detectors.keys() if "~" in key[1]] == [("air-2", "pm25~pm10")]


def test_a_drifting_reference_or_pm1_breaks_its_relation_too():
    def three_sizes(minutes, rng, pm10_extra, pm1_extra):
        for t in range(minutes):
            pm25 = 30 + 15 * np.sin(t / 1440 * 2 * np.pi) + rng.normal(0, 3)
            ts = START + t * MINUTE
            yield [
                R("air-1", "pm1", ts, 0.6 * pm25 + rng.normal(0, 1) + pm1_extra(t)),
                R("air-1", "pm25", ts, pm25),
                R("air-1", "pm10", ts, 1.6 * pm25 + rng.normal(0, 3) + pm10_extra(t)),
            ]

    drift_from = 2 * 1440
    ramp = lambda size: lambda t: size * max(0, t - drift_from) / 360  # noqa: E731
    still = lambda t: 0.0  # noqa: E731
    # PM10 drifts down: PM2.5 no longer agrees with it (stored on the primary, pm25).
    found = inconsistent(run(three_sizes(drift_from + 360, np.random.default_rng(13), ramp(-60), still))[0])
    assert found and found[0][1] == "pm25" and drift_from <= found[0][0] <= drift_from + 120, found
    # PM1 drifts up: it no longer agrees with PM2.5.
    found = inconsistent(run(three_sizes(drift_from + 360, np.random.default_rng(14), still, ramp(30)))[0])
    assert found and found[0][1] == "pm1" and drift_from <= found[0][0] <= drift_from + 120, found


def test_a_relation_is_evicted_with_its_own_device_and_others_stay():
    _, detectors = run(station(60, np.random.default_rng(15), device="air-old"))
    later = [
        [r._replace(ts_ms=r.ts_ms + 90 * MINUTE) for r in tick]
        for tick in station(60, np.random.default_rng(16), device="air-new")
    ]
    run(later, detectors=detectors)
    detectors.evict(before_ms=START + 80 * MINUTE)
    assert sorted(detectors.keys()) == [("air-new", "pm10"), ("air-new", "pm25"), ("air-new", "pm25~pm10")]


def test_a_primary_reading_takes_the_higher_judgement_and_a_repeat_under_the_threshold():
    from processing.detect import _merged

    below = 0.3
    assert _merged(0.1, k.LEVEL_SHIFT, 0.0, k.REPEAT, below) == (0.1, k.REPEAT)  # the relation holds its alert
    assert _merged(0.0, k.REPEAT, 0.1, k.INCONSISTENT, below) == (0.1, k.REPEAT)  # and the reading's own
    assert _merged(0.5, k.SPIKE, 0.2, k.REPEAT, below) == (0.5, k.SPIKE)  # an anomaly stays one
    assert _merged(0.1, k.SPIKE, 0.4, k.INCONSISTENT, below) == (0.4, k.INCONSISTENT)
    assert _merged(0.4, k.SPIKE, 0.4, k.INCONSISTENT, below) == (0.4, k.SPIKE)  # a tie: the reading's own


def test_a_relation_whose_form_changed_learns_again_after_a_restore():
    _, detectors = run(station(300, np.random.default_rng(17)))
    snapshot = deserialize(*serialize(detectors.snapshot()))
    as_offset = Detectors(detectors.params, relations=[Relation("pm25", "pm10", "offset")])
    as_offset.restore(snapshot)
    relation = as_offset.series_ids([("air-1", "pm25~pm10")])[0]
    assert as_offset.measured[relation] == k.RELATION_OFFSET and as_offset.state[relation, k.COUNT] == 0


def test_an_unknown_relation_form_is_refused():
    try:
        Detectors(relations=[Relation("a", "b", "square")])
    except ValueError as error:
        assert "square" in str(error)
    else:
        raise AssertionError("an unknown form must be refused")


def test_the_catalogue_pairs_real_metrics_and_their_alert_names_the_partner():
    assert all(r.primary in METRICS and r.reference in METRICS and "~" not in r.primary for r in RELATIONS)
    signal = detector_signal("air-1", "pm25", START, 81.0, 0.42, "inconsistent")
    assert signal.severity == "warning" and "pm10" in signal.message and signal.alert_type == "inconsistent"


def pairs_with_residuals(kind, minutes, seed):
    """A month of PM2.5 and PM10 a minute apart, related as always (1.6 times), with residuals as real
    ones can be: heavy-tailed (Student's t, 3 degrees of freedom), autocorrelated (AR(1), 0.99: the
    share drifting back and forth with the aerosol), or growing with the level (heteroscedastic)."""
    rng = np.random.default_rng(seed)
    air = 30 + 15 * np.sin(np.arange(minutes) / 1440 * 2 * np.pi)
    if kind == "heavy-tailed":
        residual = 3 * rng.standard_t(3, minutes)
    elif kind == "autocorrelated":
        shocks = rng.normal(0, 3 * np.sqrt(1 - 0.99**2), minutes)
        residual = np.zeros(minutes)
        for t in range(1, minutes):
            residual[t] = 0.99 * residual[t - 1] + shocks[t]
    else:
        residual = rng.normal(0, 1, minutes) * 0.15 * air
    pm25 = air + rng.normal(0, 1, minutes)
    pm10 = 1.6 * pm25 + residual
    for t in range(minutes):
        ts = START + t * MINUTE
        yield [R("air-1", "pm25", ts, float(pm25[t])), R("air-1", "pm10", ts, float(pm10[t]))]


def test_residuals_heavy_tailed_autocorrelated_or_growing_with_the_level_raise_at_most_two_warnings_a_month():
    # An operator can live with a false warning a fortnight per station; independent Gaussian
    # residuals alone would never reach 4.7 of the chart's standard deviations.
    for kind in ("heavy-tailed", "autocorrelated", "heteroscedastic"):
        for seed in (1, 2, 3):
            signals, _ = run(pairs_with_residuals(kind, 30 * 1440, seed))
            assert len(inconsistent(signals)) <= 2, (kind, seed, inconsistent(signals))


a_value = st.one_of(st.floats(0.0, 1000.0), st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0, 2000.0]))
a_reading = st.tuples(
    st.sampled_from(["d1", "d2", "d3"]),
    st.sampled_from(["pm1", "pm25", "pm10", "LAeq", "LAmax", "no2"]),
    st.integers(0, 2),  # minute
    a_value,
    st.integers(0, 2),  # record
)


@settings(max_examples=150, deadline=None)
@given(
    batches=st.lists(st.lists(a_reading, max_size=40), min_size=1, max_size=4),
    use_records=st.booleans(),
    restore_before=st.integers(0, 4),
)
# One device at one time in two records, the later record first: judged in the order they came.
@example(
    [[("d1", "pm25", 0, 30.0, 2), ("d1", "pm10", 0, 50.0, 2), ("d1", "pm25", 0, 31.0, 1), ("d1", "pm10", 0, 51.0, 1)]],
    True,
    4,
)
# Devices first paired in one order, then met in the other.
@example(
    [
        [
            ("d2", "pm25", 0, 30.0, 0),
            ("d2", "pm10", 0, 50.0, 0),
            ("d1", "pm25", 0, 30.0, 0),
            ("d1", "pm10", 0, 50.0, 0),
        ],
        [
            ("d1", "pm25", 1, 30.0, 0),
            ("d1", "pm10", 1, 50.0, 0),
            ("d2", "pm25", 1, 30.0, 0),
            ("d2", "pm10", 1, 50.0, 0),
        ],
    ],
    False,
    4,
)
def test_a_batch_pairs_exactly_as_a_plain_loop_pairs_it(batches, use_records, restore_before):
    # Detectors.pairs (NumPy, with what it notes per series between batches) against a loop over the
    # readings: repeats, other records, other times, values out of range or not finite, metrics in no
    # relation, in any order; across batches, and after a restore that numbers the series again.
    detectors = Detectors(k.LIKELIHOOD_PARAMS, range_of=lambda key: (0.0, 1000.0), relations=RELATIONS)
    made: set[tuple[str, str]] = set()
    for b, batch in enumerate(batches):
        if b == restore_before:
            detectors.restore(deserialize(*serialize(detectors.snapshot())))
        readings = [R(d, m, START + t * MINUTE, v) for d, m, t, v, _ in batch]
        records = [rec for *_, rec in batch] if use_records else None
        ids = detectors.series_ids([(r.device_id, r.metric) for r in readings])
        ts = np.array([r.ts_ms for r in readings], dtype=np.float64)
        values = np.array([r.value for r in readings], dtype=np.float64)
        got = [tuple(x) for x in np.column_stack(detectors.pairs(readings, records, ids, ts, values)).tolist()]
        expected = reference_pairs(readings, records, RELATIONS, detectors.low[ids], detectors.high[ids])
        assert got == expected
        detectors.score_readings(readings, now_ms=0, records=records)
        made |= {(readings[p].device_id, RELATIONS[r].series_name) for p, _, r in expected}
        assert {key for key in detectors.keys() if "~" in key[1]} == made
