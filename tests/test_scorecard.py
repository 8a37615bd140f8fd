"""The scorecard's counting, on hand-made labels and detections."""

from simulators import scorecard
from simulators.scorecard import Label, group_detections, score

MIN = 60_000


def test_detections_are_runs_and_labels_match_by_device_and_extended_window():
    rows = [
        ("gate", "currentLevel", 100 * MIN, "rate_of_change"),
        ("gate", "currentLevel", 105 * MIN, "spike"),
        ("gate", "currentLevel", 300 * MIN, "spike"),  # a second run: more than 15 min later
        ("meter", "pressure", 50 * MIN, "stuck"),
        ("light", "powerConsumption", 10 * MIN, "spike"),
    ]
    detections = group_detections(rows, merge_gap_ms=15 * MIN)
    assert sorted((d.device_id, d.first_ms // MIN, d.last_ms // MIN) for d in detections) == [
        ("gate", 100, 105),
        ("gate", 300, 300),
        ("light", 10, 10),
        ("meter", 50, 50),
    ]
    labels = [
        Label("flood_wave", "gate", "currentLevel", 90 * MIN, 200 * MIN),
        Label("stuck", "meter", "pressure", 20 * MIN, 40 * MIN),  # found 10 min after its end: in grace
        Label("spike", "light", "powerConsumption", 500 * MIN, 501 * MIN),
    ]  # never found
    card = score(labels, detections, alerts=[("gate", 130 * MIN)], city="x", grace_ms=30 * MIN)
    assert (card.labels, card.detections, card.true_detections) == (3, 4, 2)
    assert card.precision == 0.5 and round(card.recall, 3) == 0.667 and round(card.f1, 3) == 0.571
    assert card.by_kind["flood_wave"].detect_delays_ms == [10 * MIN]
    assert card.by_kind["flood_wave"].alert_delays_ms == [40 * MIN]
    assert card.by_kind["stuck"].detect_delays_ms == [30 * MIN]
    assert card.by_kind["spike"].detected == 0
    assert card.false_by_reason == {"spike": 2}


def test_a_label_is_found_only_by_a_detection_on_its_own_metric_and_timed_from_it():
    rows = [
        ("air", "pm10", 100 * MIN, "spike"),  # the partner sensor, in the window: not the drift
        ("air", "pm25", 110 * MIN, "inconsistent"),  # the same run: the drifting sensor, 10 min later
        ("noise", "LAmax", 100 * MIN, "spike"),  # only the partner: the LAeq drift is not found
        ("water", "pressure", 100 * MIN, "dropout"),  # any metric finds a dropout (no metric)
    ]
    detections = group_detections(rows, merge_gap_ms=15 * MIN)
    labels = [
        Label("drift", "air", "pm25", 90 * MIN, 200 * MIN),
        Label("drift", "noise", "LAeq", 90 * MIN, 200 * MIN),
        Label("dropout", "water", None, 95 * MIN, 155 * MIN),
    ]
    card = score(labels, detections, alerts=[], city="x", grace_ms=30 * MIN)
    assert card.by_kind["drift"].detected == 1 and card.by_kind["drift"].detect_delays_ms == [20 * MIN]
    assert card.by_kind["dropout"].detected == 1 and card.by_kind["dropout"].detect_delays_ms == [5 * MIN]
    assert (card.detections, card.true_detections) == (3, 2)
    assert card.false_by_reason == {"spike": 1}


def test_the_streams_own_end_is_not_a_dropout():
    end_from = 10_000  # the last tick less the intervals a silence needs to be a dropout
    signals = [
        ("a", "pm25", 9_999, "alert:dropout"),  # a silence long enough before the stream ended
        ("a", "pm25", 10_000, "alert:dropout"),  # a series whose last reading came a little early
        ("b", "LAeq", 10_300, "dropout"),  # every series at the end
        ("b", "LAeq", 10_300, "spike"),  # an anomaly at the end is still one
    ]
    assert scorecard.without_the_end(signals, end_from) == [signals[0], signals[3]]
