"""A slow, obvious reference for processing/kernels.py: the same method in plain Python, one reading
at a time, state in a dict per series. Tests hold the kernels to it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from processing import kernels as k


@dataclass
class Moments:
    """One anomaly likelihood's state: the short mean of raw scores, the long mean and variance of
    that short mean, the reason of the newest raw score above 0."""

    short: float = 0.0
    mean: float = 0.0
    var: float = 0.0
    reason: int = 0


@dataclass
class SeriesState:
    count: int = 0
    mean: float = 0.0
    mad: float = 0.0
    fast: float = 0.0
    slow: float = 0.0
    slow_mad: float = 0.0
    last_value: float = 0.0
    last_ts: float = 0.0
    run: int = 0
    longest_run: int = 0
    quiet_until: float = 0.0
    quiet_score: float = 0.0
    interval: float = 0.0
    rate: float = 0.0
    routine: float = 0.0  # running rate of short big spikes and dips that came and went
    outlier_run: int = 0
    ll: Moments = field(default_factory=Moments)  # the likelihood of the highest raw score, or of spikes
    ll_shift: Moments = field(default_factory=Moments)  # of level shifts (the ensemble)
    ll_count: int = 0  # raw scores the likelihood has judged
    lean: float = 0.0  # EW mean of the clipped signed deviation from the mean (under the likelihood)
    hours: dict[int, list[float]] = field(default_factory=dict)  # hour (+24 at weekends) → [mean, mad, count]


def score_of(z: float, floor: float, scale: float) -> float:
    if z <= floor:
        return 0.0
    return 1.0 if z - floor == math.inf else (z - floor) / (z - floor + scale)


def first_highest(candidates: list[tuple[float, int]]) -> tuple[float, int]:
    """The first strictly highest (score, reason), as the kernel compares them in order."""
    best = candidates[0]
    for c in candidates[1:]:
        if c[0] > best[0]:
            best = c
    return best


def refloored(raw: float, p) -> float:
    """While learning: the raw score as with the floor `learning_floor`, when `z_floor` is lower."""
    if p.learning_floor <= p.z_floor or raw <= 0:
        return raw
    if raw >= 1:
        return 1.0
    return score_of(p.z_floor + p.z_scale * raw / (1 - raw), p.learning_floor, p.z_scale)


def likelihood(m: Moments, raw: tuple[float, int], judged: float, interval: float, p) -> tuple[float, int]:
    """The short EW mean of the raw scores, its upper-tail probability against the long EW mean and
    variance of that mean (Numenta's floors), as NAB's log score; the raw score while learning. The
    windows are counted in records of `likelihood_interval_ms`: at the series' usual `interval`,
    that many times as many readings (the short window never under one)."""
    score, reason = raw
    per_record = max(1.0, p.likelihood_interval_ms / interval) if p.likelihood_interval_ms > 0 and interval > 0 else 1.0
    short_span = max(1.0, p.likelihood_short * per_record)
    learning = p.likelihood_learning * per_record
    m.short = score if judged <= 0 else m.short + 2 / (short_span + 1) * (score - m.short)
    if score > 0:
        m.reason = reason
    out = refloored(score, p)
    if judged >= learning:
        out = 0.0
        z = (m.short - max(m.mean, k.LIKELIHOOD_MIN_MEAN)) / math.sqrt(max(m.var, k.LIKELIHOOD_MIN_VARIANCE))
        if z > 0:
            tail = 0.5 * math.erfc(z / math.sqrt(2))
            out = min(1.0, math.log(tail + k.LIKELIHOOD_EPSILON) / math.log(k.LIKELIHOOD_EPSILON))
    rate = max(1 / (judged + 1), 2 / (p.likelihood_long * per_record + 1))
    deviation = m.short - m.mean
    m.mean += rate * deviation
    m.var = (1 - rate) * (m.var + rate * deviation * deviation)
    if judged < learning:
        return out, reason
    return out, m.reason if out > 0 else k.NONE


def distance(
    x: float, mean: float, spread: float, hour_mean: float, hour_scale: float, hn: float, interval: float, p
) -> tuple[float, float]:
    """How far x is, in `spread`, from its usual level, and that level (the kernel's `_distance`)."""
    if (
        p.daily_tightness > 0
        and hn >= p.hour_warmup
        and hn * interval >= p.daily_days * 3_600_000
        and p.daily_tightness * hour_scale < spread
    ):
        return abs(x - hour_mean) / hour_scale, hour_mean  # a daily cycle: against this hour's usual
    z = abs(x - mean) / spread
    if hn >= p.hour_warmup and hn * interval >= 3_600_000:
        z = min(z, abs(x - hour_mean) / hour_scale)
    return z, mean


def reference_scores(
    readings: list[tuple[int, float, float]],
    params,
    ranges: dict[int, tuple[float, float]],
    states: dict[int, SeriesState],
    codes: frozenset[int] = frozenset(),
    switched: frozenset[int] = frozenset(),
) -> list[tuple[float, int]]:
    """`codes`: series whose values are state codes, judged only against their range. `switched`:
    switched loads, off at the bottom of their range, judged only while on."""
    p = k.Params(*(float(v) for v in params))  # by name: the same table as the kernels
    out = []
    for sid, t, x in readings:
        t, x = float(t), float(x)  # plain floats: a distance past a double's range is inf, as in the kernel
        if not (math.isfinite(x) and math.isfinite(t)):
            out.append((0.0, k.NONE))
            continue
        low, high = ranges.get(sid, (-math.inf, math.inf))
        if x < low or x > high:
            out.append((1.0, k.OUT_OF_RANGE))
            continue
        st = states.setdefault(sid, SeriesState())
        if sid in switched and x <= low:  # off: only its time is kept, so being off is not silence
            if st.count > 0:
                gap = t - st.last_ts
                if gap > 0:
                    st.interval = gap if st.interval == 0 else st.interval + 0.05 * (gap - st.interval)
                st.last_ts = t
            out.append((0.0, k.NONE))
            continue
        local_weekday = (int((t + p.utc_offset_hours * 3_600_000) // 86_400_000) + 3) % 7  # Monday 0
        hour = int((t // 3_600_000) % 24) + (24 if p.weekends and local_weekday >= 5 else 0)  # weekends have their own
        if st.count == 0:
            st.mean = st.fast = st.slow = st.last_value = x
            st.last_ts, st.count = t, 1
            st.hours[hour] = [x, 0.0, 1.0]
            out.append((0.0, k.NONE))
            continue
        eps = k.SCALE_FLOOR_RELATIVE * abs(st.mean) + k.SCALE_FLOOR_ABSOLUTE
        scale = 1.4826 * st.mad + eps
        hm, hmad, hn = st.hours.get(hour, [0.0, 0.0, 0.0])
        hour_scale = 1.4826 * hmad + eps
        z, centre = distance(x, st.mean, scale, hm, hour_scale, hn, st.interval, p)
        z_leaning = z  # under the likelihood, its input judges in the spread widened by the lean
        if p.likelihood:
            side = 1.4826 * (st.mad + (max(st.lean, 0.0) if x > st.mean else max(-st.lean, 0.0))) + eps
            z_leaning = distance(x, st.mean, side, hm, hour_scale, hn, st.interval, p)[0]
        if p.weekends and p.w_spike * z > p.z_floor:  # usual at this hour on the other kind of day
            om, omad, on = st.hours.get(hour - 24 if hour >= 24 else hour + 24, [0.0, 0.0, 0.0])
            if on >= p.hour_warmup and on * st.interval >= 3_600_000:
                z = min(z, abs(x - om) / (1.4826 * omad + eps))
                z_leaning = min(z_leaning, abs(x - om) / (1.4826 * omad + eps))
        dt = t - st.last_ts
        rate = abs(x - st.last_value) / dt if dt > 0 else 0.0
        if st.last_value == x:
            st.run += 1
        else:
            st.longest_run = max(st.longest_run, st.run)
            st.run = 0

        result = (0.0, k.NONE)
        if st.count >= p.warmup and sid not in codes:
            spike = score_of(p.w_spike * z_leaning, p.z_floor, p.z_scale)
            undamped = spike
            point_score = score_of(p.w_spike * z, p.z_floor, p.z_scale)  # a point, in the plain spread
            big = spike > p.routine_level
            spike_ended = 1.0 if not big and 0 < st.outlier_run <= k.SPIKE_MAX_RUN else 0.0
            if p.routine_rate > 0 and spike > 0:
                damp = p.routine_rate / (p.routine_rate + st.routine)
                spike *= damp * damp
            st.routine += p.routine_alpha * (spike_ended - st.routine)
            st.outlier_run = st.outlier_run + 1 if big else 0
            candidates = [(spike, k.SPIKE if x > centre else k.DIP)]
            shift = abs(st.fast - st.slow) / (1.4826 * st.slow_mad + eps)
            candidates.append((score_of(p.w_shift * shift, p.z_floor, p.z_scale), k.LEVEL_SHIFT))
            if p.likelihood == 2:  # the ensemble: spikes and level shifts, each against its own usual
                candidates[0] = likelihood(st.ll, candidates[0], st.ll_count, st.interval, p)
                candidates[1] = (likelihood(st.ll_shift, candidates[1], st.ll_count, st.interval, p)[0], k.LEVEL_SHIFT)
                st.ll_count += 1
                undamped = candidates[0][0]
            shift_ready = st.count * p.slow_alpha >= 1  # a level to shift from: learnt, not reported before
            if not shift_ready and p.likelihood != 1:
                candidates[1] = (0.0, k.LEVEL_SHIFT)
            stuck = (0.0, k.STUCK)
            stuck_after = max(p.stuck_min, 2 * st.longest_run)
            if st.mad > eps and st.run >= stuck_after and x > low:
                stuck = (score_of(p.w_stuck * k.STUCK_ONSET_Z * st.run / stuck_after, p.z_floor, p.z_scale), k.STUCK)
            rate_of_change = (0.0, k.RATE_OF_CHANGE)
            if st.rate > 0 and dt > 0:
                rate_of_change = (score_of(p.w_rate * rate / st.rate / 2, p.z_floor, p.z_scale), k.RATE_OF_CHANGE)
            gap = (0.0, k.DROPOUT)
            if p.gap_factor > 0 and st.interval > 0 and dt > p.gap_factor * st.interval:
                excess = dt / st.interval - p.gap_factor
                gap = (excess / (excess + p.gap_factor), k.DROPOUT)
            if p.likelihood == 1:
                # Numenta's anomaly likelihood of the highest of spikes, shifts and rates replaces
                # it; stuck runs and gaps are judged beside it (the first strictly higher wins).
                raw_best = first_highest([*candidates, rate_of_change])
                best = likelihood(st.ll, raw_best, st.ll_count, st.interval, p)
                st.ll_count += 1
                if not shift_ready and raw_best[1] == k.LEVEL_SHIFT:  # learnt from, not reported
                    raw_best = (0.0, k.LEVEL_SHIFT)
                if not shift_ready and best[1] == k.LEVEL_SHIFT:  # nor when the likelihood names it
                    best = (0.0, k.NONE)
                point = (refloored(point_score, p) * p.raw_points, candidates[0][1])  # spikes and dips, raw
                best = first_highest([best, point, (refloored(stuck[0], p), k.STUCK), gap])
                # what the raw detectors would call an anomaly, but the series does routinely: a repeat
                undamped = max(best[0], refloored(raw_best[0], p))
            else:
                best = first_highest([*candidates, stuck, rate_of_change, gap])
            would_be = max(undamped, best[0])
            if st.count < st.quiet_until and best[0] <= st.quiet_score + p.quiet_margin:
                if best[0] > p.quiet_level:
                    st.quiet_until = st.count + p.quiet_points  # the same event, going on
                best = (0.0, best[1])  # same event, already signalled
            elif best[0] > p.quiet_level:
                st.quiet_until, st.quiet_score = st.count + p.quiet_points, best[0]
            if best[0] > 0:
                result = best
            if best[0] < p.repeat_below <= would_be:
                result = (best[0], k.REPEAT)
        out.append(result)

        warm = st.count >= p.warmup
        limit = p.clip * scale
        clipped = st.mean + min(max(x - st.mean, -limit), limit) if warm else x
        if p.likelihood:  # the lean: EW mean of the deviation of what the baseline learns
            st.lean += (p.alpha if warm else 1 / (st.count + 1)) * (clipped - st.mean - st.lean)
        old_mean = st.mean
        st.mean = old_mean + p.alpha * (clipped - old_mean) if warm else old_mean + (x - old_mean) / (st.count + 1)
        st.mad += (p.alpha if warm else 1 / (st.count + 1)) * (abs(clipped - old_mean) - st.mad)
        st.fast += p.fast_alpha * (clipped - st.fast)
        old_slow = st.slow
        st.slow = old_slow + p.slow_alpha * (clipped - old_slow)
        st.slow_mad += p.slow_alpha * (abs(clipped - old_slow) - st.slow_mad)
        hour_mean = hm if hn > 0 else x
        slot_alpha = p.hour_alpha * min(1.0, st.interval / 3_600_000) if st.interval > 0 else p.hour_alpha
        a = slot_alpha if hn >= 1 / slot_alpha else 1 / (hn + 1)
        st.hours[hour] = [hour_mean + a * (x - hour_mean), hmad + a * (abs(x - hour_mean) - hmad), hn + 1]
        if dt > 0:
            st.interval = dt if st.interval == 0 else st.interval + 0.05 * (dt - st.interval)
            st.rate = rate if st.rate == 0 else st.rate + p.rate_alpha * (rate - st.rate)
        st.last_value, st.last_ts = x, t
        st.count += 1
    return out


@dataclass
class RelationState:
    """One relation's state: what it has learnt of its two metrics, its residuals' spread, its chart."""

    count: int = 0
    primary: float = 0.0  # mean of the primary as learnt (ratio), or of primary - reference (offset)
    reference: float = 0.0
    spread: float = 0.0
    chart: float = 0.0
    chart_var: float = 0.0
    quiet_until: float = 0.0
    quiet_score: float = 0.0


def reference_relation_scores(
    pairs: list[tuple[object, float, float, float]], params, forms: dict[object, str], states: dict
) -> list[tuple[float, int]]:
    """(relation key, time, primary, reference) in order -> (score, reason): the EWMA chart of the
    residual from a learnt share ("ratio") or offset ("offset"), judged in its own spread."""
    p = k.Params(*(float(v) for v in params))
    rate_chart = 2 / (p.relation_span + 1)
    independent_var = rate_chart / (2 - rate_chart)
    out = []
    for key, _, a, b in pairs:
        st = states.setdefault(key, RelationState())
        ratio = forms[key] == "ratio"
        if st.count == 0:
            st.primary, st.reference, st.count = (a if ratio else a - b), b, 1
            out.append((0.0, k.NONE))
            continue
        if ratio:
            prediction = st.primary / st.reference * b if st.reference > 1e-9 * abs(st.primary) else st.primary
        else:
            prediction = b + st.primary
        residual = a - prediction
        scale = math.sqrt(math.pi / 2) * st.spread + 1e-9 + 1e-3 * abs(prediction)
        if st.count >= p.relation_warmup:  # the chart runs once the relation is learnt
            st.chart += rate_chart * (min(5.0, max(-5.0, residual / scale)) - st.chart)
        if not all(map(math.isfinite, (residual, scale, st.chart))):
            states[key] = RelationState()  # beyond computing: learnt again from the next pair
            out.append((0.0, k.NONE))
            continue
        result = (0.0, k.NONE)
        if st.count >= p.relation_warmup:
            floor_var = max(st.chart_var, independent_var)
            score = score_of(abs(st.chart) / math.sqrt(floor_var), max(p.z_floor, p.learning_floor), p.z_scale)
            best = score
            if st.count < st.quiet_until and score <= st.quiet_score + p.quiet_margin:
                if score > p.quiet_level:
                    st.quiet_until = st.count + p.quiet_points
                best = 0.0
            elif score > p.quiet_level:
                st.quiet_until, st.quiet_score = st.count + p.quiet_points, score
            if best > 0:
                result = (best, k.INCONSISTENT)
            if best < p.repeat_below <= score:
                result = (best, k.REPEAT)
            judged = st.count - p.relation_warmup
            st.chart_var += max(1 / (judged + 1), 1 / p.relation_memory) * (
                min(st.chart**2, 4 * floor_var) - st.chart_var
            )
            residual = min(3 * scale, max(-3 * scale, residual))
        rate = max(1 / (st.count + 1), 1 / p.relation_memory)
        st.spread += rate * (abs(residual) - st.spread)
        if ratio:
            st.primary += rate * (prediction + residual - st.primary)
            st.reference += rate * (b - st.reference)
        else:
            st.primary += rate * (prediction + residual - b - st.primary)
        if not all(map(math.isfinite, (st.primary, st.reference, st.spread, st.chart_var))):
            states[key] = RelationState()
            out.append((0.0, k.NONE))
            continue
        out.append(result)
        st.count += 1
    return out


def reference_pairs(readings, records, relations, low, high) -> list[tuple[int, int, int]]:
    """(primary index, reference index, relation index) of a batch's pairs, in the order they are
    judged, one reading at a time in plain Python: both metrics of a relation from one device at one
    time in one record, each value finite and inside [low, high] of its reading; a metric repeated
    there counts its last reading. Ordered by time, then by where the (device, time, record) first
    appeared, then by relation."""
    wanted = {m for r in relations for m in (r.primary, r.reference)}
    at: dict[tuple[str, float, int], dict[str, int]] = {}
    for i, r in enumerate(readings):
        ok = math.isfinite(r.ts_ms) and math.isfinite(r.value) and low[i] <= r.value <= high[i]
        if r.metric in wanted and ok:
            record = records[i] if records is not None else 0
            at.setdefault((r.device_id, float(r.ts_ms), record), {})[r.metric] = i
    pairs = []
    for (_, ts, _), metrics in at.items():  # insertion order: where each group first appeared
        for which, relation in enumerate(relations):
            if relation.primary in metrics and relation.reference in metrics:
                pairs.append((ts, metrics[relation.primary], metrics[relation.reference], which))
    pairs.sort(key=lambda p: p[0])  # stable: groups and relations keep their order within a time
    return [(p, q, k) for _, p, q, k in pairs]
