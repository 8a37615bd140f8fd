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
timer, silence much longer than the series' usual reporting interval. A spike the series shows routinely
scores less (its running rate of big spikes, in the spirit of HTM's anomaly likelihood).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import config, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# Reason codes, stable: stored with anomalies and shown to operators.
# REPEAT marks a reading that would have scored P_REPEAT_BELOW (the processor's anomaly threshold)
# or more but does not because it is not news: inside the quiet period of an event already
# signalled, or damped as a spike the series shows routinely. It is not an anomaly, but it is not
# normal either: the processor keeps the metric's open alert from clearing itself while they go on.
NONE, SPIKE, DIP, LEVEL_SHIFT, STUCK, RATE_OF_CHANGE, OUT_OF_RANGE, DROPOUT, REPEAT = range(9)
REASONS = ("none", "spike", "dip", "level_shift", "stuck", "rate_of_change", "out_of_range", "dropout", "repeat")

# Columns of the per-series state array.
(COUNT, MEAN, MAD, FAST, SLOW, SLOW_MAD, LAST_VALUE, LAST_TS, RUN, INTERVAL, RATE, LONGEST_RUN, QUIET_UNTIL,
 QUIET_SCORE, ROUTINE, OUTLIER_RUN) = range(16)
STATE_COLUMNS = 16
HOURS = 24
# The profile has a day of hours for working days and another for weekends (local Saturday and
# Sunday): rush hours that do not come on a Saturday are not news. Its array is (2, series, HOURS,
# 3), working days first: each kind of day's profiles lie together, so a stream touches half as
# much memory as with both side by side per series (which cost the kernels about 12%).
DAY_KINDS = 2
DAY_MS = 86_400_000
# A slot of the profile holds one hour of each day, so readings covering HOUR_MS of event time in
# it are a day's worth: the unit its warm-up is counted in.
HOUR_MS = 3_600_000.0
# How the detectors judge a series (the `measured` array, per series): a state code (on/off/fault)
# only against its range; a measured quantity by every detector; a switched load (a street light's
# power draw) by every detector while it is on, and by its range alone while it is off (at the
# bottom of its range), its off readings teaching its baselines nothing.
STATE_CODE, MEASURED, SWITCHED = 0.0, 1.0, 2.0
SPIKE_MAX_RUN = 3.0  # readings: a longer excursion is a change of level, not a spike
PREFETCH_AHEAD = 12  # readings; tried 12 and 24 on 10,000 series, no difference
HOUR_MEAN, HOUR_MAD, HOUR_COUNT = range(3)

# Parameters, in one float64 array so a kernel call stays a plain function of arrays.
(P_WARMUP, P_ALPHA, P_HOUR_ALPHA, P_HOUR_WARMUP, P_FAST_ALPHA, P_SLOW_ALPHA, P_Z_FLOOR, P_Z_SCALE,
 P_STUCK_MIN, P_RATE_ALPHA, P_CLIP, P_W_SPIKE, P_W_SHIFT, P_W_STUCK, P_W_RATE, P_QUIET_LEVEL, P_QUIET_POINTS,
 P_QUIET_MARGIN, P_GAP_FACTOR, P_ROUTINE_ALPHA, P_ROUTINE_RATE, P_ROUTINE_LEVEL, P_REPEAT_BELOW, P_DAILY_TIGHTNESS,
 P_DAILY_DAYS, P_UTC_OFFSET_HOURS, P_WEEKENDS) = range(27)
# The P_W_* weights scale each detector's z-like statistic before the common mapping to [0, 1]:
# one threshold then means the same for every detector (0 turns a detector off).
# After a score above P_QUIET_LEVEL a series stays quiet for P_QUIET_POINTS readings unless the score
# escalates by P_QUIET_MARGIN: one event, one signal (operators' alert storms; NAB's false positives).
# Rate of change is off by default (P_W_RATE 0): on the NAB recordings big single steps are
# ordinary and it cost more than it caught (bench/nab, before routine spikes: 52.7 without it,
# 24.9 with weight 1). It is
# meant for series where speed matters in itself, such as a water level rising fast: turn it on
# there. The other weights and the quiet period come from the same benchmark.
# A reading that ends a gap longer than P_GAP_FACTOR usual intervals (event time) is a dropout that
# has ended: what a replayed or fast-forwarded stream shows, where the wall-clock timer
# (silence_scores) never fires. Off (0) here; the processor turns it on with its dropout factor.
# bench/nab runs without it: NAB labels anomalies in values, and its recordings have unlabelled
# gaps (before routine spikes, a factor of 5 took its score from 52.7 to 16.8, 40 to 51.1).
# Routine spikes: ROUTINE is each series' running rate (EW mean, P_ROUTINE_ALPHA: a memory of about
# a thousand readings) of spikes that came and went: a run of at most SPIKE_MAX_RUN readings scoring
# above P_ROUTINE_LEVEL, followed by one that does not (OUTLIER_RUN counts the run). A spike's score
# is scaled by (r / (r + rate))^2, r = P_ROUTINE_RATE (0 turns this off): a series that spikes every
# hundred readings (a load balancer's bursts, a pump's starts) stops raising an anomaly for every
# burst, while a series that never spiked scores in full. Only big outliers count (a score above
# 0.5 is a z above 7), so the usual tails of a noisy series do not; and only short ones, so a
# series that switches level (a street light at dusk) has not "spiked" and keeps its sensitivity.
# bench/nab: 52.7 without it, 65.7 with it (false positives 86 → 37; the two spiky artificial files
# had 71 of the 86); rates 0.002-0.005 and memories of 500-2,000 readings gave 62-66. A damped
# spike is a REPEAT (above), so a sensor that starts flapping keeps its one alert open while it flaps.
# Daily cycles: an hour of the day whose profile holds P_DAILY_DAYS hours of readings and whose
# usual spread (its MAD) is under 1/P_DAILY_TIGHTNESS of the series' overall spread judges its
# spikes and dips against that hour's usual level alone (0 turns this off). Otherwise the hour's
# profile only excuses a value (the smaller of the two distances counts). A cycle explaining most
# of the spread (1/2: three quarters of the variance) is what makes a day-time value at the
# night-time level news, though it lies inside the series' overall range.
# The profile learns at P_HOUR_ALPHA per hour of readings (see the update below), so it remembers
# about ten days at any reporting interval. Learning per reading, a profile of 1-minute readings
# remembered the last ten minutes of yesterday's hour: in a simulated week (docs/testing_streams.md)
# every hour's first reading on a steep part of the day was a false dip or spike, and a water level
# on a 38-hour swell looked like a daily cycle.
# bench/nab: 65.7 without judging by the hour, 73.2 with it (false positives 19 → 9 at the swept
# threshold; the daily file whose peak fell is found, and a traffic window more; the one whose
# peak did not come is still missed). Tightness 1.5-3 gave 73-78 and 2-3 days of history the same;
# 2 is the middle, not the best. A simulated week: F1 0.716 → 0.769, precision 0.627 → 0.713.
# An hour's profile excuses a value only once it holds an hour of readings (a day's worth): learning
# over days, a profile begun by a spike stays wide for the rest of that hour (a sensor flapping
# every 20 readings had the flaps after one that began an hour look usual; they stopped counting
# on its alert). Learning the clipped value instead cost the week's street lights a false spike
# each evening (the baseline lags a square wave, so their night hours learnt day values).
# Weekends (P_WEEKENDS 1; local time is UTC + P_UTC_OFFSET_HOURS) give Saturdays and Sundays a
# profile of their own, learnt from weekends only, so rush hours that do not come on a Saturday are
# not news. A value usual at this hour on the other kind of day is not a spike or dip either (so
# the first weekends, before their profile has learnt, are judged no worse than without one; a
# working day without its rush hour is excused too). Off here, on in the processor
# (ProcessorSettings.weekend_profiles): a weekend profile needs weekends to learn from, and the NAB
# recordings are one to two weeks long (bench/nab prints both: 73.2 without, 70.9 with; 67.6
# before the other kind of day could excuse a value).
DEFAULT_PARAMS = np.array([30.0, 0.02, 0.1, 5.0, 0.3, 0.01, 3.0, 4.0, 12.0, 0.05, 4.0, 1.0, 1.0, 1.0, 0.0,
                           0.2, 100.0, 0.2, 0.0, 0.001, 0.003, 0.5, 0.3, 2.0, 2.0, 0.0, 0.0])
ALL_DETECTORS_PARAMS = DEFAULT_PARAMS.copy()
ALL_DETECTORS_PARAMS[P_W_RATE] = 1.0
ALL_DETECTORS_PARAMS[P_GAP_FACTOR] = 5.0


if config.DISABLE_JIT:  # type: ignore[attr-defined]
    def _prefetch(array: np.ndarray, row: int) -> None:
        """Without the JIT there is nothing to prefetch."""
else:
    @intrinsic
    def _prefetch(typingctx, array, row):  # type: ignore[no-untyped-def]
        """Ask the CPU to start loading `array[row]` into cache (LLVM's prefetch: numba has no API).

        The detector touches a different series' state on almost every reading, so with 10,000 series
        each reading waits on memory; loading a dozen readings ahead hides most of that wait.
        """
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            array_struct = context.make_array(signature.args[0])(context, builder, args[0])
            row_stride = cgutils.unpack_tuple(builder, array_struct.strides)[0]
            address = builder.gep(builder.bitcast(array_struct.data, cgutils.voidptr_t),
                                  [builder.mul(args[1], row_stride)])
            i32 = ir.IntType(32)
            signature_ir = ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t, i32, i32, i32])
            fn = builder.module.declare_intrinsic("llvm.prefetch", [cgutils.voidptr_t], signature_ir)
            # read, high temporal locality, data cache
            builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return types.void(array, row), codegen


