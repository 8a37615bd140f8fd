"""Domain rules on top of the detectors, evaluated inside the batch transaction.

- Air quality: each station's ISPU over the averaging window (mean of the one-minute aggregates
  ending at the minute evaluated), with category and critical pollutant, kept in `station_ispu`; a
  signal while the station is Tidak Sehat or worse. Evaluated at every minute of event time the
  batch holds readings for, not once per batch: a fast replay puts many minutes into one batch, and
  what it finds must not depend on where batches happen to end.
- Flood gates: Siaga status per gate from its thresholds (`flood_gates`, or the defaults here),
  kept in `gate_status` with the rate of rise, stepping down only once the water is a deadband
  below the threshold it crossed; a signal while a gate is at Siaga 3 or above (each
  step up escalates its alert) and a separate one when the water rises faster than the gate's
  limit, so operators hear of a fast rise before a threshold is crossed.
- Water meters (minimum night flow): between 01:00 and 04:00 local time almost nobody draws water,
  so a meter's lowest flow over those hours is its leakage plus a little legitimate use. A night
  whose lowest flow stays `leak_min_flow_m3h` above the lowest the meter usually reaches in the
  same hours (median of up to `leak_history_nights` earlier nights) is water running that usually
  stops: a `leak` signal, once the meter has `leak_min_nights` earlier nights to compare with.
  Evaluated once per meter per night hour (at 02:00, 03:00 and 04:00, over the night so far), not
  per reading; a night back to its usual minimum clears the alert. `suspected_leak` is the rule
  itself, which the ops API's living view applies (at any hour) too.

All read what this same transaction just merged into `agg_1m`, so they see every stored reading
exactly once, whatever order batches arrive in.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from kota.alerts import Severity, Signal
from kota.contract import RELATIONS, Reading
from processing import ispu
from processing.rulebook import CityRules

# Each device's city's rules as of the batch (processing.rulebook); None: the defaults here.
RulesOf = Callable[[str], CityRules] | None

WATER_LEVEL = "currentLevel"
WATER_FLOW = "waterConsumption"
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000

# Severity by ISPU category (index in ispu.CATEGORIES) and by Siaga level.
ISPU_SEVERITY: dict[int, Severity] = {2: "minor", 3: "major", 4: "critical"}
SIAGA_SEVERITY: dict[int, Severity] = {3: "minor", 2: "major", 1: "critical"}


@dataclass(frozen=True, slots=True)
class RulePolicy:
    """The domain rules' thresholds: the ISPU window, the flood gates' Siaga levels and rate of rise,
    and the water meters' minimum night flow."""

    ispu_window_minutes: int = 60
    # Default gate thresholds in cm (Katulampa's, from ../shared/docs/domain.md); per gate in flood_gates.
    siaga3_cm: float = 80.0
    siaga2_cm: float = 150.0
    siaga1_cm: float = 200.0
    rise_cm_per_h: float = 30.0
    rise_window_minutes: int = 15
    siaga_deadband_cm: float = 5.0  # below a threshold by this much before a gate's status steps down
    # Minimum night flow: the night's hours in local time (the cities served are on WIB, no DST).
    timezone: str = "Asia/Jakarta"
    leak_night_start_hour: int = 1
    leak_night_end_hour: int = 4
    # A night's lowest flow this far above the usual lowest (median of the earlier nights) is a leak:
    # above what a meter's own night-time use varies by, below the smallest leak worth a visit.
    leak_min_flow_m3h: float = 0.5
    leak_history_nights: int = 7
    # Two earlier nights before a verdict: with one, a single odd night (a tank filled at 02:00, a
    # night with the meter's own small leak fixed the next day) would be the whole "usual".
    leak_min_nights: int = 2
    leak_coverage: float = 0.8  # share of a window's minutes with data before its minimum counts


def siaga_for(
    level_cm: float, thresholds: tuple[float, float, float], current: int = 4, deadband_cm: float = 0.0
) -> int:
    """4 (normal) down to 1 (most severe): one step for each threshold the level is above. From a
    more severe `current` status, each step down needs the level `deadband_cm` below that step's
    threshold: water hovering at a threshold holds its status instead of flickering in and out of
    it (and raising a new alert each time it comes back)."""
    siaga3, siaga2, siaga1 = thresholds
    siaga = 4 - (level_cm > siaga3) - (level_cm > siaga2) - (level_cm > siaga1)
    step = current
    while step < siaga:
        if level_cm > thresholds[3 - step] - deadband_cm:
            return step
        step += 1
    return siaga


