"""The processor's detectors over three simulated weeks, without the stack (bench.city_offline):
nine in ten of their signals are true, and the point anomalies they exist for are found.

`kota score` over a week on the real stack is issue 22's proof (precision and recall of 0.9 on each
seed, with the rules' alerts: `python -m bench.city_weeks`, minutes a seed). This holds the
detectors alone in seconds, so a change that costs the simulated city its precision or recall fails
here first. Alone they see neither alerts nor dropouts, so their bar is over the three weeks
together: precision 0.9 (0.942 on 2026-12-05 with the likelihood's windows in time and its input
widened by the baseline's lean, 0.952 with the windows alone, 0.915 before; seeds 1-3 from Saturday
06:00 WIB), and 85% of the spikes, level shifts and stuck runs (87.1%, 54 of 62; 55 with the windows
alone, 56 before; of the five missed on 2026-12-04 in seeds 2 and 3, traced, a 25 dB noise spike
scored 0.294, under the 0.3 threshold, its series' spread widened by the evening's fast fall;
bench.city_offline shows the others; the lean judging spikes too found 51). Slow drift (issue 22:
found within two hours) on each seed: its median delay within 120 minutes (35, 31 and 69 on
2026-12-05; 46, 32 and 94 before the windows in time; with relations between a device's metrics
judged: 256, 153 and 180 without them), and three in four drifts found (24 of 29; 25 before)."""

import statistics

from bench.city_offline import DEFAULT_START, detect_city

START_MS = int(DEFAULT_START.timestamp() * 1000)
WEEK_HOURS = 157  # as the documented weeks: Saturday 06:00 WIB to Friday 19:00
POINT_KINDS = ("spike", "level_shift", "stuck")  # what the detectors alone must find; rules find the rest


def test_three_simulated_weeks_signal_nine_in_ten_true_and_find_their_point_anomalies_and_drifts():
    true = signals = found = planned = drifts_found = drifts = 0
    for seed in (1, 2, 3):
        card, labels = detect_city(seed, WEEK_HOURS, devices=36, batch_ticks=5, start_ms=START_MS)
        assert set(POINT_KINDS) <= {label["kind"] for label in labels}, "the plan must hold every kind judged"
        true, signals = true + card.true_detections, signals + card.detections
        found += sum(card.by_kind[kind].detected for kind in POINT_KINDS)
        planned += sum(card.by_kind[kind].labels for kind in POINT_KINDS)
        # A spike is news at once; a stuck sensor once its run is twice the longest it has shown.
        assert card.by_kind["spike"].detect_delays_ms and card.by_kind["stuck"].detect_delays_ms, seed
        assert statistics.median(card.by_kind["spike"].detect_delays_ms) <= 60_000, seed
        assert max(card.by_kind["stuck"].detect_delays_ms) <= 30 * 60_000, seed
        drift = card.by_kind["drift"]
        assert drift.detect_delays_ms and statistics.median(drift.detect_delays_ms) <= 120 * 60_000, (seed, drift)
        drifts_found, drifts = drifts_found + drift.detected, drifts + drift.labels
    assert true / signals >= 0.9, (true, signals)
    assert found / planned >= 0.85, (found, planned)
    assert drifts_found / drifts >= 0.75, (drifts_found, drifts)
