"""Streaming anomaly detectors as numba kernels over a micro-batch. No I/O, no clocks, no dicts.

Every kernel walks a batch of readings in order (dense series id, event time in epoch ms, value),
updates per-series state in place and writes a score in [0, 1] (high means anomalous, 0 while
warming up) and a reason code. State is one float64 array per concern, indexed by series id, so a
snapshot is a copy of arrays and a restore is exact. NaN handling is decided by the wrapper
(`processing.detect`); the kernels see finite values only.

`detect_batch` is a short loop over one small function per detector, each a pure function of a
series' state (scalars) and the parameters, inlined by numba:
- `_baseline`: a robust running baseline, an exponentially weighted mean and mean absolute
  deviation with outlier clipping (after Hampel's robust statistics), and `_hour_profile`, the same
  per hour of the day (and per kind of day: working day or weekend);
- `_distance` and `_spike_or_dip`: the distance from that baseline, judged against the hour-of-day
  profile where a daily cycle explains the spread, excused where it is usual for the hour (or for
  the hour on the other kind of day, `_distance_on_the_other_day`); `_routine_damping` scores a spike
  the series shows routinely less (in the spirit of HTM's anomaly likelihood);
- `_level_shift`: a fast/slow mean crossover (an EW CUSUM in spirit);
- `_stuck`: runs of identical values longer than twice any the series has shown before (so a
  square wave is not "stuck");
- `_rate_of_change`: the absolute rate of change against its own running typical rate;
- `_gap`: a reading that ends a silence much longer than the series' usual interval;
- `_likelihood`: Numenta's anomaly likelihood (Ahmad et al. 2017), optional (`likelihood`): the
  raw score reported as how improbable its recent mean is against that series' own history of it,
  so one threshold means the same on every series;
- `_repeats`: one event, one signal (a quiet period after a signal), and REPEAT for what would have
  been an anomaly but is not news.
`relation_batch` judges pairs of a device's metrics that keep a physical relation (PM2.5 a share of
PM10, LAeq below LAmax): an EWMA chart of the residual finds a drifting sensor as its drift builds.
Declared physical ranges are checked first; on a timer, `silence_scores` finds silences while they
last. `minute_partials` and `merge` are the mergeable one-minute aggregates.
The parameters are one table, `PARAMETERS`: name, default and meaning of each.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import config, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# Reason codes, stable: stored with anomalies and shown to operators.
# REPEAT marks a reading that would have scored `repeat_below` (the processor's anomaly threshold)
# or more but does not because it is not news: inside the quiet period of an event already
# signalled, or damped as a spike the series shows routinely. It is not an anomaly, but it is not
# normal either: the processor keeps the metric's open alert from clearing itself while they go on.
# INCONSISTENT: two metrics of one device that keep a physical relation no longer do (`relation_batch`).
NONE, SPIKE, DIP, LEVEL_SHIFT, STUCK, RATE_OF_CHANGE, OUT_OF_RANGE, DROPOUT, REPEAT, INCONSISTENT = range(10)
REASONS = (
    "none",
    "spike",
    "dip",
    "level_shift",
    "stuck",
    "rate_of_change",
    "out_of_range",
    "dropout",
    "repeat",
    "inconsistent",
)

# Columns of the per-series state array.
(
    COUNT,
    MEAN,
    MAD,
    FAST,
    SLOW,
    SLOW_MAD,
    LAST_VALUE,
    LAST_TS,
    RUN,
    INTERVAL,
    RATE,
    LONGEST_RUN,
    QUIET_UNTIL,
    QUIET_SCORE,
    ROUTINE,
    OUTLIER_RUN,
    LL_SHORT,
    LL_MEAN,
    LL_VAR,
    LL_REASON,
    LL_COUNT,
    LL_SHIFT_SHORT,
    LL_SHIFT_MEAN,
    LL_SHIFT_VAR,
    LEAN,
) = range(25)
# 25 columns: a row is 200 bytes, four cache lines or five wherever it starts; the columns from
# LL_SHORT on, LEAN last, are read only under the likelihood (docs/processing.md, "Kernel speed").
STATE_COLUMNS = 25
HOURS = 24
# The profile has a day of hours for working days and another for weekends (local Saturday and
# Sunday). Its array is (2, series, HOURS, 3), working days first: each kind of day's profiles lie
# together, so a stream touches half as much memory as with both side by side per series.
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
# A relation series (`relation_batch`): two metrics of one device, the primary predicted from the
# reference as a share of it (PM2.5 of PM10) or at an offset from it (LAeq below LAmax). Only the
# relation kernel judges it; `detect_batch` never sees one.
RELATION_RATIO, RELATION_OFFSET = 3.0, 4.0
# A relation series' state row reuses the columns COUNT, LAST_TS (for eviction),
# QUIET_UNTIL and QUIET_SCORE, and these:
REL_PRIMARY = MEAN  # EW mean of the primary as learnt (ratio), or of primary - reference (offset)
REL_REFERENCE = SLOW  # EW mean of the reference (ratio)
REL_SPREAD = MAD  # EW mean absolute residual, as learnt
REL_CHART = FAST  # the EWMA chart: EW mean of the standardised residuals
REL_CHART_VAR = SLOW_MAD  # the chart's own in-control variance
# A standardised residual enters the chart clipped to this many spreads (one wild reading moves the
# chart by at most this times its rate); the relation learns a reading as at most
# RELATION_LEARN_CLIP spreads from its prediction (Huber), so an anomaly barely teaches it and it
# never locks on a reference that no longer holds; the chart's variance learns from at most 2 of its
# own standard deviations (which biases it low by about 10% on Gaussian residuals, 5% in its
# standard deviation, in the steady state).
RELATION_INPUT_CLIP = 5.0
RELATION_LEARN_CLIP = 3.0
RELATION_CHART_LEARN_CLIP = 2.0
# Mean absolute deviation to standard deviation on Gaussian residuals: sqrt(pi / 2).
MEAN_ABS_TO_SD = 1.2533141373155003
# A stuck run scores as a distance of this many robust scales at its onset, twice it at twice the
# length: the raw detectors' floor, so a stuck run is news at once without a likelihood, and a graded
# raw score under one (where the floor is 0).
STUCK_ONSET_Z = 3.0
SPIKE_MAX_RUN = 3.0  # readings: a longer excursion is a change of level, not a spike
# The robust scale's floor (`_scale_floor`): relative to the series' level at float64's rounding
# times 1e4, and an absolute floor that only keeps a series resting at exactly 0 from dividing by 0.
SCALE_FLOOR_RELATIVE = 1e-12
SCALE_FLOOR_ABSOLUTE = 1e-30
PREFETCH_AHEAD = 12  # readings ahead whose state is fetched into cache (docs/processing.md)
HOUR_MEAN, HOUR_MAD, HOUR_COUNT = range(3)


class Param(NamedTuple):
    """One detector parameter: its name (a field of `Params`), its default and what it means."""

    name: str
    default: float
    meaning: str


# The parameters, in the order of the float64 array `Detectors.params` (and of checkpoints: a new
# parameter goes at the end, and older checkpoints get its default). Where the defaults come from
# (bench/nab, simulated days and weeks): docs/processing.md, "How we got here".
PARAMETERS: tuple[Param, ...] = (
    Param("warmup", 30.0, "readings a series is learnt from before it is judged"),
    Param("alpha", 0.02, "EW rate of the baseline's mean and MAD, per reading"),
    Param("hour_alpha", 0.1, "EW rate of an hour's profile, per hour of readings in it (about ten days)"),
    Param("hour_warmup", 5.0, "readings an hour's profile needs before it counts"),
    Param("fast_alpha", 0.3, "EW rate of the fast mean (level shifts)"),
    Param("slow_alpha", 0.01, "EW rate of the slow mean and its MAD (level shifts)"),
    Param("z_floor", 3.0, "robust z (weighted) up to which a detector scores 0"),
    Param("z_scale", 4.0, "z above the floor at which a detector scores 0.5"),
    Param("stuck_min", 12.0, "the shortest run of identical readings that can be stuck"),
    Param("rate_alpha", 0.05, "EW rate of the typical rate of change"),
    Param("clip", 4.0, "robust scales a value is clipped to before the baselines learn it"),
    Param("w_spike", 1.0, "weight of spikes and dips (0 turns the detector off)"),
    Param("w_shift", 1.0, "weight of level shifts (0: off)"),
    Param("w_stuck", 1.0, "weight of stuck runs (0: off)"),
    Param("w_rate", 0.0, "weight of the rate of change (off: big single steps are ordinary on NAB)"),
    Param("quiet_level", 0.2, "a score above this starts a quiet period: one event, one signal"),
    Param("quiet_points", 100.0, "readings a quiet period lasts past an event's latest anomalous reading"),
    Param("quiet_margin", 0.2, "how far a score must rise above the signalled one to break the quiet"),
    Param("gap_factor", 0.0, "a reading after more than this many usual intervals is a dropout (0: off)"),
    Param("routine_alpha", 0.001, "EW rate of a series' rate of routine spikes (a memory of ~1,000 readings)"),
    Param("routine_rate", 0.003, "a spike is scaled by (r / (r + rate))^2, r this (0: no damping)"),
    Param("routine_level", 0.5, "a spike scoring above this counts towards the routine rate"),
    Param("repeat_below", 0.3, "below this (the anomaly threshold) a score that would be above is a REPEAT"),
    Param("daily_tightness", 2.0, "an hour spread under 1/this of the series' judges by the hour (0: off)"),
    Param("daily_days", 2.0, "days' worth of readings an hour's profile needs to judge by the hour"),
    Param("utc_offset_hours", 0.0, "local time, for weekends: UTC plus this"),
    Param("weekends", 0.0, "1: Saturdays and Sundays have a profile of their own"),
    Param(
        "likelihood",
        0.0,
        "1: report the anomaly likelihood of the highest raw score (Ahmad et al. 2017); 2: of"
        " spikes and of level shifts each, the higher (an ensemble); 0: raw scores",
    ),
    Param("likelihood_short", 10.0, "readings in the likelihood's short window (its span: EW rate 2/(this+1))"),
    Param("likelihood_long", 8640.0, "readings in the likelihood's long window (its span, as the short one)"),
    Param("likelihood_learning", 288.0, "raw scores the likelihood learns from before it reports"),
    Param(
        "learning_floor",
        3.0,
        "while the likelihood learns, a raw score is reported as it would be with this z floor (the raw"
        " detectors' own), when `z_floor` is lower",
    ),
    Param(
        "raw_points",
        1.0,
        "1: under the likelihood, spikes and dips are also judged as the raw detectors judge them (at"
        " `learning_floor`): one reading barely moves the likelihood's short mean",
    ),
    Param("relation_span", 30.0, "readings in a relation's EWMA chart (its span: EW rate 2/(this+1))"),
    Param("relation_memory", 1440.0, "readings a relation's coefficient and spreads remember (EW rate 1/this)"),
    Param("relation_warmup", 120.0, "paired readings a relation learns from before it is judged"),
    Param(
        "likelihood_interval_ms",
        300_000.0,
        "the reporting interval the likelihood's windows are counted at (Numenta's 5 minutes): a series"
        " reporting faster keeps them in time (50 minutes, 30 days, a day); 0: counted in readings",
    ),
)
PARAM_NAMES = tuple(p.name for p in PARAMETERS)


class Params(NamedTuple):
    """The parameters as the kernel takes them, passed by value: a field per row of PARAMETERS, in
    its order (`Params(*params_array)`)."""

    warmup: float
    alpha: float
    hour_alpha: float
    hour_warmup: float
    fast_alpha: float
    slow_alpha: float
    z_floor: float
    z_scale: float
    stuck_min: float
    rate_alpha: float
    clip: float
    w_spike: float
    w_shift: float
    w_stuck: float
    w_rate: float
    quiet_level: float
    quiet_points: float
    quiet_margin: float
    gap_factor: float
    routine_alpha: float
    routine_rate: float
    routine_level: float
    repeat_below: float
    daily_tightness: float
    daily_days: float
    utc_offset_hours: float
    weekends: float
    likelihood: float
    likelihood_short: float
    likelihood_long: float
    likelihood_learning: float
    learning_floor: float
    raw_points: float
    relation_span: float
    relation_memory: float
    relation_warmup: float
    likelihood_interval_ms: float


if Params._fields != PARAM_NAMES:
    raise ImportError("Params must have PARAMETERS' names, in their order")


def param_index(name: str) -> int:
    """Where parameter `name` sits in a params array."""
    return PARAM_NAMES.index(name)


def params_with(**changes: float) -> np.ndarray:
    """The defaults as a float64 params array (what `Detectors` takes), with `changes` by name."""
    unknown = set(changes) - set(PARAM_NAMES)
    if unknown:
        raise ValueError(f"unknown detector parameters: {sorted(unknown)}")
    return np.array([float(changes.get(p.name, p.default)) for p in PARAMETERS])


# Indices of the parameters the processor's settings and the tests set.
P_WARMUP = param_index("warmup")
P_QUIET_LEVEL = param_index("quiet_level")
P_QUIET_POINTS = param_index("quiet_points")
P_W_RATE = param_index("w_rate")
P_GAP_FACTOR = param_index("gap_factor")
P_ROUTINE_RATE = param_index("routine_rate")
P_REPEAT_BELOW = param_index("repeat_below")
P_DAILY_TIGHTNESS = param_index("daily_tightness")
P_UTC_OFFSET_HOURS = param_index("utc_offset_hours")
P_WEEKENDS = param_index("weekends")
P_LIKELIHOOD = param_index("likelihood")

DEFAULT_PARAMS = params_with()
# Every detector on: the rate of change, and dropouts seen in event time.
ALL_DETECTORS_PARAMS = params_with(w_rate=1.0, gap_factor=5.0)
# The raw detectors calibrated by the anomaly likelihood (`_likelihood`): what the processor runs.
# - The likelihood judges how unusual a series' recent surprise is against its own history, so its
#   input must be graded: the z floor is 0 (every distance scores a little; Numenta feeds it HTM's
#   prediction error, which is seldom exactly 0). With the raw floor of 3 it sees zeros almost
#   always, and any blip past the floor is red (docs/processing.md, "Anomaly likelihood").
# - The rate of change is on: a reading far from the one before is one more kind of surprise, and
#   the likelihood discounts it on a series where big steps are ordinary (the reason it was off raw).
# - Routine-spike damping is off: it asks the likelihood's question ("does this series usually
#   score like this?") with a rate fitted on bench.nab; the likelihood answers it per series.
LIKELIHOOD_PARAMS = params_with(likelihood=1.0, routine_rate=0.0, z_floor=0.0, w_rate=1.0)
# The parameters the likelihood sets (the processor applies them over its other settings).
LIKELIHOOD_SETS = ("likelihood", "routine_rate", "z_floor", "w_rate")
# An ensemble through the likelihood: spikes and level shifts each calibrated against their own
# history, so a series whose level often shifts does not mute its spikes, nor routine spikes its
# level shifts; stuck runs, rates and gaps are already judged against the series' own history.
ENSEMBLE_PARAMS = params_with(likelihood=2.0, routine_rate=0.0)
# The anomaly likelihood's lower bounds on the long window's mean and variance of averaged raw
# scores, from Numenta's `estimateNormal` (nupic/htm.core anomaly_likelihood.py, used by NAB):
# a series that almost never scores would otherwise turn the slightest blip red.
LIKELIHOOD_MIN_MEAN = 0.03
LIKELIHOOD_MIN_VARIANCE = 0.0003
# NAB's log scale (`computeLogLikelihood`): log(1.0000000001 - L) / log(1 - 0.9999999999), so a
# tail probability of 1e-5 (Numenta's red, L = 1 - 1e-5) scores 0.5 and 1e-10 or less scores 1.
LIKELIHOOD_EPSILON = 1e-10

# Columns of a one-minute partial (minute_partials, merge): the agg_1m table's, mergeable.
(AGG_N, AGG_SUM, AGG_SUM_SQ, AGG_MIN, AGG_MAX, AGG_FIRST_TS, AGG_FIRST_VALUE, AGG_LAST_TS, AGG_LAST_VALUE) = range(9)
AGG_COLUMNS = 9


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
            row_stride = cgutils.unpack_tuple(builder, array_struct.strides)[0]  # type: ignore[no-untyped-call]
            address = builder.gep(
                builder.bitcast(array_struct.data, cgutils.voidptr_t), [builder.mul(args[1], row_stride)]
            )
            i32 = ir.IntType(32)
            signature_ir = ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t, i32, i32, i32])
            fn = builder.module.declare_intrinsic("llvm.prefetch", [cgutils.voidptr_t], signature_ir)
            # read, high temporal locality, data cache
            builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return types.void(array, row), codegen


# error_model="numpy": a float division by zero gives inf or NaN instead of raising. Every division
# here is guarded or has a positive divisor, and the Python model's zero check cost 10-20%.
kernel = njit(cache=True, error_model="numpy")
# A detector's helper: inlined into the loop that calls it (numba IR), so it costs no call. Helpers
# take scalars, not arrays: an array passed to an inlined function is reference-counted at each
# call, which cost the kernels 20-55% (docs/processing.md, "How we got here").
helper = njit(cache=True, error_model="numpy", inline="always")


@helper
def _profile_slot(t_ms: float, offset_ms: float, weekends: bool) -> int:
    """The slot of the series' hour-of-day profile that an event time falls in: its UTC hour (0-23),
    plus 24 on a weekend by local time (UTC + `offset_ms`)."""
    # Integer divisions by constants (a multiply and a shift); a float // is a library call.
    hour = int((np.int64(t_ms) // 3_600_000) % HOURS)
    if weekends and (np.int64(t_ms + offset_ms) // DAY_MS + 3) % 7 >= 5:  # day 0 (1970-01-01) was a Thursday
        return hour + HOURS
    return hour


@helper
def _profile_row(s: int, slot: int, n_series: int) -> int:
    """The row of series `s`'s profile slot in the (DAY_KINDS * series * HOURS, 3) view of the profiles."""
    return ((slot // HOURS) * n_series + s) * HOURS + slot % HOURS


@helper
def _scale_floor(mean: float) -> float:
    """The least spread a series is judged in, for one that has not varied: float64's rounding at
    the series' level (times 1e4, SCALE_FLOOR_RELATIVE), so a reading differing from a constant
    series only by the rounding of a unit conversion is not news, while any real move is. It scales
    with the units and no offset that leaves the series' spread above it moves it, so neither
    changes an anomaly (docs/processing.md, "A series' units": a floor of 0.1% of the mean did). A
    series resting at exactly 0 has no level to round at: any reading off 0 is news there, however
    small, so a difference of two large readings should be rounded where it is made."""
    return SCALE_FLOOR_RELATIVE * abs(mean) + SCALE_FLOOR_ABSOLUTE


@helper
def _clipped(x: float, n: float, mean: float, scale: float, p: Params) -> float:
    """`x` as the baseline learns it: clipped to `clip` robust scales of the mean once warm, so one
    outlier cannot drag the baseline far."""
    if n < p.warmup:
        return x
    limit = p.clip * scale
    return mean + min(max(x - mean, -limit), limit)


@helper
def _lean(x: float, n: float, mean: float, lean: float, scale: float, p: Params) -> float:
    """The baseline's lean after learning `x`: the EW mean (at the baseline's own rate, an exact
    running mean while warming up) of the signed deviation from its mean of `x` as the baseline
    learns it (`_clipped`). A mean lags a series that moves, so while it rises the deviations lean
    up, and the readings on that side sit further from the mean than its spread says."""
    rate = p.alpha if n >= p.warmup else 1.0 / (n + 1.0)
    return lean + rate * (_clipped(x, n, mean, scale, p) - mean - lean)


@helper
def _robust_scale(mad: float, eps: float) -> float:
    """A spread to divide distances by: the MAD scaled to a normal distribution's standard deviation
    (times 1.4826), kept above zero by `eps` for a series that has not varied."""
    return 1.4826 * mad + eps


@helper
def _score(z: float, floor: float, scale: float) -> float:
    """Map a robust z-like distance to [0, 1]: 0 up to `floor`, 0.5 at `floor + scale`, 1 only for a
    distance past a double's range (or one so large that the ratio rounds to 1)."""
    excess = z - floor
    if excess <= 0.0:
        return 0.0
    if excess == math.inf:  # a distance past a double's range (1e300 after a series resting at 0)
        return 1.0
    return excess / (excess + scale)


@helper
def _distance(
    x: float,
    mean: float,
    scale: float,
    eps: float,
    interval: float,
    hour_mean: float,
    hour_mad: float,
    hn: float,
    p: Params,
) -> tuple[float, float]:
    """How far `x` is from its usual level, as a robust z (-1: too close to score), and that level.

    The usual level is the baseline's, or this hour's where a daily cycle explains most of the
    spread (the hour's profile holds `daily_days` days of readings and its spread is under
    1/`daily_tightness` of the series'); a value usual for this hour of the day is not far.
    """
    # Divisions only where a score can be above 0 (w * d / scale > floor): most readings are normal.
    if p.daily_tightness > 0.0 and hn >= p.hour_warmup and hn * interval >= p.daily_days * HOUR_MS:
        hour_scale = _robust_scale(hour_mad, eps)
        if p.daily_tightness * hour_scale < scale:
            # A daily cycle that explains most of the spread: judge against this hour's usual.
            return abs(x - hour_mean) / hour_scale, hour_mean
    distance = abs(x - mean)
    if p.w_spike * distance > p.z_floor * scale:
        z = distance / scale
        if hn >= p.hour_warmup and hn * interval >= HOUR_MS:  # a day's worth
            z_hour = abs(x - hour_mean) / _robust_scale(hour_mad, eps)
            if z_hour < z:
                z = z_hour  # a usual value for this hour of the day is not a spike
        return z, mean
    return -1.0, mean


@helper
def _distance_on_the_other_day(
    x: float, eps: float, interval: float, other_mean: float, other_mad: float, other_n: float, p: Params
) -> float:
    """How far `x` is from this hour's usual on the other kind of day (weekend or working day), in
    that hour's spread; inf until that profile holds an hour of readings. A distance is taken as
    the lesser of its own and this one: a value usual at this hour on the other day is not far."""
    if other_n >= p.hour_warmup and other_n * interval >= HOUR_MS:
        return abs(x - other_mean) / _robust_scale(other_mad, eps)
    return math.inf


@helper
def _spike_or_dip(z: float, x: float, centre: float, p: Params) -> tuple[float, int]:
    """Score and reason (SPIKE, DIP or NONE) of a distance `z` from the usual level `centre`."""
    if z > 0.0:
        score = _score(p.w_spike * z, p.z_floor, p.z_scale)
        if score > 0.0:
            return score, SPIKE if x > centre else DIP
    return 0.0, NONE


@helper
def _routine_damping(score: float, routine: float, outlier_run: float, p: Params) -> tuple[float, float, float]:
    """A spike the series shows routinely surprises less: the score scaled by (r / (r + routine))^2,
    r = `routine_rate`; and the series' new routine rate and outlier run. ROUTINE is the running
    rate (EW, `routine_alpha`) of big outliers (above `routine_level`) that came and went within
    SPIKE_MAX_RUN readings: a longer run is a change of level, not a spike."""
    big = score > p.routine_level
    spike_ended = 1.0 if (not big and outlier_run > 0.0 and outlier_run <= SPIKE_MAX_RUN) else 0.0
    if p.routine_rate > 0.0 and score > 0.0:
        damp = p.routine_rate / (p.routine_rate + routine)
        score *= damp * damp
    routine += p.routine_alpha * (spike_ended - routine)
    outlier_run = outlier_run + 1.0 if big else 0.0
    return score, routine, outlier_run


@helper
def _level_shift(fast: float, slow: float, slow_mad: float, eps: float, p: Params) -> float:
    """The fast mean's distance from the slow one, in the slow mean's robust spread, as a score."""
    shift_scale = _robust_scale(slow_mad, eps)
    if p.w_shift * abs(fast - slow) > p.z_floor * shift_scale:
        return _score(p.w_shift * (abs(fast - slow) / shift_scale), p.z_floor, p.z_scale)
    return 0.0


@helper
def _stuck(run: float, longest_run: float, mad: float, eps: float, x: float, floor: float, p: Params) -> float:
    """A run of identical readings as long as `stuck_min`, and twice the longest the series has shown
    before, in a series that usually moves: z at the floor at that length, twice the floor at twice
    it. Resting at the bottom of its range (no power, no flow, no vehicles) is not stuck."""
    stuck_after = max(p.stuck_min, 2.0 * longest_run)
    if mad > eps and run >= stuck_after and x > floor:
        return _score(p.w_stuck * STUCK_ONSET_Z * run / stuck_after, p.z_floor, p.z_scale)
    return 0.0


@helper
def _rate_of_change(rate: float, typical_rate: float, dt: float, p: Params) -> float:
    """The absolute rate of change against the series' typical rate, as a score (at half weight)."""
    if typical_rate > 0.0 and dt > 0 and p.w_rate * rate > 2.0 * p.z_floor * typical_rate:
        return _score(p.w_rate * rate / typical_rate / 2.0, p.z_floor, p.z_scale)
    return 0.0


@helper
def _gap(dt: float, interval: float, p: Params) -> float:
    """A reading that ends a silence longer than `gap_factor` usual intervals (event time): 0.5 at
    twice the factor, as silence_scores."""
    if p.gap_factor > 0.0 and interval > 0.0 and dt > p.gap_factor * interval:
        excess = dt / interval - p.gap_factor
        return excess / (excess + p.gap_factor)
    return 0.0


@helper
def _refloored(raw: float, p: Params) -> float:
    """A raw score made with the floor `z_floor`, as it would be with the higher `learning_floor`.
    Spikes, dips, level shifts, stuck runs and rates all map a distance z to excess / (excess +
    z_scale), excess = z - floor, so the distance is recovered exactly and judged again."""
    if p.learning_floor <= p.z_floor or raw <= 0.0:
        return raw
    if raw >= 1.0:  # a distance past a double's range, or one whose ratio rounds to 1
        return 1.0
    z = p.z_floor + p.z_scale * raw / (1.0 - raw)
    return _score(z, p.learning_floor, p.z_scale)


@helper
def _likelihood(
    raw: float,
    reason: int,
    k: float,
    short: float,
    mean: float,
    var: float,
    last_reason: float,
    interval: float,
    p: Params,
) -> tuple[float, int, float, float, float, float]:
    """Numenta's anomaly likelihood (Ahmad, Lavin, Purdy, Agha, "Unsupervised real-time anomaly
    detection for streaming data", Neurocomputing 262, 2017; NAB's `anomaly_likelihood`) over the
    raw score `raw` of the `k`-th reading it judges (0 for the first; counted apart from the
    series' readings, so a checkpoint from before the likelihood, or a series that ran without it,
    starts it learning): how improbable the short-run
    mean of the raw scores is against the long-run distribution of that mean, as NAB's log score
    (LIKELIHOOD_EPSILON). So a score means the same on every series, whatever its raw detectors'
    usual level, and one threshold transfers. Returns the score, its reason (that of the newest
    raw score above 0) and the new state: short mean, long mean and variance, last reason.

    Both windows are exponential moments, not rings: Numenta keeps 10 raw scores and 8,640 averaged
    ones (69 KB a series, 6.9 GB at 100,000 series); here five numbers (eight for the ensemble).
    The EW rate of a span of N readings is 2/(N+1), whose readings have the window's mean age
    (pandas' `span`). The long
    moments are exact running means until that rate is reached, and incremental EW variance after
    Finch ("Incremental calculation of weighted mean and variance", 2009). The tail is the upper
    one only (Numenta mirrors below the mean; an unusually quiet detector is not an anomaly) and
    exact (`erfc`, where Numenta rounds to a table of 0.1 standard deviations). During the first
    `likelihood_learning` raw scores (Numenta's 288-record learning period) the raw score is
    reported as it is: Numenta reports nothing there (0.5) because HTM itself is still learning,
    while these detectors are warm after `warmup` readings, and a new sensor must alert from its
    first day.

    Numenta's windows are counted in records of NAB's usual 5 minutes (`likelihood_interval_ms`):
    50 minutes, 30 days and a day. A series whose usual `interval` is shorter keeps them in time (one
    a minute averages fifty readings and learns for a day, 1,440); one reporting every 5 minutes or
    slower keeps Numenta's counts, never fewer readings.
    """
    readings = 1.0  # of this series' interval in one of the windows' records
    if p.likelihood_interval_ms > 0.0 and interval > 0.0:
        readings = max(1.0, p.likelihood_interval_ms / interval)
    short_span = max(1.0, p.likelihood_short * readings)
    learning = p.likelihood_learning * readings
    short = raw if k <= 0.0 else short + 2.0 / (short_span + 1.0) * (raw - short)
    if raw > 0.0:
        last_reason = float(reason)
    score = _refloored(raw, p)  # until the likelihood has learnt: the raw score, as the raw detectors judge
    if k >= learning:
        score = 0.0
        centre = max(mean, LIKELIHOOD_MIN_MEAN)
        z = (short - centre) / math.sqrt(max(var, LIKELIHOOD_MIN_VARIANCE))
        if z > 0.0:  # at or below the usual mean the log score is under 0.03: nothing to report
            tail = 0.5 * math.erfc(z / math.sqrt(2.0))
            score = min(1.0, math.log(tail + LIKELIHOOD_EPSILON) / math.log(LIKELIHOOD_EPSILON))
    rate = max(1.0 / (k + 1.0), 2.0 / (p.likelihood_long * readings + 1.0))
    deviation = short - mean
    mean += rate * deviation
    var = (1.0 - rate) * (var + rate * deviation * deviation)
    if k < learning:
        return score, reason, short, mean, var, last_reason
    return score, int(last_reason) if score > 0.0 else NONE, short, mean, var, last_reason


@helper
def _repeats(
    best: float, reason: int, undamped: float, n: float, quiet_until: float, quiet_score: float, p: Params
) -> tuple[float, int, float, float]:
    """One event, one signal: after a score above `quiet_level` a series stays quiet for
    `quiet_points` readings unless its score rises by `quiet_margin`; a score above `quiet_level`
    while quiet is the same event going on, and the quiet lasts `quiet_points` readings past it (an
    event is a run of anomalous readings no more than `quiet_points` apart, as a detection is a run
    of signals in a scorecard). What would have scored `repeat_below` or more but is not news
    (quiet, or damped as routine) is a REPEAT.
    Returns the score, the reason and the new quiet period (until, score)."""
    would_be = max(undamped, best)  # the score were it news
    if n < quiet_until and best <= quiet_score + p.quiet_margin:
        if best > p.quiet_level:
            quiet_until = n + p.quiet_points  # the event goes on
        best = 0.0  # the same event, already signalled
    elif best > p.quiet_level:
        quiet_until = n + p.quiet_points
        quiet_score = best
    if best == 0.0:
        reason = NONE
    if best < p.repeat_below <= would_be:
        reason = REPEAT
    return best, reason, quiet_until, quiet_score


@helper
def _baseline(
    x: float, n: float, mean: float, mad: float, fast: float, slow: float, slow_mad: float, scale: float, p: Params
) -> tuple[float, float, float, float, float]:
    """The robust running baseline learns `x`: mean and MAD (exact running means while warming up,
    then EW at `alpha`), fast and slow means and the slow MAD, each from `x` clipped to `clip`
    robust scales of the mean, so one outlier cannot drag them far."""
    warm = n >= p.warmup
    clipped = _clipped(x, n, mean, scale, p)
    new_mean = mean + p.alpha * (clipped - mean) if warm else mean + (x - mean) / (n + 1.0)
    new_mad = mad + (p.alpha if warm else 1.0 / (n + 1.0)) * (abs(clipped - mean) - mad)
    new_fast = fast + p.fast_alpha * (clipped - fast)
    new_slow = slow + p.slow_alpha * (clipped - slow)
    new_slow_mad = slow_mad + p.slow_alpha * (abs(clipped - slow) - slow_mad)
    return new_mean, new_mad, new_fast, new_slow, new_slow_mad


@helper
def _hour_profile(
    x: float, interval: float, hour_mean: float, hour_mad: float, hn: float, p: Params
) -> tuple[float, float, float]:
    """An hour's profile (mean, MAD, count) learns `x` at `hour_alpha` per hour of readings, not per
    reading: it then remembers days (about ten) whatever the reporting interval, so its spread says
    how well this hour of the day is predicted from other days, not how alike a few minutes are."""
    if hn <= 0:
        hour_mean = x
    slot_alpha = p.hour_alpha * min(1.0, interval / HOUR_MS) if interval > 0.0 else p.hour_alpha
    a = slot_alpha if hn >= 1.0 / slot_alpha else 1.0 / (hn + 1.0)
    return hour_mean + a * (x - hour_mean), hour_mad + a * (abs(x - hour_mean) - hour_mad), hn + 1.0


@helper
def _usual_interval(interval: float, dt: float) -> float:
    """The series' usual reporting interval (EW, 0.05) after a reading `dt` after the one before."""
    if dt > 0:
        return dt if interval == 0.0 else interval + 0.05 * (dt - interval)
    return interval


@helper
def _typical_rate(typical_rate: float, rate: float, dt: float, p: Params) -> float:
    """The series' typical absolute rate of change (EW, `rate_alpha`) after a reading."""
    if dt > 0:
        return rate if typical_rate == 0.0 else typical_rate + p.rate_alpha * (rate - typical_rate)
    return typical_rate


@kernel
def detect_batch(
    series: np.ndarray,
    ts: np.ndarray,
    values: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    measured: np.ndarray,
    state: np.ndarray,
    hourly: np.ndarray,
    p: Params,
    scores: np.ndarray,
    reasons: np.ndarray,
) -> None:
    """Score each reading of the batch in order, updating `state` and `hourly` in place.

    Per series: `low`/`high` the declared physical range; `measured` how it is judged: MEASURED, a
    quantity; STATE_CODE (on/off/fault), which only the range judges: a lamp switching on is not a
    spike, and a lamp staying on is not a stuck sensor; SWITCHED, a switched load, judged as a
    quantity while on and by its range alone while off. `p`: the parameters (`Params`).
    """
    # Each series' state is read into locals once per reading and written back once (numba cannot
    # prove the outputs do not alias the state), and the state a dozen readings ahead is prefetched.
    offset_ms = p.utc_offset_hours * HOUR_MS
    weekends = p.weekends != 0.0
    likelihood = p.likelihood != 0.0  # its columns are read and written only when it is on
    n_series = hourly.shape[1]
    hour_rows = hourly.reshape(DAY_KINDS * n_series * HOURS, 3)
    state_lines = state.reshape(state.shape[0] * STATE_COLUMNS)  # flat, to prefetch a row's second half
    count = series.shape[0]
    # Each reading's profile slot, worked out once: when its state is prefetched, and kept for its turn.
    slots = np.empty(count, np.int64)
    for i in range(min(PREFETCH_AHEAD, count)):
        slots[i] = _profile_slot(ts[i], offset_ms, weekends)
    for i in range(count):
        if i + PREFETCH_AHEAD < count:
            coming = series[i + PREFETCH_AHEAD]
            # A state row is 200 bytes and need not start on a cache line: an address every 64
            # bytes of the columns read, and the last of them, touch every line they span.
            _prefetch(state_lines, coming * STATE_COLUMNS)
            _prefetch(state_lines, coming * STATE_COLUMNS + 8)
            _prefetch(state_lines, coming * STATE_COLUMNS + OUTLIER_RUN)
            if likelihood:  # the columns from LL_SHORT on are read only under the likelihood
                _prefetch(state_lines, coming * STATE_COLUMNS + LL_SHORT)
                _prefetch(state_lines, coming * STATE_COLUMNS + LEAN)
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
            # Off: its baselines learn nothing, but its time counts, so a lamp that is off is not silent.
            if state[s, COUNT] > 0.0:
                state[s, INTERVAL] = _usual_interval(state[s, INTERVAL], t - state[s, LAST_TS])
                state[s, LAST_TS] = t
            scores[i] = 0.0
            reasons[i] = NONE
            continue
        h = slots[i]
        hr = _profile_row(s, h, n_series)
        n = state[s, COUNT]
        if n == 0.0:  # the first reading starts the baselines and its hour's profile
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
        ll_short = ll_mean = ll_var = ll_reason = ll_count = sh_short = sh_mean = sh_var = 0.0
        if likelihood:
            ll_short = state[s, LL_SHORT]
            ll_mean = state[s, LL_MEAN]
            ll_var = state[s, LL_VAR]
            ll_reason = state[s, LL_REASON]
            ll_count = state[s, LL_COUNT]
            sh_short = state[s, LL_SHIFT_SHORT]
            sh_mean = state[s, LL_SHIFT_MEAN]
            sh_var = state[s, LL_SHIFT_VAR]
        hour_mean = hour_rows[hr, HOUR_MEAN]
        hour_mad = hour_rows[hr, HOUR_MAD]
        hn = hour_rows[hr, HOUR_COUNT]

        eps = _scale_floor(mean)
        scale = _robust_scale(mad, eps)
        dt = t - last_ts
        rate = abs(x - last_value) / dt if dt > 0 else 0.0
        if last_value == x:
            run += 1.0
        else:
            if run > longest_run:
                longest_run = run  # runs this long are part of how the series behaves
            run = 0.0

        best = 0.0
        reason = NONE
        if n >= p.warmup and measured[s] != STATE_CODE:
            z, centre = _distance(x, mean, scale, eps, interval, hour_mean, hour_mad, hn, p)
            z_leaning = z
            if likelihood:
                # The likelihood's input judges a reading in the spread widened, on the side the
                # baseline lags towards, by its lean; a point is judged in the plain spread.
                lean = state[s, LEAN]
                side_scale = _robust_scale(mad + (max(lean, 0.0) if x > mean else max(-lean, 0.0)), eps)
                z_leaning, _ = _distance(x, mean, side_scale, eps, interval, hour_mean, hour_mad, hn, p)
            if weekends and p.w_spike * z > p.z_floor:
                other = _profile_row(s, h - HOURS if h >= HOURS else h + HOURS, n_series)
                z_other = _distance_on_the_other_day(
                    x,
                    eps,
                    interval,
                    hour_rows[other, HOUR_MEAN],
                    hour_rows[other, HOUR_MAD],
                    hour_rows[other, HOUR_COUNT],
                    p,
                )
                z = min(z, z_other)
                z_leaning = min(z_leaning, z_other)
            point, point_reason = _spike_or_dip(z, x, centre, p)
            best, reason = _spike_or_dip(z_leaning, x, centre, p) if likelihood else (point, point_reason)
            undamped = best
            best, routine, outlier_run = _routine_damping(best, routine, outlier_run, p)
            # The first strictly higher score wins, in this order.
            shift_score = _level_shift(fast, slow, slow_mad, eps, p)
            if p.likelihood == 2.0:  # an ensemble: spikes and level shifts, each against its own usual
                best, reason, ll_short, ll_mean, ll_var, ll_reason = _likelihood(
                    best, reason, ll_count, ll_short, ll_mean, ll_var, ll_reason, interval, p
                )
                shift_score, _, sh_short, sh_mean, sh_var, _ = _likelihood(
                    shift_score, LEVEL_SHIFT, ll_count, sh_short, sh_mean, sh_var, float(LEVEL_SHIFT), interval, p
                )
                ll_count += 1.0
                undamped = best  # what is news is judged on the calibrated scores
            # A level shift needs a level to shift from: the slow mean's span of readings
            # (1/slow_alpha). Before that its spread is still growing from 0, and a distance from it
            # is not reported. The likelihood learns from it all the same: it calibrates against
            # what the detectors produce from a series' first readings (docs/processing.md, "A
            # series' units").
            shift_ready = n * p.slow_alpha >= 1.0
            if shift_score > best and (shift_ready or p.likelihood == 1.0):
                best, reason = shift_score, LEVEL_SHIFT
            stuck_score = _stuck(run, longest_run, mad, eps, x, floor, p)
            rate_score = _rate_of_change(rate, typical_rate, dt, p)
            gap_score = _gap(dt, interval, p)
            if p.likelihood == 1.0:
                # The likelihood calibrates how far readings are from what was expected (spikes,
                # dips, level shifts, rates). Stuck runs and gaps are judged against the series' own
                # longest run and usual interval already, and beside it they keep its history
                # clean: a series that often repeats itself would otherwise mute its spikes.
                if rate_score > best:
                    best, reason = rate_score, RATE_OF_CHANGE
                raw_best = best
                if reason == LEVEL_SHIFT and not shift_ready:
                    raw_best = 0.0
                best, reason, ll_short, ll_mean, ll_var, ll_reason = _likelihood(
                    best, reason, ll_count, ll_short, ll_mean, ll_var, ll_reason, interval, p
                )
                ll_count += 1.0
                if reason == LEVEL_SHIFT and not shift_ready:  # learnt from, not reported (above)
                    best, reason = 0.0, NONE
                # A point anomaly, one reading far from its expected value, moves the likelihood's
                # short mean by 2/11 of its score at most: it is judged as the raw detectors judge
                # it, beside the likelihood, which answers for what lasts (Ahmad et al. 2017 built
                # the likelihood for HTM's sustained prediction errors).
                point = _refloored(point, p) * p.raw_points
                if point > best:
                    best, reason = point, point_reason
                stuck_score = _refloored(stuck_score, p)
                if stuck_score > best:
                    best, reason = stuck_score, STUCK
                if gap_score > best:
                    best, reason = gap_score, DROPOUT
                # What is news is judged on the calibrated score; what the raw detectors would call
                # an anomaly but this series does routinely is a REPEAT (a flapping sensor's flaps).
                undamped = max(best, _refloored(raw_best, p))
            else:
                if stuck_score > best:
                    best, reason = stuck_score, STUCK
                if rate_score > best:
                    best, reason = rate_score, RATE_OF_CHANGE
                if gap_score > best:
                    best, reason = gap_score, DROPOUT
            best, reason, quiet_until, quiet_score = _repeats(best, reason, undamped, n, quiet_until, quiet_score, p)
        scores[i] = best
        reasons[i] = reason

        if likelihood:
            state[s, LEAN] = _lean(x, n, mean, state[s, LEAN], scale, p)
        mean, mad, fast, slow, slow_mad = _baseline(x, n, mean, mad, fast, slow, slow_mad, scale, p)
        hour_mean, hour_mad, hn = _hour_profile(x, interval, hour_mean, hour_mad, hn, p)
        hour_rows[hr, HOUR_MAD] = hour_mad
        hour_rows[hr, HOUR_MEAN] = hour_mean
        hour_rows[hr, HOUR_COUNT] = hn
        interval = _usual_interval(interval, dt)
        typical_rate = _typical_rate(typical_rate, rate, dt, p)
        state[s, MEAN] = mean
        state[s, MAD] = mad
        state[s, FAST] = fast
        state[s, SLOW] = slow
        state[s, SLOW_MAD] = slow_mad
        state[s, RUN] = run
        state[s, LONGEST_RUN] = longest_run
        state[s, INTERVAL] = interval
        state[s, RATE] = typical_rate
        state[s, QUIET_UNTIL] = quiet_until
        state[s, QUIET_SCORE] = quiet_score
        state[s, ROUTINE] = routine
        state[s, OUTLIER_RUN] = outlier_run
        if likelihood:
            state[s, LL_SHORT] = ll_short
            state[s, LL_MEAN] = ll_mean
            state[s, LL_VAR] = ll_var
            state[s, LL_REASON] = ll_reason
            state[s, LL_COUNT] = ll_count
            state[s, LL_SHIFT_SHORT] = sh_short
            state[s, LL_SHIFT_MEAN] = sh_mean
            state[s, LL_SHIFT_VAR] = sh_var
        state[s, LAST_VALUE] = x
        state[s, LAST_TS] = t
        state[s, COUNT] = n + 1.0


@helper
def _relation_prediction(measured: float, reference: float, primary_mean: float, reference_mean: float) -> float:
    """The primary's value the relation expects, given the reference's."""
    if measured == RELATION_RATIO:
        # A reference that has averaged nothing (a PM10 sensor reading 0) predicts nothing: the
        # primary's own mean, so the relation neither divides by it nor judges by it.
        if reference_mean > 1e-9 * abs(primary_mean):
            return primary_mean / reference_mean * reference
        return primary_mean
    return reference + primary_mean


@kernel
def relation_batch(
    series: np.ndarray,
    ts: np.ndarray,
    primary: np.ndarray,
    reference: np.ndarray,
    measured: np.ndarray,
    state: np.ndarray,
    p: Params,
    scores: np.ndarray,
    reasons: np.ndarray,
) -> None:
    """Judge pairs of readings of two metrics of one device that keep a physical relation (analytical
    redundancy: a fault in one sensor breaks a relation the others keep; Isermann, "Fault-Diagnosis
    Systems", 2006, parity equations), in order, updating the relation series' `state` in place.

    The primary is predicted from the reference (`measured`: RELATION_RATIO, a share of it learnt
    as the ratio of their EW means, robust where both are low and noisy; RELATION_OFFSET, an offset
    from it learnt as an EW mean). The residual, in its own EW spread, goes into an EWMA control
    chart (Roberts, "Control chart tests based on geometric moving averages", Technometrics 1959),
    judged against the chart's own in-control spread, so residuals that are autocorrelated (as real
    ones are) widen it instead of raising alarms; it is never judged tighter than independent
    residuals allow. A drift of one of the two sensors is found as it builds, where each metric's
    own baselines follow it and the hour's profile has not learnt the hour yet. The relation learns
    every reading, as at most RELATION_LEARN_CLIP spreads from its prediction (Huber), so an anomaly
    barely teaches it and a relation that changes for good is learnt again in a few memories.
    A score maps the chart's distance in its standard deviations as the raw detectors map a robust z.
    """
    rate_chart = 2.0 / (p.relation_span + 1.0)
    independent_var = rate_chart / (2.0 - rate_chart)  # the chart's variance on independent residuals
    floor = max(p.z_floor, p.learning_floor)
    for i in range(series.shape[0]):
        s = series[i]
        a = primary[i]
        b = reference[i]
        form = measured[s]
        n = state[s, COUNT]
        scores[i] = 0.0
        reasons[i] = NONE
        if n == 0.0:
            state[s, REL_PRIMARY] = a if form == RELATION_RATIO else a - b
            state[s, REL_REFERENCE] = b
            state[s, REL_SPREAD] = 0.0
            state[s, REL_CHART] = 0.0
            state[s, REL_CHART_VAR] = 0.0
            state[s, QUIET_UNTIL] = 0.0
            state[s, QUIET_SCORE] = 0.0
            state[s, LAST_TS] = ts[i]
            state[s, COUNT] = 1.0
            continue
        primary_mean = state[s, REL_PRIMARY]
        reference_mean = state[s, REL_REFERENCE]
        spread = state[s, REL_SPREAD]
        chart = state[s, REL_CHART]
        chart_var = state[s, REL_CHART_VAR]
        quiet_until = state[s, QUIET_UNTIL]
        quiet_score = state[s, QUIET_SCORE]
        prediction = _relation_prediction(form, b, primary_mean, reference_mean)
        residual = a - prediction
        scale = MEAN_ABS_TO_SD * spread + 1e-9 + 1e-3 * abs(prediction)
        u = min(RELATION_INPUT_CLIP, max(-RELATION_INPUT_CLIP, residual / scale))
        warm = n >= p.relation_warmup
        if warm:  # the chart starts at 0 once the relation is learnt (residuals before are its learning)
            chart += rate_chart * (u - chart)
        if not (math.isfinite(residual) and math.isfinite(scale) and math.isfinite(chart)):
            # Values so extreme that the relation cannot be computed (a reference mean of 1e-320, a
            # value of 1e308): it starts learning again from the next pair, and judges nothing now.
            state[s, COUNT] = 0.0
            continue
        if warm:
            sd = math.sqrt(max(chart_var, independent_var))
            score = _score(abs(chart) / sd, floor, p.z_scale)
            reason = INCONSISTENT if score > 0.0 else NONE
            best, reason, quiet_until, quiet_score = _repeats(score, reason, score, n, quiet_until, quiet_score, p)
            scores[i] = best
            reasons[i] = reason
            # The chart's own variance, learnt from readings after the warm-up only.
            judged = n - p.relation_warmup
            rate_var = max(1.0 / (judged + 1.0), 1.0 / p.relation_memory)
            limit = RELATION_CHART_LEARN_CLIP * RELATION_CHART_LEARN_CLIP * max(chart_var, independent_var)
            chart_var += rate_var * (min(chart * chart, limit) - chart_var)
            bound = RELATION_LEARN_CLIP * scale
            residual = min(bound, max(-bound, residual))
        rate = max(1.0 / (n + 1.0), 1.0 / p.relation_memory)
        learnt = prediction + residual  # the primary as the relation learns it
        spread += rate * (abs(residual) - spread)
        if form == RELATION_RATIO:
            primary_mean += rate * (learnt - primary_mean)
            reference_mean += rate * (b - reference_mean)
        else:
            primary_mean += rate * ((learnt - b) - primary_mean)
        if not (
            math.isfinite(primary_mean)
            and math.isfinite(reference_mean)
            and math.isfinite(spread)
            and math.isfinite(chart_var)
        ):
            state[s, COUNT] = 0.0  # as above: learnt again from the next pair
            scores[i] = 0.0
            reasons[i] = NONE
            continue
        state[s, REL_PRIMARY] = primary_mean
        state[s, REL_REFERENCE] = reference_mean
        state[s, REL_SPREAD] = spread
        state[s, REL_CHART] = chart
        state[s, REL_CHART_VAR] = chart_var
        state[s, QUIET_UNTIL] = quiet_until
        state[s, QUIET_SCORE] = quiet_score
        state[s, LAST_TS] = ts[i]
        state[s, COUNT] = n + 1.0


@kernel
def inspect_batch(series: np.ndarray, ts: np.ndarray, values: np.ndarray, n_series: int) -> tuple[int, bool]:
    """How many readings have a non-finite time or value, and whether every series id is below
    `n_series` and not negative: the wrapper's checks in one pass (cheaper than NumPy calls)."""
    nonfinite = 0
    ids_ok = True
    for i in range(series.shape[0]):
        if not (np.isfinite(ts[i]) and np.isfinite(values[i])):
            nonfinite += 1
        if series[i] < 0 or series[i] >= n_series:
            ids_ok = False
    return nonfinite, ids_ok


@kernel
def silence_scores(
    now_ms: float, state: np.ndarray, last_seen: np.ndarray, warmup: float, factor: float, scores: np.ndarray
) -> None:
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
def minute_partials(
    series: np.ndarray,
    ts: np.ndarray,
    values: np.ndarray,
    width_ms: float,
    out_series: np.ndarray,
    out_bucket: np.ndarray,
    out_stats: np.ndarray,
) -> int:
    """Tumbling-window partials of a batch: one row per (series, window) in `out_*`, in order of
    each window's first reading; returns the row count.

    `out_stats` columns: AGG_N ... AGG_LAST_VALUE, the same mergeable partials as the agg_1m table
    (see `merge`). Outputs must hold len(series) rows. One pass in arrival order: each series keeps
    a chain of its rows, newest first, so a reading finds its window in a step or two (readings
    mostly arrive in time order; sorting by (series, window) instead cost 13x more).
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
            out_stats[r, AGG_N] = 1.0
            out_stats[r, AGG_SUM] = x
            out_stats[r, AGG_SUM_SQ] = x * x
            out_stats[r, AGG_MIN] = x
            out_stats[r, AGG_MAX] = x
            out_stats[r, AGG_FIRST_TS] = t
            out_stats[r, AGG_FIRST_VALUE] = x
            out_stats[r, AGG_LAST_TS] = t
            out_stats[r, AGG_LAST_VALUE] = x
            continue
        out_stats[r, AGG_N] += 1.0
        out_stats[r, AGG_SUM] += x
        out_stats[r, AGG_SUM_SQ] += x * x
        if x < out_stats[r, AGG_MIN]:
            out_stats[r, AGG_MIN] = x
        if x > out_stats[r, AGG_MAX]:
            out_stats[r, AGG_MAX] = x
        if t < out_stats[r, AGG_FIRST_TS]:
            out_stats[r, AGG_FIRST_TS] = t
            out_stats[r, AGG_FIRST_VALUE] = x
        if t >= out_stats[r, AGG_LAST_TS]:
            out_stats[r, AGG_LAST_TS] = t
            out_stats[r, AGG_LAST_VALUE] = x
    return rows


@kernel
def merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The partial of a window's readings `a` then `b` (arrived after them) from the partials of each:
    counts and sums add, min and max of both, the earliest first value and the latest last one
    (of equal last times, `b`'s: the later arrival, as minute_partials). Pure: a new row."""
    out = np.empty(AGG_COLUMNS)
    out[AGG_N] = a[AGG_N] + b[AGG_N]
    out[AGG_SUM] = a[AGG_SUM] + b[AGG_SUM]
    out[AGG_SUM_SQ] = a[AGG_SUM_SQ] + b[AGG_SUM_SQ]
    out[AGG_MIN] = min(a[AGG_MIN], b[AGG_MIN])
    out[AGG_MAX] = max(a[AGG_MAX], b[AGG_MAX])
    first = b if b[AGG_FIRST_TS] < a[AGG_FIRST_TS] else a
    out[AGG_FIRST_TS] = first[AGG_FIRST_TS]
    out[AGG_FIRST_VALUE] = first[AGG_FIRST_VALUE]
    last = b if b[AGG_LAST_TS] >= a[AGG_LAST_TS] else a
    out[AGG_LAST_TS] = last[AGG_LAST_TS]
    out[AGG_LAST_VALUE] = last[AGG_LAST_VALUE]
    return out