def suspected_leak(
    window_minutes: int,
    needed_minutes: float,
    window_min_flow: float | None,
    usual_min_flow: float | None,
    min_flow_m3h: float,
) -> bool:
    """The minimum-night-flow rule: over a window covered by data (`needed_minutes` of it), the flow
    never fell to within `min_flow_m3h` of the lowest it usually reaches in those hours. False
    without a usual to compare with."""
    return (
        window_minutes >= needed_minutes
        and window_min_flow is not None
        and usual_min_flow is not None
        and window_min_flow >= usual_min_flow + min_flow_m3h
    )


def usual_min_flow(night_minima: Sequence[float]) -> float | None:
    """The lowest flow a meter usually reaches in some hours: the median of earlier days' minima (one
    odd day, a tank filled or a pipe flushed, does not move it)."""
    return statistics.median(night_minima) if night_minima else None


def night_hours_reached(first_ms: int, last_ms: int, policy: RulePolicy) -> list[int]:
    """The night hours' ends (epoch ms: 02:00, 03:00 and 04:00 local by default) whose following hour
    overlaps [first_ms, last_ms]: a meter's readings there evaluate the night up to that end."""
    zone = ZoneInfo(policy.timezone)
    ends: list[int] = []
    day = dt.datetime.fromtimestamp((first_ms - HOUR_MS) / 1000, zone).date()
    while True:
        midnight = dt.datetime.combine(day, dt.time(), zone)
        midnight_ms = int(midnight.timestamp() * 1000)
        if midnight_ms + (policy.leak_night_start_hour + 1) * HOUR_MS > last_ms:
            return ends
        for hour in range(policy.leak_night_start_hour + 1, policy.leak_night_end_hour + 1):
            end = midnight_ms + hour * HOUR_MS
            if end <= last_ms and end + HOUR_MS > first_ms:
                ends.append(end)
        day += dt.timedelta(days=1)


def _night_start(end_ms: int, zone: ZoneInfo, policy: RulePolicy) -> int:
    """The start of the night (01:00 local by default) that a night hour's end belongs to."""
    local = dt.datetime.fromtimestamp(end_ms / 1000, zone)
    return int(local.replace(hour=policy.leak_night_start_hour, minute=0, second=0, microsecond=0).timestamp() * 1000)


async def evaluate_leaks(
    conn: psycopg.AsyncConnection, meters: dict[str, list[int]], policy: RulePolicy
) -> tuple[list[Signal], list[tuple[str, int]]]:
    """The minimum-night-flow rule for each (meter, night hour's end) in `meters` (from `rule_inputs`,
    less those evaluated before): the night so far against the same hours of earlier nights, from
    agg_1m (one query for all). Returns leak signals and the (meter, end) whose night was back to
    normal (their open leak alert clears)."""
    points = [(device_id, end) for device_id, ends in meters.items() for end in sorted(ends)]
    if not points:
        return [], []
    zone = ZoneInfo(policy.timezone)
    keys: tuple[list[int], list[int], list[str], list[int], list[int]] = ([], [], [], [], [])
    for i, (device_id, end) in enumerate(points):
        start = _night_start(end, zone, policy)
        for night in range(policy.leak_history_nights + 1):
            for column, value in zip(
                keys, (i, night, device_id, start - night * DAY_MS, end - night * DAY_MS), strict=True
            ):
                column.append(value)  # type: ignore[attr-defined]
    cur = await conn.execute(
        "SELECT k.i, k.night, count(*), min(a.min) "
        "FROM unnest(%b::int[], %b::int[], %b::text[], %b::bigint[], %b::bigint[]) AS k(i, night, device_id, s, e) "
        "JOIN agg_1m a ON a.device_id = k.device_id AND a.metric = %b "
        "AND a.bucket >= kota_ms(k.s) AND a.bucket < kota_ms(k.e) GROUP BY 1, 2",
        (*keys, WATER_FLOW),
    )
    nights: dict[int, dict[int, tuple[int, float]]] = {}
    for i, night, minutes, floor in await cur.fetchall():
        nights.setdefault(i, {})[night] = (minutes, floor)
    signals: list[Signal] = []
    normal: list[tuple[str, int]] = []
    for i, (device_id, end) in enumerate(points):
        start = _night_start(end, zone, policy)
        needed = (end - start) / MINUTE_MS * policy.leak_coverage
        seen = nights.get(i, {})
        minutes, floor = seen.get(0, (0, None))
        history = [f for night, (m, f) in seen.items() if night > 0 and m >= needed]
        if minutes < needed or len(history) < policy.leak_min_nights:
            continue  # not enough of tonight, or not enough earlier nights: no verdict
        usual = usual_min_flow(history)
        if suspected_leak(minutes, needed, floor, usual, policy.leak_min_flow_m3h):
            assert floor is not None and usual is not None
            signals.append(
                Signal(
                    device_id,
                    "leak",
                    WATER_FLOW,
                    "major",
                    end,
                    floor,
                    f"suspected leak: night flow never below {floor:g} m3/h, usually down to {usual:g} "
                    f"({len(history)} earlier nights)",
                    {"night_min_flow": floor, "usual_min_flow": usual, "nights": len(history)},
                )
            )
        else:
            normal.append((device_id, end))
    return signals, normal


