"""Streaming anomaly detectors as numba kernels over a micro-batch. No I/O, no clocks, no dicts.

Every kernel walks a batch of readings in order (dense series id, event time in epoch ms, value),
updates per-series state in place and writes a score in [0, 1] (high means anomalous, 0 while
warming up) and a reason code. State is one float64 array per concern, indexed by series id, so a
snapshot is a copy of arrays and a restore is exact. NaN handling is decided by the wrapper
(`processing.detect`); the kernels see finite values only.

Methods: a robust running baseline (exponentially weighted mean and mean absolute deviation with
outlier clipping, after Hampel's robust statistics) against a global and an hour-of-day profile, so
a series with a daily cycle is judged against its usual level for that hour; a fast/slow mean
crossover for level shifts (an EW CUSUM in spirit); runs of identical values for stuck sensors; the
absolute rate of change against its own running typical rate; runs of identical values longer than
twice any the series has shown before (so a square wave is not "stuck"); declared physical ranges; and, on a
timer, silence much longer than the series' usual reporting interval.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Reason codes, stable: stored with anomalies and shown to operators.
NONE, SPIKE, DIP, LEVEL_SHIFT, STUCK, RATE_OF_CHANGE, OUT_OF_RANGE, DROPOUT = range(8)
REASONS = ("none", "spike", "dip", "level_shift", "stuck", "rate_of_change", "out_of_range", "dropout")

# Columns of the per-series state array.
(COUNT, MEAN, MAD, FAST, SLOW, SLOW_MAD, LAST_VALUE, LAST_TS, RUN, INTERVAL, RATE, LONGEST_RUN, QUIET_UNTIL,
 QUIET_SCORE) = range(14)
STATE_COLUMNS = 14
HOURS = 24
HOUR_MEAN, HOUR_MAD, HOUR_COUNT = range(3)

# Parameters, in one float64 array so a kernel call stays a plain function of arrays.
(P_WARMUP, P_ALPHA, P_HOUR_ALPHA, P_HOUR_WARMUP, P_FAST_ALPHA, P_SLOW_ALPHA, P_Z_FLOOR, P_Z_SCALE,
 P_STUCK_MIN, P_RATE_ALPHA, P_CLIP, P_W_SPIKE, P_W_SHIFT, P_W_STUCK, P_W_RATE, P_QUIET_LEVEL, P_QUIET_POINTS,
 P_QUIET_MARGIN) = range(18)
# The P_W_* weights scale each detector's z-like statistic before the common mapping to [0, 1]:
# one threshold then means the same for every detector (0 turns a detector off).
# After a score above P_QUIET_LEVEL a series stays quiet for P_QUIET_POINTS readings unless the score
# escalates by P_QUIET_MARGIN: one event, one signal (operators' alert storms; NAB's false positives).
# Rate of change is off by default (P_W_RATE 0): on the NAB recordings big single steps are
# ordinary and it cost more than it caught (bench/nab: 52.7 without it, 24.9 with weight 1). It is
# meant for series where speed matters in itself, such as a water level rising fast: turn it on
# there. The other weights and the quiet period come from the same benchmark.
DEFAULT_PARAMS = np.array([30.0, 0.02, 0.1, 5.0, 0.3, 0.01, 3.0, 4.0, 12.0, 0.05, 4.0, 1.0, 1.0, 1.0, 0.0,
                           0.2, 100.0, 0.2])
ALL_DETECTORS_PARAMS = DEFAULT_PARAMS.copy()
ALL_DETECTORS_PARAMS[P_W_RATE] = 1.0


@njit(cache=True)
def _score(z: float, floor: float, scale: float) -> float:
    """Map a robust z-like distance to [0, 1): 0 up to `floor`, 0.5 at `floor + scale`."""
    excess = z - floor
    if excess <= 0.0:
        return 0.0
    return excess / (excess + scale)


@njit(cache=True)
def detect_batch(series: np.ndarray, ts: np.ndarray, values: np.ndarray, low: np.ndarray, high: np.ndarray,
                 state: np.ndarray, hourly: np.ndarray, params: np.ndarray,
                 scores: np.ndarray, reasons: np.ndarray) -> None:
    """Score each reading of the batch in order, updating `state` and `hourly` in place."""
    warmup = params[P_WARMUP]
    alpha = params[P_ALPHA]
    hour_alpha = params[P_HOUR_ALPHA]
    fast_alpha = params[P_FAST_ALPHA]
    slow_alpha = params[P_SLOW_ALPHA]
    z_floor = params[P_Z_FLOOR]
    z_scale = params[P_Z_SCALE]
    clip = params[P_CLIP]
    for i in range(series.shape[0]):
        s = series[i]
        x = values[i]
        t = ts[i]
        scores[i] = 0.0
        reasons[i] = NONE
        if x < low[s] or x > high[s]:
            scores[i] = 1.0
            reasons[i] = OUT_OF_RANGE
            continue  # impossible values teach the baseline nothing
        n = state[s, COUNT]
        if n == 0.0:
            state[s, MEAN] = x
            state[s, FAST] = x
            state[s, SLOW] = x
            state[s, LAST_VALUE] = x
            state[s, LAST_TS] = t
            state[s, COUNT] = 1.0
            h = int((t // 3_600_000) % HOURS)
            hourly[s, h, HOUR_MEAN] = x
            hourly[s, h, HOUR_COUNT] = 1.0
            continue

        mean = state[s, MEAN]
        mad = state[s, MAD]
        eps = 1e-9 + 1e-3 * abs(mean)
        scale = 1.4826 * mad + eps
        z = abs(x - mean) / scale
        h = int((t // 3_600_000) % HOURS)
        if hourly[s, h, HOUR_COUNT] >= params[P_HOUR_WARMUP]:
            hour_scale = 1.4826 * hourly[s, h, HOUR_MAD] + eps
            z_hour = abs(x - hourly[s, h, HOUR_MEAN]) / hour_scale
            if z_hour < z:
                z = z_hour  # a usual value for this hour of the day is not a spike

        dt = t - state[s, LAST_TS]
        step = abs(x - state[s, LAST_VALUE])
        rate = step / dt if dt > 0 else 0.0
        if state[s, LAST_VALUE] == x:
            state[s, RUN] += 1.0
        else:
            if state[s, RUN] > state[s, LONGEST_RUN]:
                state[s, LONGEST_RUN] = state[s, RUN]  # runs this long are part of how the series behaves
            state[s, RUN] = 0.0

        if n >= warmup:
            best = _score(params[P_W_SPIKE] * z, z_floor, z_scale)
            reason = SPIKE if x > mean else DIP
            shift = abs(state[s, FAST] - state[s, SLOW]) / (1.4826 * state[s, SLOW_MAD] + eps)
            shift_score = _score(params[P_W_SHIFT] * shift, z_floor, z_scale)
            if shift_score > best:
                best = shift_score
                reason = LEVEL_SHIFT
            stuck_after = max(params[P_STUCK_MIN], 2.0 * state[s, LONGEST_RUN])
            if mad > eps and state[s, RUN] >= stuck_after:
                # as long as the usual stuck threshold: z at the floor; twice as long: z twice the floor
                stuck_score = _score(params[P_W_STUCK] * z_floor * state[s, RUN] / stuck_after, z_floor, z_scale)
                if stuck_score > best:
                    best = stuck_score
                    reason = STUCK
            typical_rate = state[s, RATE]
            if typical_rate > 0.0 and dt > 0:
                rate_score = _score(params[P_W_RATE] * rate / typical_rate / 2.0, z_floor, z_scale)
                if rate_score > best:
                    best = rate_score
                    reason = RATE_OF_CHANGE
            if n < state[s, QUIET_UNTIL] and best <= state[s, QUIET_SCORE] + params[P_QUIET_MARGIN]:
                best = 0.0  # the same event, already signalled
            elif best > params[P_QUIET_LEVEL]:
                state[s, QUIET_UNTIL] = n + params[P_QUIET_POINTS]
                state[s, QUIET_SCORE] = best
            if best > 0.0:
                scores[i] = best
                reasons[i] = reason

        # Update the baselines, clipping the new value so one outlier cannot drag them far.
        deviation = x - mean
        limit = clip * scale
        clipped = mean + min(max(deviation, -limit), limit) if n >= warmup else x
        state[s, MEAN] = mean + alpha * (clipped - mean) if n >= warmup else mean + (x - mean) / (n + 1.0)
        state[s, MAD] = mad + (alpha if n >= warmup else 1.0 / (n + 1.0)) * (abs(clipped - mean) - mad)
        state[s, FAST] += fast_alpha * (clipped - state[s, FAST])
        slow = state[s, SLOW]
        state[s, SLOW] = slow + slow_alpha * (clipped - slow)
        state[s, SLOW_MAD] += slow_alpha * (abs(clipped - slow) - state[s, SLOW_MAD])
        hn = hourly[s, h, HOUR_COUNT]
        hour_mean = hourly[s, h, HOUR_MEAN] if hn > 0 else x
        a = hour_alpha if hn >= 1.0 / hour_alpha else 1.0 / (hn + 1.0)
        hourly[s, h, HOUR_MAD] += a * (abs(x - hour_mean) - hourly[s, h, HOUR_MAD])
        hourly[s, h, HOUR_MEAN] = hour_mean + a * (x - hour_mean)
        hourly[s, h, HOUR_COUNT] = hn + 1.0
        if dt > 0:
            state[s, INTERVAL] = dt if state[s, INTERVAL] == 0.0 else state[s, INTERVAL] + 0.05 * (
                dt - state[s, INTERVAL])
            state[s, RATE] = rate if state[s, RATE] == 0.0 else state[s, RATE] + params[P_RATE_ALPHA] * (
                rate - state[s, RATE])
        state[s, LAST_VALUE] = x
        state[s, LAST_TS] = t
        state[s, COUNT] = n + 1.0


@njit(cache=True)
def silence_scores(now_ms: float, state: np.ndarray, last_seen: np.ndarray, warmup: float, factor: float,
                   scores: np.ndarray) -> None:
    """Dropout, checked on a timer: silence since `last_seen` (ms, per series; NaN for never) longer
    than `factor` times the usual interval scores > 0."""
    for s in range(state.shape[0]):
        scores[s] = 0.0
        interval = state[s, INTERVAL]
        if state[s, COUNT] < warmup or interval <= 0.0:
            continue
        gap = (now_ms - last_seen[s]) / interval
        if gap > factor:
            excess = gap - factor
            scores[s] = excess / (excess + factor)


@njit(cache=True)
def minute_partials(series: np.ndarray, ts: np.ndarray, values: np.ndarray, width_ms: float,
                    out_series: np.ndarray, out_bucket: np.ndarray, out_stats: np.ndarray) -> int:
    """Tumbling-window partials of a batch: one row per (series, window) in `out_*`; returns the row count.

    `out_stats` columns: n, sum, sum of squares, min, max, first time, first value, last time, last
    value (the same mergeable partials as the agg_1m table). Outputs must hold len(series) rows.
    """
    n = series.shape[0]
    if n == 0:
        return 0
    buckets = np.floor(ts / width_ms)
    lowest = buckets.min()
    span = buckets.max() - lowest + 1.0
    keys = series.astype(np.float64) * span + (buckets - lowest)
    order = np.argsort(keys, kind="mergesort")  # stable: equal times keep arrival order
    rows = -1
    previous = -1.0
    for j in range(n):
        i = order[j]
        x = values[i]
        t = ts[i]
        if keys[i] != previous:
            rows += 1
            previous = keys[i]
            out_series[rows] = series[i]
            out_bucket[rows] = buckets[i] * width_ms
            out_stats[rows, 0] = 0.0
            out_stats[rows, 1] = 0.0
            out_stats[rows, 2] = 0.0
            out_stats[rows, 3] = x
            out_stats[rows, 4] = x
            out_stats[rows, 5] = t
            out_stats[rows, 6] = x
            out_stats[rows, 7] = t
            out_stats[rows, 8] = x
        out_stats[rows, 0] += 1.0
        out_stats[rows, 1] += x
        out_stats[rows, 2] += x * x
        if x < out_stats[rows, 3]:
            out_stats[rows, 3] = x
        if x > out_stats[rows, 4]:
            out_stats[rows, 4] = x
        if t < out_stats[rows, 5]:
            out_stats[rows, 5] = t
            out_stats[rows, 6] = x
        if t >= out_stats[rows, 7]:
            out_stats[rows, 7] = t
            out_stats[rows, 8] = x
    return rows + 1