# error_model="numpy": a float division by zero gives inf or NaN instead of raising. Every division
# here is guarded or has a positive divisor, and the Python model's zero check on each one cost the
# detector 10-20% of its throughput (bench.processing --only kernels, same scores and reasons).
kernel = njit(cache=True, error_model="numpy")


@kernel
def _profile_slot(t_ms: float, offset_ms: float, weekends: bool) -> int:
    """The slot of the series' hour-of-day profile that an event time falls in: its UTC hour (0-23),
    plus 24 on a weekend by local time (UTC + `offset_ms`)."""
    # Integer divisions by constants (a multiply and a shift); a float // is a library call.
    hour = int((np.int64(t_ms) // 3_600_000) % HOURS)
    if weekends and (np.int64(t_ms + offset_ms) // DAY_MS + 3) % 7 >= 5:  # day 0 (1970-01-01) was a Thursday
        return hour + HOURS
    return hour


@kernel
def _profile_row(s: int, slot: int, n_series: int) -> int:
    """The row of series `s`'s profile slot in the (DAY_KINDS * series * HOURS, 3) view of the profiles."""
    return ((slot // HOURS) * n_series + s) * HOURS + slot % HOURS


@kernel
def _robust_scale(mad: float, eps: float) -> float:
    """A spread to divide distances by: the MAD scaled to a normal distribution's standard deviation
    (times 1.4826), kept above zero by `eps` for a series that has not varied."""
    return 1.4826 * mad + eps


@kernel
def _score(z: float, floor: float, scale: float) -> float:
    """Map a robust z-like distance to [0, 1): 0 up to `floor`, 0.5 at `floor + scale`."""
    excess = z - floor
    if excess <= 0.0:
        return 0.0
    return excess / (excess + scale)


@kernel
def detect_batch(series: np.ndarray, ts: np.ndarray, values: np.ndarray, low: np.ndarray, high: np.ndarray,
                 measured: np.ndarray, state: np.ndarray, hourly: np.ndarray, params: np.ndarray,
                 scores: np.ndarray, reasons: np.ndarray) -> None:
    """Score each reading of the batch in order, updating `state` and `hourly` in place.

    Per series: `low`/`high` the declared physical range; `measured` how it is judged: MEASURED, a
    quantity; STATE_CODE (on/off/fault), which only the range judges: a lamp switching on is not a
    spike, and a lamp staying on is not a stuck sensor; SWITCHED, a switched load, judged as a
    quantity while on and by its range alone while off.
    """
    # Speed (bench.processing; about 2x in all): parameters and each series' state are read into
    # locals once per reading and written back once (numba cannot prove the output arrays do not
    # alias the state, so with direct indexing every store sent later state reads back to memory);
    # the state of the reading a dozen ahead is prefetched; a score's division is done only when
    # the score can be above 0.
    warmup = params[P_WARMUP]
    alpha = params[P_ALPHA]
    hour_alpha = params[P_HOUR_ALPHA]
    hour_warmup = params[P_HOUR_WARMUP]
    fast_alpha = params[P_FAST_ALPHA]
    slow_alpha = params[P_SLOW_ALPHA]
    z_floor = params[P_Z_FLOOR]
    z_scale = params[P_Z_SCALE]
    stuck_min = params[P_STUCK_MIN]
    rate_alpha = params[P_RATE_ALPHA]
    clip = params[P_CLIP]
    w_spike = params[P_W_SPIKE]
    w_shift = params[P_W_SHIFT]
    w_stuck = params[P_W_STUCK]
    w_rate = params[P_W_RATE]
    quiet_level = params[P_QUIET_LEVEL]
    quiet_points = params[P_QUIET_POINTS]
    quiet_margin = params[P_QUIET_MARGIN]
    gap_factor = params[P_GAP_FACTOR]
    routine_alpha = params[P_ROUTINE_ALPHA]
    routine_rate = params[P_ROUTINE_RATE]
    routine_level = params[P_ROUTINE_LEVEL]
    repeat_below = params[P_REPEAT_BELOW]
    daily_tightness = params[P_DAILY_TIGHTNESS]
    trust_after_ms = params[P_DAILY_DAYS] * HOUR_MS  # that many days' worth of readings in the slot
    offset_ms = params[P_UTC_OFFSET_HOURS] * HOUR_MS
    weekends = params[P_WEEKENDS] != 0.0
    n_series = hourly.shape[1]
    hour_rows = hourly.reshape(DAY_KINDS * n_series * HOURS, 3)
    state_lines = state.reshape(state.shape[0] * STATE_COLUMNS)  # flat, to prefetch a row's second half
    count = series.shape[0]
    # Each reading's profile slot, worked out once: when its state is prefetched, a dozen readings
    # ahead, and kept for its turn (the day-of-week arithmetic is two 64-bit divisions).
    slots = np.empty(count, np.int64)
    for i in range(min(PREFETCH_AHEAD, count)):
        slots[i] = _profile_slot(ts[i], offset_ms, weekends)
    for i in range(count):
        if i + PREFETCH_AHEAD < count:
            coming = series[i + PREFETCH_AHEAD]
            # A state row is 128 bytes: two cache lines when it starts on one (the wrapper aligns the
            # array), and both are wanted. Fetching only the first left the detector waiting on the
            # second (RUN to OUTLIER_RUN): bench.processing, 18-19M against 24M readings/s.
            _prefetch(state_lines, coming * STATE_COLUMNS)
            _prefetch(state_lines, coming * STATE_COLUMNS + STATE_COLUMNS // 2)
            _prefetch(measured, coming)
            slots[i + PREFETCH_AHEAD] = _profile_slot(ts[i + PREFETCH_AHEAD], offset_ms, weekends)
            _prefetch(hour_rows, _profile_row(coming, slots[i + PREFETCH_AHEAD], n_series))
        s = series[i]
        x = values[i]
        t = ts[i]
        floor = low[s]
        if x < floor or x > high[s]:
            scores[i] = 1.0
            reasons[i] = OUT_OF_RANGE
            continue  # impossible values teach the baseline nothing
        if x <= floor and measured[s] == SWITCHED:
            # Off. Learnt from, a street light's days at zero made each dusk's switching on a spike,
            # each dawn a dip and each evening a level shift (18 false detections in a simulated day).
            # Its time still counts, so a lamp that is off is not silent.
            if state[s, COUNT] > 0.0:
                off_dt = t - state[s, LAST_TS]
                if off_dt > 0:
                    known = state[s, INTERVAL]
                    state[s, INTERVAL] = off_dt if known == 0.0 else known + 0.05 * (off_dt - known)
                state[s, LAST_TS] = t
            scores[i] = 0.0
            reasons[i] = NONE
            continue
        h = slots[i]
        hr = _profile_row(s, h, n_series)
        n = state[s, COUNT]
        if n == 0.0:
            state[s, MEAN] = x
            state[s, FAST] = x
            state[s, SLOW] = x
            state[s, LAST_VALUE] = x
            state[s, LAST_TS] = t
            state[s, COUNT] = 1.0
            hour_rows[hr, HOUR_MEAN] = x
            hour_rows[hr, HOUR_COUNT] = 1.0
            scores[i] = 0.0
            reasons[i] = NONE
            continue

        mean = state[s, MEAN]
        mad = state[s, MAD]
        fast = state[s, FAST]
        slow = state[s, SLOW]
        slow_mad = state[s, SLOW_MAD]
        last_value = state[s, LAST_VALUE]
        last_ts = state[s, LAST_TS]
        run = state[s, RUN]
        interval = state[s, INTERVAL]
        typical_rate = state[s, RATE]
        longest_run = state[s, LONGEST_RUN]
        quiet_until = state[s, QUIET_UNTIL]
        quiet_score = state[s, QUIET_SCORE]
        routine = state[s, ROUTINE]
        outlier_run = state[s, OUTLIER_RUN]
        hour_mean = hour_rows[hr, HOUR_MEAN]
        hour_mad = hour_rows[hr, HOUR_MAD]
        hn = hour_rows[hr, HOUR_COUNT]

        eps = 1e-9 + 1e-3 * abs(mean)
        scale = _robust_scale(mad, eps)

        dt = t - last_ts
        step = abs(x - last_value)
        rate = step / dt if dt > 0 else 0.0
        if last_value == x:
            run += 1.0
        else:
            if run > longest_run:
                longest_run = run  # runs this long are part of how the series behaves
            run = 0.0

        best = 0.0
        reason = NONE
        if n >= warmup and measured[s] != 0.0:
            # Divisions only where a score can be above 0 (w * d / scale > floor): most readings are normal.
            distance = abs(x - mean)
            z = -1.0  # no spike or dip can score
            centre = mean
            if daily_tightness > 0.0 and hn >= hour_warmup and hn * interval >= trust_after_ms:
                hour_scale = _robust_scale(hour_mad, eps)
                if daily_tightness * hour_scale < scale:
                    # A daily cycle that explains most of the spread: judge against this hour's usual.
                    z = abs(x - hour_mean) / hour_scale
                    centre = hour_mean
            if z < 0.0 and w_spike * distance > z_floor * scale:
                z = distance / scale
                if hn >= hour_warmup and hn * interval >= HOUR_MS:  # a day's worth
                    z_hour = abs(x - hour_mean) / _robust_scale(hour_mad, eps)
                    if z_hour < z:
                        z = z_hour  # a usual value for this hour of the day is not a spike
            if weekends and w_spike * z > z_floor:  # nor one usual at this hour on the other kind of day
                other = h - HOURS if h >= HOURS else h + HOURS
                other_row = _profile_row(s, other, n_series)
                other_n = hour_rows[other_row, HOUR_COUNT]
                if other_n >= hour_warmup and other_n * interval >= HOUR_MS:
                    other_scale = _robust_scale(hour_rows[other_row, HOUR_MAD], eps)
                    z_other = abs(x - hour_rows[other_row, HOUR_MEAN]) / other_scale
                    if z_other < z:
                        z = z_other
            if z > 0.0:
                best = _score(w_spike * z, z_floor, z_scale)
                if best > 0.0:
                    reason = SPIKE if x > centre else DIP
            undamped = best
            big = best > routine_level
            spike_ended = 1.0 if (not big and outlier_run > 0.0 and outlier_run <= SPIKE_MAX_RUN) else 0.0
            if routine_rate > 0.0 and best > 0.0:
                damp = routine_rate / (routine_rate + routine)
                best *= damp * damp  # a spike the series shows routinely surprises less
            routine += routine_alpha * (spike_ended - routine)
            outlier_run = outlier_run + 1.0 if big else 0.0
            shift_scale = _robust_scale(slow_mad, eps)
            if w_shift * abs(fast - slow) > z_floor * shift_scale:
                shift_score = _score(w_shift * (abs(fast - slow) / shift_scale), z_floor, z_scale)
                if shift_score > best:
                    best = shift_score
                    reason = LEVEL_SHIFT
            stuck_after = max(stuck_min, 2.0 * longest_run)
            if mad > eps and run >= stuck_after and x > floor:
                # As long as the usual stuck threshold: z at the floor; twice as long: z twice the floor.
                # Resting at the bottom of its range (no power, no flow, no vehicles) is not stuck.
                stuck_score = _score(w_stuck * z_floor * run / stuck_after, z_floor, z_scale)
                if stuck_score > best:
                    best = stuck_score
                    reason = STUCK
            if typical_rate > 0.0 and dt > 0 and w_rate * rate > 2.0 * z_floor * typical_rate:
                rate_score = _score(w_rate * rate / typical_rate / 2.0, z_floor, z_scale)
                if rate_score > best:
                    best = rate_score
                    reason = RATE_OF_CHANGE
            if gap_factor > 0.0 and interval > 0.0 and dt > gap_factor * interval:
                excess = dt / interval - gap_factor
                gap_score = excess / (excess + gap_factor)  # as silence_scores: 0.5 at twice the factor
                if gap_score > best:
                    best = gap_score
                    reason = DROPOUT
            would_be = max(undamped, best)  # the score were it news
            if n < quiet_until and best <= quiet_score + quiet_margin:
                best = 0.0  # the same event, already signalled
            elif best > quiet_level:
                quiet_until = n + quiet_points
                quiet_score = best
            if best == 0.0:
                reason = NONE
            if best < repeat_below <= would_be:
                reason = REPEAT
        scores[i] = best
        reasons[i] = reason

        # Update the baselines, clipping the new value so one outlier cannot drag them far.
        deviation = x - mean
        limit = clip * scale
        clipped = mean + min(max(deviation, -limit), limit) if n >= warmup else x
        state[s, MEAN] = mean + alpha * (clipped - mean) if n >= warmup else mean + (x - mean) / (n + 1.0)
        state[s, MAD] = mad + (alpha if n >= warmup else 1.0 / (n + 1.0)) * (abs(clipped - mean) - mad)
        state[s, FAST] = fast + fast_alpha * (clipped - fast)
        state[s, SLOW] = slow + slow_alpha * (clipped - slow)
        state[s, SLOW_MAD] = slow_mad + slow_alpha * (abs(clipped - slow) - slow_mad)
        if hn <= 0:
            hour_mean = x
        # The hour's profile learns at hour_alpha per hour of readings, not per reading: it then
        # remembers days (about ten) whatever the reporting interval, so its spread says how well
        # this hour of the day is predicted from other days, not how alike a few minutes are.
        slot_alpha = hour_alpha * min(1.0, interval / HOUR_MS) if interval > 0.0 else hour_alpha
        a = slot_alpha if hn >= 1.0 / slot_alpha else 1.0 / (hn + 1.0)
        hour_rows[hr, HOUR_MAD] = hour_mad + a * (abs(x - hour_mean) - hour_mad)
        hour_rows[hr, HOUR_MEAN] = hour_mean + a * (x - hour_mean)
        hour_rows[hr, HOUR_COUNT] = hn + 1.0
        if dt > 0:
            interval = dt if interval == 0.0 else interval + 0.05 * (dt - interval)
            typical_rate = rate if typical_rate == 0.0 else typical_rate + rate_alpha * (rate - typical_rate)
        state[s, RUN] = run
        state[s, LONGEST_RUN] = longest_run
        state[s, INTERVAL] = interval
        state[s, RATE] = typical_rate
        state[s, QUIET_UNTIL] = quiet_until
        state[s, QUIET_SCORE] = quiet_score
        state[s, ROUTINE] = routine
        state[s, OUTLIER_RUN] = outlier_run
        state[s, LAST_VALUE] = x
        state[s, LAST_TS] = t
        state[s, COUNT] = n + 1.0


@kernel
def inspect_batch(series: np.ndarray, ts: np.ndarray, values: np.ndarray, n_series: int) -> tuple[int, bool]:
    """How many readings have a non-finite time or value, and whether every series id is below
    `n_series` and not negative: the wrapper's checks in one pass (as NumPy calls they cost a
    sixth of the detector's time on 10,000-reading batches)."""
    nonfinite = 0
    ids_ok = True
    for i in range(series.shape[0]):
        if not (np.isfinite(ts[i]) and np.isfinite(values[i])):
            nonfinite += 1
        if series[i] < 0 or series[i] >= n_series:
            ids_ok = False
    return nonfinite, ids_ok


@kernel
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


@kernel
def minute_partials(series: np.ndarray, ts: np.ndarray, values: np.ndarray, width_ms: float,
                    out_series: np.ndarray, out_bucket: np.ndarray, out_stats: np.ndarray) -> int:
    """Tumbling-window partials of a batch: one row per (series, window) in `out_*`, in order of
    each window's first reading; returns the row count.

    `out_stats` columns: n, sum, sum of squares, min, max, first time, first value, last time, last
    value (the same mergeable partials as the agg_1m table). Outputs must hold len(series) rows.
    One pass in arrival order: each series keeps a chain of its rows, newest first, so a reading
    finds its window in a step or two (readings mostly arrive in time order). Sorting the batch by
    (series, window) instead cost 13x more (bench.processing).
    """
    n = series.shape[0]
    if n == 0:
        return 0
    newest_row = np.full(series.max() + 1, -1, np.int64)  # per series: its newest row in this batch
    older_row = np.empty(n, np.int64)  # per row: the same series' row before it, -1 at the end
    rows = 0
    for i in range(n):
        s = series[i]
        x = values[i]
        t = ts[i]
        bucket = np.floor(t / width_ms) * width_ms
        r = newest_row[s]
        while r >= 0 and out_bucket[r] != bucket:
            r = older_row[r]
        if r < 0:
            r = rows
            rows += 1
            older_row[r] = newest_row[s]
            newest_row[s] = r
            out_series[r] = s
            out_bucket[r] = bucket
            out_stats[r, 0] = 1.0
            out_stats[r, 1] = x
            out_stats[r, 2] = x * x
            out_stats[r, 3] = x
            out_stats[r, 4] = x
            out_stats[r, 5] = t
            out_stats[r, 6] = x
            out_stats[r, 7] = t
            out_stats[r, 8] = x
            continue
        out_stats[r, 0] += 1.0
        out_stats[r, 1] += x
        out_stats[r, 2] += x * x
        if x < out_stats[r, 3]:
            out_stats[r, 3] = x
        if x > out_stats[r, 4]:
            out_stats[r, 4] = x
        if t < out_stats[r, 5]:
            out_stats[r, 5] = t
            out_stats[r, 6] = x
        if t >= out_stats[r, 7]:  # equal times: the later arrival is the last value
            out_stats[r, 7] = t
            out_stats[r, 8] = x
    return rows