def rule_inputs(
    readings: Iterable[Reading],
) -> tuple[dict[str, dict[int, int]], dict[str, list[tuple[int, float]]], dict[str, tuple[int, int]]]:
    """What the rules evaluate, in one pass over a batch's readings:
    - for each station with pollutant readings, each minute bucket (epoch ms) they fall in, with the
      newest reading time in it (`evaluate_air_quality`);
    - for each gate, its water levels as (ts_ms, cm) (`evaluate_flood_gates`);
    - for each water meter, its first and last flow reading time (`night_hours_reached`)."""
    minutes: dict[str, dict[int, int]] = {}
    levels: dict[str, list[tuple[int, float]]] = {}
    flows: dict[str, tuple[int, int]] = {}
    for r in readings:
        if r.metric in ispu.CONCENTRATION_EDGES:
            station = minutes.setdefault(r.device_id, {})
            bucket = r.ts_ms - r.ts_ms % MINUTE_MS
            if r.ts_ms > station.get(bucket, -1):
                station[bucket] = r.ts_ms
        elif r.metric == WATER_LEVEL:
            levels.setdefault(r.device_id, []).append((r.ts_ms, r.value))
        elif r.metric == WATER_FLOW:
            first, last = flows.get(r.device_id, (r.ts_ms, r.ts_ms))
            flows[r.device_id] = (min(first, r.ts_ms), max(last, r.ts_ms))
    return minutes, levels, flows


async def window_means(
    conn: psycopg.AsyncConnection, minutes: dict[str, dict[int, int]], window_minutes: int
) -> dict[tuple[str, int], dict[str, float]]:
    """Each station's mean concentration of each pollutant over the `window_minutes` one-minute
    aggregates up to and including each minute in `minutes`, keyed by (station, newest reading time
    in that minute), as `rule_inputs` gives them.

    One range of agg_1m per station and pollutant, from the window before its first minute to its
    last, read once as arrays (a join of agg_1m to every (station, minute) read each minute's whole
    window again: docs/processing.md). A window's sum is taken exactly (math.fsum, correctly
    rounded), so a minute's ISPU is the same whatever range was read around it: how readings fell
    into batches does not change what is found (tests/test_rules.py)."""
    stations = sorted(minutes)
    first = {d: min(minutes[d]) - (window_minutes - 1) * MINUTE_MS for d in stations}
    cur = await conn.execute(
        "SELECT a.device_id, a.metric, array_agg((extract(epoch FROM a.bucket) * 1000)::bigint ORDER BY a.bucket), "
        "array_agg(a.sum ORDER BY a.bucket), array_agg(a.n ORDER BY a.bucket) "
        "FROM unnest(%b::text[], %b::bigint[], %b::bigint[]) AS k(device_id, first_ms, last_ms) "
        "JOIN agg_1m a ON a.device_id = k.device_id AND a.metric = ANY(%b::text[]) "
        "AND a.bucket >= kota_ms(k.first_ms) AND a.bucket <= kota_ms(k.last_ms) "
        "GROUP BY 1, 2",
        (stations, [first[d] for d in stations], [max(minutes[d]) for d in stations], list(ispu.POLLUTANTS)),
    )
    means: dict[tuple[str, int], dict[str, float]] = {}
    for device_id, metric, buckets, sums, counts in await cur.fetchall():
        evaluated = sorted(minutes[device_id].items())
        ends = np.array([bucket for bucket, _ in evaluated], np.int64)
        starts = np.searchsorted(buckets, ends - (window_minutes - 1) * MINUTE_MS, "left").tolist()
        stops = np.searchsorted(buckets, ends, "right").tolist()
        readings = [0, *itertools.accumulate(counts)]
        for (_, t_ms), start, stop in zip(evaluated, starts, stops, strict=True):
            if n := readings[stop] - readings[start]:
                means.setdefault((device_id, t_ms), {})[metric] = math.fsum(sums[start:stop]) / n
    return means


async def evaluate_air_quality(
    conn: psycopg.AsyncConnection, minutes: dict[str, dict[int, int]], policy: RulePolicy, rules_of: RulesOf = None
) -> list[Signal]:
    """ISPU of each station at each minute in `minutes` (from `rule_inputs`): the mean of the
    window's one-minute aggregates up to and including that minute. A signal for each category its
    city's rules alert on (ISPU_SEVERITY by default); `station_ispu` keeps the newest."""
    points = [(device_id, t_ms) for device_id, buckets in minutes.items() for t_ms in sorted(buckets.values())]
    if not points:
        return []
    concentrations = await window_means(conn, minutes, policy.ispu_window_minutes)
    signals = []
    newest: dict[str, tuple[Any, ...]] = {}
    for device_id, t_ms in points:  # each station's minutes in time order
        result = ispu.station_ispu(concentrations.get((device_id, t_ms), {}))
        if result is None:
            continue
        rank = ispu.CATEGORIES.index(result.category)
        subs = {p: (round(v, 1) if math.isfinite(v) else "> 500") for p, v in result.sub_indices.items()}
        newest[device_id] = (
            device_id,
            t_ms,
            float(result.value),
            result.category.name,
            result.critical,
            Jsonb(subs),
            policy.ispu_window_minutes,
        )
        severities, version = ISPU_SEVERITY, None
        if rules_of is not None:
            city_rules = rules_of(device_id)
            severities, version = city_rules.rules.ispu_severity(), city_rules.version
        if rank in severities:
            details: dict[str, object] = {
                "ispu": result.label,
                "category": result.category.name,
                "critical": result.critical,
            }
            if version is not None:
                details["rules_version"] = version
            signals.append(
                Signal(
                    device_id,
                    "air_quality_unhealthy",
                    result.critical,
                    severities[rank],
                    t_ms,
                    result.value,
                    f"ISPU {result.label} ({result.category.name}), critical pollutant {result.critical}",
                    details,
                )
            )
    if newest:  # one statement for all stations (one each: an upsert may not meet a row twice)
        await conn.execute(
            "INSERT INTO station_ispu (device_id, ts, ispu, category, critical, sub_indices, window_minutes) "
            "SELECT d, kota_ms(t), i, c, p, s, w FROM unnest(%b::text[], %b::bigint[], %b::float8[], %b::text[], "
            "%b::text[], %b::jsonb[], %b::int[]) AS n(d, t, i, c, p, s, w) "
            "ON CONFLICT (device_id) DO UPDATE SET ts = EXCLUDED.ts, ispu = EXCLUDED.ispu, "
            "category = EXCLUDED.category, critical = EXCLUDED.critical, "
            "sub_indices = EXCLUDED.sub_indices, window_minutes = EXCLUDED.window_minutes, updated_at = now() "
            "WHERE station_ispu.ts <= EXCLUDED.ts",
            [list(column) for column in zip(*newest.values(), strict=True)],
        )
    return signals


async def evaluate_flood_gates(
    conn: psycopg.AsyncConnection,
    levels: dict[str, list[tuple[int, float]]],
    policy: RulePolicy,
    rules_of: RulesOf = None,
) -> list[Signal]:
    """Siaga status and rate of rise for the gates that sent water levels in this batch. A gate's
    thresholds: its city's rules for that gate, else its flood_gates row, else the rules' default
    (the policy's without rules)."""
    if not levels:
        return []
    gates = list(levels)
    cur = await conn.execute(
        "SELECT device_id, siaga3_cm, siaga2_cm, siaga1_cm, rise_cm_per_h FROM flood_gates WHERE device_id = ANY(%s)",
        (gates,),
    )
    configured = {row[0]: row[1:] for row in await cur.fetchall()}
    cur = await conn.execute(
        "SELECT device_id, (extract(epoch FROM ts) * 1000)::bigint, siaga FROM gate_status WHERE device_id = ANY(%s)",
        (gates,),
    )
    status = {device_id: (ts_ms, siaga) for device_id, ts_ms, siaga in await cur.fetchall()}
    newest = {g: max(levels[g]) for g in gates}  # (ts_ms, level) of each gate's newest reading
    cur = await conn.execute(
        "SELECT k.device_id, (extract(epoch FROM r.last_ts) * 1000)::bigint, r.last_value "
        "FROM unnest(%b::text[], %b::bigint[]) AS k(device_id, t_ms) CROSS JOIN LATERAL ("
        "  SELECT last_ts, last_value FROM agg_1m a WHERE a.device_id = k.device_id AND a.metric = %s "
        "  AND a.bucket <= kota_ms(k.t_ms - %s) ORDER BY a.bucket DESC LIMIT 1) r",
        (gates, [newest[g][0] for g in gates], WATER_LEVEL, policy.rise_window_minutes * 60_000),
    )
    earlier = {device_id: (ts_ms, value) for device_id, ts_ms, value in await cur.fetchall()}

    signals: list[Signal] = []
    rows = []
    for gate in gates:
        default = (policy.siaga3_cm, policy.siaga2_cm, policy.siaga1_cm, policy.rise_cm_per_h)
        versioned: dict[str, object] = {}
        if rules_of is not None:
            city_rules = rules_of(gate)
            flood = city_rules.rules.flood
            default = flood.default.as_tuple()
            versioned = {"rules_version": city_rules.version}
            if gate in flood.gates:
                configured[gate] = flood.gates[gate].as_tuple()
        siaga3, siaga2, siaga1, rise_limit = configured.get(gate, default)
        thresholds = (siaga3, siaga2, siaga1)
        status_ts, current = status.get(gate, (-1, 4))
        for ts_ms, level in sorted(levels[gate]):
            siaga = siaga_for(level, thresholds, current if ts_ms > status_ts else 4, policy.siaga_deadband_cm)
            if siaga <= 3:
                step = f", up from Siaga {current}" if ts_ms > status_ts and siaga < current else ""
                signals.append(
                    Signal(
                        gate,
                        "flood_siaga",
                        WATER_LEVEL,
                        SIAGA_SEVERITY[siaga],
                        ts_ms,
                        level,
                        f"Siaga {siaga}: water at {level:.0f} cm{step}",
                        {"siaga": siaga, "thresholds_cm": list(thresholds), **versioned},
                    )
                )
            if ts_ms > status_ts:
                status_ts, current = ts_ms, siaga
        ts_ms, level = newest[gate]
        rise = None
        if gate in earlier and ts_ms > earlier[gate][0]:
            rise = (level - earlier[gate][1]) / ((ts_ms - earlier[gate][0]) / 3_600_000)
            if rise > rise_limit:
                signals.append(
                    Signal(
                        gate,
                        "flood_rising",
                        WATER_LEVEL,
                        "major",
                        ts_ms,
                        level,
                        f"water rising {rise:.0f} cm/h (limit {rise_limit:.0f}), now {level:.0f} cm",
                        {"rise_cm_per_h": round(rise, 1), **versioned},
                    )
                )
        rows.append((gate, status_ts, level if status_ts == ts_ms else None, current, rise))
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO gate_status (device_id, ts, level_cm, siaga, rise_cm_per_h) VALUES (%s, kota_ms(%s), "
            "coalesce(%s, 0), %s, %s) ON CONFLICT (device_id) DO UPDATE SET ts = EXCLUDED.ts, "
            "level_cm = EXCLUDED.level_cm, siaga = EXCLUDED.siaga, rise_cm_per_h = EXCLUDED.rise_cm_per_h, "
            "updated_at = now() WHERE gate_status.ts < EXCLUDED.ts",
            [r for r in rows if r[2] is not None],
        )
    return signals


def detector_signal(device_id: str, metric: str, ts_ms: int, value: float, score: float, reason: str) -> Signal:
    """The alert signal for a detector's anomaly. Severity: impossible values and fast rises are major;
    spikes, dips and level shifts are major when the score is high, minor otherwise; a stuck sensor
    is a warning (the reading may still be right), as is a metric that no longer agrees with its
    partner (kota.contract.RELATIONS: which of the two sensors is wrong takes a look); a silent one
    is minor."""
    severity: Severity
    if reason in ("out_of_range", "rate_of_change"):
        severity = "major"
    elif reason in ("stuck", "inconsistent"):
        severity = "warning"
    elif reason == "dropout":
        severity = "minor"
    else:
        severity = "major" if score >= 0.8 else "minor"
    label = reason.replace("_", " ")
    if reason == "dropout":
        message = f"{metric} silent for much longer than usual"
    elif reason == "inconsistent":
        partners = [r.reference for r in RELATIONS if r.primary == metric]
        partner = partners[0] if partners else "its partner metric"
        message = (
            f"{metric} no longer agrees with {partner} of the same device: one of the two sensors is "
            f"drifting or failing (now {value:g}, score {score:.2f})"
        )
    else:
        message = f"{label} in {metric}: {value:g} (score {score:.2f})"
    return Signal(device_id, reason, metric, severity, ts_ms, value, message, {"score": round(score, 3)})
