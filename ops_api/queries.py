"""Every read of the database the ops API makes, in one place.

Scope is part of every query: `cities` is the caller's list (None for an admin), so a row of
another city is never read, let alone returned.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from ops_api.settings import ApiSettings
from processing import ispu
from processing.rules import RulePolicy, suspected_leak

Row = dict[str, Any]
GATE_DEFAULTS = RulePolicy()  # the rules' defaults: gate thresholds, leak coverage
SIAGA_LABELS = {4: "Siaga 4 (normal)", 3: "Siaga 3 (waspada)", 2: "Siaga 2 (siaga)", 1: "Siaga 1 (awas)"}
CATEGORY_BY_NAME = {c.name: c for c in ispu.CATEGORIES}

_STATUS = """CASE WHEN {seen} IS NULL THEN 'offline'
                  WHEN {seen} >= now() - make_interval(secs => %(stale_s)s) THEN 'online'
                  WHEN {seen} >= now() - make_interval(secs => %(offline_s)s) THEN 'stale'
                  ELSE 'offline' END"""


def _status_params(settings: ApiSettings) -> Row:
    return {"stale_s": settings.stale_after_s, "offline_s": settings.offline_after_s}


async def _all(conn: AsyncConnection, sql: str, params: Row | tuple[Any, ...]) -> list[Row]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(sql, params)
    return await cur.fetchall()


async def _one(conn: AsyncConnection, sql: str, params: Row | tuple[Any, ...]) -> Row | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(sql, params)
    return await cur.fetchone()


def ispu_view(value: float | None, category: str | None) -> Row:
    """ISPU as shown: a finite number, or "> 500" above the top band, with category and colours."""
    if value is None or category is None:
        return {"value": None, "display": None, "category": None, "category_en": None, "colour": None, "hex": None}
    c = CATEGORY_BY_NAME[category]
    finite = math.isfinite(value)
    return {
        "value": round(value) if finite else None,
        "display": str(round(value)) if finite else "> 500",
        "category": c.name,
        "category_en": c.name_en,
        "colour": c.colour,
        "hex": c.hex,
    }


# -- cities and devices --------------------------------------------------------------------------
async def cities(conn: AsyncConnection, scope: list[str] | None, settings: ApiSettings) -> list[Row]:
    return await _all(
        conn,
        f"""
        SELECT d.city, count(*) AS devices,
               count(*) FILTER (WHERE st = 'online') AS online, count(*) FILTER (WHERE st = 'stale') AS stale,
               count(*) FILTER (WHERE st = 'offline') AS offline,
               array_agg(DISTINCT d.district) FILTER (WHERE d.district IS NOT NULL) AS districts
        FROM devices d
        LEFT JOIN LATERAL (SELECT max(ts) AS seen FROM latest_values l WHERE l.device_id = d.device_id) s ON true
        CROSS JOIN LATERAL (SELECT {_STATUS.format(seen="s.seen")} AS st) x
        WHERE (%(scope)s::text[] IS NULL OR d.city = ANY(%(scope)s))
        GROUP BY d.city ORDER BY d.city""",
        {"scope": scope, **_status_params(settings)},
    )


async def city_exists(conn: AsyncConnection, city: str) -> bool:
    return await _one(conn, "SELECT 1 AS found FROM devices WHERE city = %s LIMIT 1", (city,)) is not None


async def devices(
    conn: AsyncConnection,
    scope: list[str] | None,
    settings: ApiSettings,
    *,
    city: str | None,
    domain: str | None,
    district: str | None,
) -> list[Row]:
    return await _all(
        conn,
        f"""
        SELECT d.device_id, d.city, d.domain, d.device_type, d.district, d.lat, d.lon, d.enabled,
               lv.last_seen, coalesce(lv.latest, '{{}}'::jsonb) AS latest,
               {_STATUS.format(seen="lv.last_seen")} AS status, s.ispu, s.category
        FROM devices d
        LEFT JOIN LATERAL (
            SELECT max(ts) AS last_seen, jsonb_object_agg(metric, jsonb_build_object('value', value, 'unit', unit,
                                                                                    'ts', ts)) AS latest
            FROM latest_values l WHERE l.device_id = d.device_id) lv ON true
        LEFT JOIN station_ispu s ON s.device_id = d.device_id
        WHERE (%(scope)s::text[] IS NULL OR d.city = ANY(%(scope)s))
          AND (%(city)s::text IS NULL OR d.city = %(city)s)
          AND (%(domain)s::text IS NULL OR d.domain = %(domain)s)
          AND (%(district)s::text IS NULL OR d.district = %(district)s)
        ORDER BY d.device_id""",
        {"scope": scope, "city": city, "domain": domain, "district": district, **_status_params(settings)},
    )


async def device(conn: AsyncConnection, scope: list[str] | None, settings: ApiSettings, device_id: str) -> Row | None:
    return await _one(
        conn,
        f"""
        SELECT d.device_id, d.city, d.domain, d.device_type, d.district, d.lat, d.lon, d.enabled, d.gateway_id,
               d.metrics, d.created_at, d.updated_at, lv.last_seen,
               {_STATUS.format(seen="lv.last_seen")} AS status,
               (SELECT count(*) FROM alerts a WHERE a.device_id = d.device_id AND a.state <> 'cleared') AS open_alerts
        FROM devices d
        LEFT JOIN LATERAL (SELECT max(ts) AS last_seen FROM latest_values l WHERE l.device_id = d.device_id) lv ON true
        WHERE d.device_id = %(device_id)s AND (%(scope)s::text[] IS NULL OR d.city = ANY(%(scope)s))""",
        {"device_id": device_id, "scope": scope, **_status_params(settings)},
    )


async def device_city(conn: AsyncConnection, scope: list[str] | None, device_id: str) -> str | None:
    """The device's city if the caller may see it."""
    row = await _one(
        conn,
        "SELECT city FROM devices WHERE device_id = %s AND (%s::text[] IS NULL OR city = ANY(%s))",
        (device_id, scope, scope),
    )
    return row["city"] if row else None


async def sender_city(conn: AsyncConnection, scope: list[str] | None, sender_id: str) -> str | None:
    """The city of the device or gateway `sender_id` (one id namespace) if the caller may see it:
    one round trip."""
    row = await _one(
        conn,
        "SELECT city FROM (SELECT city FROM devices WHERE device_id = %(id)s "
        "UNION ALL SELECT city FROM gateways WHERE gateway_id = %(id)s) s "
        "WHERE %(scope)s::text[] IS NULL OR city = ANY(%(scope)s) LIMIT 1",
        {"id": sender_id, "scope": scope},
    )
    return row["city"] if row else None


async def latest_values_in_scope(conn: AsyncConnection, scope: list[str] | None, device_id: str) -> list[Row] | None:
    """The device's latest values, or None when the caller may not see the device: one round trip."""
    rows = await _all(
        conn,
        """
        SELECT lv.metric, lv.value, lv.unit, lv.ts
        FROM devices d LEFT JOIN latest_values lv USING (device_id)
        WHERE d.device_id = %s AND (%s::text[] IS NULL OR d.city = ANY(%s))
        ORDER BY lv.metric""",
        (device_id, scope, scope),
    )
    if not rows:
        return None
    return [r for r in rows if r["metric"] is not None]  # a device with no values yet: one row of NULLs


async def latest_values(conn: AsyncConnection, device_id: str) -> list[Row]:
    return await _all(
        conn, "SELECT metric, value, unit, ts FROM latest_values WHERE device_id = %s ORDER BY metric", (device_id,)
    )


async def last_reading_time(conn: AsyncConnection) -> Any:
    row = await _one(conn, "SELECT max(ts) AS ts FROM latest_values", ())
    return row["ts"] if row else None


# -- Smart Environment ---------------------------------------------------------------------------
async def air_quality(conn: AsyncConnection, city: str, district: str | None) -> list[Row]:
    rows = await _all(
        conn,
        """
        SELECT d.device_id, d.district, d.lat, d.lon, s.ts, s.ispu, s.category, s.critical, s.sub_indices,
               s.window_minutes
        FROM devices d LEFT JOIN station_ispu s USING (device_id)
        WHERE d.city = %(city)s AND (%(district)s::text IS NULL OR d.district = %(district)s)
          AND d.metrics ?| array['pm25', 'pm10', 'no2', 'o3', 'co', 'so2']
        ORDER BY s.ispu DESC NULLS LAST, d.device_id""",
        {"city": city, "district": district},
    )
    for r in rows:
        r["ispu"] = ispu_view(r.pop("ispu"), r.pop("category"))
        r["sub_indices"] = {
            k: (None if v is None or not math.isfinite(v) else round(v, 1)) for k, v in (r["sub_indices"] or {}).items()
        }
    return rows


async def noise(conn: AsyncConnection, city: str, district: str | None, settings: ApiSettings) -> list[Row]:
    # The hour's LAeq is the energy mean of the minute means, not their arithmetic mean.
    rows = await _all(
        conn,
        """
        SELECT d.device_id, d.district, d.lat, d.lon, la.ts, la.value AS laeq, lm.value AS lamax,
               coalesce(n.zone, 'residential') AS zone, coalesce(n.limit_dba, %(limit)s) AS limit_dba,
               n.limit_dba IS NOT NULL AS own_limit,
               (SELECT 10 * log(avg(power(10, (a.sum / a.n) / 10))) FROM agg_1m a
                WHERE a.device_id = d.device_id AND a.metric = 'LAeq' AND a.bucket >= now() - interval '1 hour'
               ) AS laeq_1h
        FROM devices d
        LEFT JOIN latest_values la ON la.device_id = d.device_id AND la.metric = 'LAeq'
        LEFT JOIN latest_values lm ON lm.device_id = d.device_id AND lm.metric = 'LAmax'
        LEFT JOIN noise_limits n ON n.device_id = d.device_id
        WHERE d.city = %(city)s AND (%(district)s::text IS NULL OR d.district = %(district)s) AND d.metrics ? 'LAeq'
        ORDER BY la.value DESC NULLS LAST, d.device_id""",
        {"city": city, "district": district, "limit": settings.noise_limit_dba},
    )
    for r in rows:
        r["exceeds_limit"] = r["laeq"] is not None and r["laeq"] > r["limit_dba"]
        r["excess_db"] = round(r["laeq"] - r["limit_dba"], 1) if r["exceeds_limit"] else 0.0
    return rows


async def water_levels(conn: AsyncConnection, city: str, district: str | None) -> list[Row]:
    rows = await _all(
        conn,
        """
        SELECT d.device_id, d.district, d.lat, d.lon, coalesce(g.ts, lv.ts) AS ts,
               coalesce(g.level_cm, lv.value) AS level_cm, g.siaga, g.rise_cm_per_h,
               coalesce(f.siaga3_cm, %(s3)s) AS siaga3_cm, coalesce(f.siaga2_cm, %(s2)s) AS siaga2_cm,
               coalesce(f.siaga1_cm, %(s1)s) AS siaga1_cm, coalesce(f.rise_cm_per_h, %(rise)s) AS rise_limit_cm_per_h,
               f.device_id IS NOT NULL AS own_thresholds
        FROM devices d
        LEFT JOIN gate_status g ON g.device_id = d.device_id
        LEFT JOIN flood_gates f ON f.device_id = d.device_id
        LEFT JOIN latest_values lv ON lv.device_id = d.device_id AND lv.metric = 'currentLevel'
        WHERE d.city = %(city)s AND (%(district)s::text IS NULL OR d.district = %(district)s)
          AND d.metrics ? 'currentLevel'
        ORDER BY g.siaga NULLS LAST, g.level_cm DESC NULLS LAST, d.device_id""",
        {
            "city": city,
            "district": district,
            "s3": GATE_DEFAULTS.siaga3_cm,
            "s2": GATE_DEFAULTS.siaga2_cm,
            "s1": GATE_DEFAULTS.siaga1_cm,
            "rise": GATE_DEFAULTS.rise_cm_per_h,
        },
    )
    for r in rows:
        r["siaga_label"] = SIAGA_LABELS.get(r["siaga"]) if r["siaga"] else None
        r["rising_fast"] = r["rise_cm_per_h"] is not None and r["rise_cm_per_h"] > r["rise_limit_cm_per_h"]
    return rows


# -- Smart Living --------------------------------------------------------------------------------
async def traffic(conn: AsyncConnection, city: str, district: str | None, settings: ApiSettings) -> list[Row]:
    """Corridors now, against the usual for this hour and weekday (mean of the same local hour and
    weekday over the last weeks) and against their free-flow speed (95th percentile of the past
    weeks' complete hourly means)."""
    rows = await _all(
        conn,
        """
        WITH here AS (SELECT now() AT TIME ZONE %(tz)s AS local)
        SELECT d.device_id, d.district, d.lat, d.lon, sp.ts, sp.value AS speed_kmh, oc.value AS occupancy,
               it.value AS intensity, usual.speed AS usual_speed_kmh, usual.occupancy AS usual_occupancy,
               usual.hours AS usual_hours, ff.speed AS free_flow_kmh
        FROM devices d CROSS JOIN here
        LEFT JOIN latest_values sp ON sp.device_id = d.device_id AND sp.metric = 'averageVehicleSpeed'
        LEFT JOIN latest_values oc ON oc.device_id = d.device_id AND oc.metric = 'occupancy'
        LEFT JOIN latest_values it ON it.device_id = d.device_id AND it.metric = 'intensity'
        LEFT JOIN LATERAL (
            SELECT avg(h.sum / h.n) FILTER (WHERE h.metric = 'averageVehicleSpeed') AS speed,
                   avg(h.sum / h.n) FILTER (WHERE h.metric = 'occupancy') AS occupancy,
                   count(*) FILTER (WHERE h.metric = 'averageVehicleSpeed') AS hours
            FROM agg_1h h
            WHERE h.device_id = d.device_id AND h.metric IN ('averageVehicleSpeed', 'occupancy')
              AND h.bucket >= now() - make_interval(weeks => %(weeks)s)
              AND h.bucket < date_trunc('hour', now())
              AND extract(isodow FROM h.bucket AT TIME ZONE %(tz)s) = extract(isodow FROM here.local)
              AND extract(hour FROM h.bucket AT TIME ZONE %(tz)s) = extract(hour FROM here.local)) usual ON true
        LEFT JOIN LATERAL (
            SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY h.sum / h.n) AS speed FROM agg_1h h
            WHERE h.device_id = d.device_id AND h.metric = 'averageVehicleSpeed'
              AND h.bucket >= now() - make_interval(weeks => %(weeks)s)
              AND h.bucket < date_trunc('hour', now())) ff ON true
        WHERE d.city = %(city)s AND (%(district)s::text IS NULL OR d.district = %(district)s)
          AND d.metrics ? 'averageVehicleSpeed'
        ORDER BY d.device_id""",
        {"city": city, "district": district, "tz": settings.timezone, "weeks": settings.baseline_weeks},
    )
    for r in rows:
        free_flow = max(r["free_flow_kmh"] or settings.free_flow_kmh, r["speed_kmh"] or 0.0)
        r["free_flow_kmh"] = free_flow
        r["congestion_index"] = (
            None if r["speed_kmh"] is None else round(min(1.0, max(0.0, 1 - r["speed_kmh"] / free_flow)), 3)
        )
        r["speed_vs_usual_pct"] = _percent_change(r["speed_kmh"], r["usual_speed_kmh"])
        r["congested"] = r["congestion_index"] is not None and r["congestion_index"] >= 0.5
    return rows


def _percent_change(now: float | None, usual: float | None) -> float | None:
    if now is None or not usual:
        return None
    return round((now - usual) / usual * 100, 1)


async def utilities(conn: AsyncConnection, city: str, district: str | None, settings: ApiSettings) -> list[Row]:
    """Meters: the last hour's mean against the same local hour over the previous week; water meters
    whose lowest flow over the leak window stays `leak_min_flow_m3h` above the lowest they usually
    reach in those hours (median over earlier days) are suspected leaks."""
    rows = await _all(
        conn,
        """
        WITH meters AS (
            SELECT d.device_id, d.district, d.lat, d.lon, d.device_type,
                   CASE WHEN d.metrics ? 'waterConsumption' THEN 'waterConsumption' ELSE 'activePower' END AS metric
            FROM devices d
            WHERE d.city = %(city)s AND (%(district)s::text IS NULL OR d.district = %(district)s)
              AND (d.metrics ? 'waterConsumption' OR d.metrics ? 'activePower'))
        SELECT m.*, lv.value AS latest, lv.unit, lv.ts,
               (SELECT sum(a.sum) / sum(a.n) FROM agg_1m a WHERE a.device_id = m.device_id AND a.metric = m.metric
                  AND a.bucket >= now() - interval '1 hour') AS last_hour_mean,
               (SELECT avg(h.sum / h.n) FROM agg_1h h WHERE h.device_id = m.device_id AND h.metric = m.metric
                  AND h.bucket >= now() - interval '8 days' AND h.bucket < date_trunc('hour', now()) - interval '1 hour'
                  AND extract(hour FROM h.bucket AT TIME ZONE %(tz)s) = extract(hour FROM now() AT TIME ZONE %(tz)s)
               ) AS baseline_mean,
               leak.minutes AS leak_window_minutes, leak.floor AS leak_window_min_flow,
               usual.floor AS leak_usual_min_flow, coalesce(usual.days, 0) AS leak_history_days
        FROM meters m
        LEFT JOIN latest_values lv ON lv.device_id = m.device_id AND lv.metric = m.metric
        LEFT JOIN LATERAL (
            SELECT count(*) AS minutes, min(a.min) AS floor FROM agg_1m a
            WHERE m.metric = 'waterConsumption' AND a.device_id = m.device_id AND a.metric = m.metric
              AND a.bucket >= now() - make_interval(secs => %(leak_s)s)) leak ON true
        LEFT JOIN LATERAL (
            SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY day.floor) AS floor, count(*) AS days
            FROM (SELECT min(h.min) AS floor FROM generate_series(1, %(leak_days)s) AS d(n)
                  JOIN agg_1h h ON h.device_id = m.device_id AND h.metric = m.metric
                   AND h.bucket >= now() - make_interval(days => d.n, secs => %(leak_s)s)
                   AND h.bucket < now() - make_interval(days => d.n)
                  GROUP BY d.n) day
            WHERE m.metric = 'waterConsumption') usual ON true
        ORDER BY m.device_id""",
        {
            "city": city,
            "district": district,
            "tz": settings.timezone,
            "leak_s": settings.leak_window_h * 3600,
            "leak_days": settings.leak_history_days,
        },
    )
    # The processor's minimum-night-flow rule (processing.rules) over the last leak window, at any
    # hour: most of the window must be covered by data.
    needed_minutes = settings.leak_window_h * 60 * GATE_DEFAULTS.leak_coverage
    for r in rows:
        r["vs_baseline_pct"] = _percent_change(r["last_hour_mean"], r["baseline_mean"])
        floor, usual = r["leak_window_min_flow"], r["leak_usual_min_flow"]
        r["suspected_leak"] = r["metric"] == "waterConsumption" and suspected_leak(
            r["leak_window_minutes"], needed_minutes, floor, usual, settings.leak_min_flow_m3h
        )
    return rows


async def street_lights(conn: AsyncConnection, city: str, district: str | None, settings: ApiSettings) -> list[Row]:
    """Per district: lights on, off, at fault (state 2, or on without drawing power) and offline."""
    return await _all(
        conn,
        f"""
        WITH lights AS (
            SELECT coalesce(d.district, '-') AS district,
                   CASE WHEN {_STATUS.format(seen="st.ts")} = 'offline' THEN 'offline'
                        WHEN st.value = 2 OR (st.value = 1 AND coalesce(pw.value, 0) < %(fault_w)s) THEN 'fault'
                        WHEN st.value = 1 THEN 'on' ELSE 'off' END AS state
            FROM devices d
            LEFT JOIN latest_values st ON st.device_id = d.device_id AND st.metric = 'powerState'
            LEFT JOIN latest_values pw ON pw.device_id = d.device_id AND pw.metric = 'powerConsumption'
            WHERE d.city = %(city)s AND (%(district)s::text IS NULL OR d.district = %(district)s)
              AND d.metrics ? 'powerState')
        SELECT district, count(*) AS total, count(*) FILTER (WHERE state = 'on') AS "on",
               count(*) FILTER (WHERE state = 'off') AS "off", count(*) FILTER (WHERE state = 'fault') AS fault,
               count(*) FILTER (WHERE state = 'offline') AS offline
        FROM lights GROUP BY district ORDER BY district""",
        {"city": city, "district": district, "fault_w": settings.lamp_fault_w, **_status_params(settings)},
    )


# -- province --------------------------------------------------------------------------------------
async def province(conn: AsyncConnection, scope: list[str] | None, settings: ApiSettings) -> list[Row]:
    rows = await _all(
        conn,
        f"""
        WITH c AS (SELECT DISTINCT city FROM devices WHERE %(scope)s::text[] IS NULL OR city = ANY(%(scope)s))
        SELECT c.city,
               (SELECT count(*) FROM devices d
                LEFT JOIN LATERAL (SELECT max(ts) AS seen FROM latest_values l WHERE l.device_id = d.device_id) s
                  ON true
                WHERE d.city = c.city AND {_STATUS.format(seen="s.seen")} = 'offline') AS devices_offline,
               (SELECT count(*) FROM devices d WHERE d.city = c.city) AS devices,
               w.device_id AS worst_ispu_device, w.ispu AS worst_ispu, w.category AS worst_ispu_category,
               (SELECT count(*) FROM gate_status g JOIN devices d USING (device_id)
                WHERE d.city = c.city AND g.siaga < 4) AS gates_at_siaga,
               (SELECT min(g.siaga) FROM gate_status g JOIN devices d USING (device_id)
                WHERE d.city = c.city) AS worst_siaga,
               (SELECT coalesce(jsonb_object_agg(severity, n), '{{}}'::jsonb) FROM (
                    SELECT severity, count(*) AS n FROM alerts a WHERE a.city = c.city AND a.state <> 'cleared'
                    GROUP BY severity) x) AS open_alerts
        FROM c
        LEFT JOIN LATERAL (SELECT s.device_id, s.ispu, s.category FROM station_ispu s JOIN devices d USING (device_id)
                           WHERE d.city = c.city ORDER BY s.ispu DESC LIMIT 1) w ON true
        ORDER BY c.city""",
        {"scope": scope, **_status_params(settings)},
    )
    for r in rows:
        r["worst_ispu"] = {
            "device_id": r.pop("worst_ispu_device"),
            **ispu_view(r.pop("worst_ispu"), r.pop("worst_ispu_category")),
        }
        r["open_alerts"] = {s: r["open_alerts"].get(s, 0) for s in ("critical", "major", "minor", "warning")}
    return rows


# -- alerts ----------------------------------------------------------------------------------------
ALERT_COLUMNS = """a.alert_id, a.device_id, a.city, a.domain, d.district, a.alert_type, a.metric, a.severity,
    a.state, a.message, a.count, a.first_ts, a.last_ts, a.last_value, a.details, a.created_at, a.updated_at,
    a.acknowledged_at, a.acknowledged_by, a.cleared_at, a.cleared_by"""


async def alerts(
    conn: AsyncConnection,
    scope: list[str] | None,
    *,
    city: str | None,
    domain: str | None,
    severity: str | None,
    state: str | None,
    device_id: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    before_id: int | None,
    limit: int,
) -> list[Row]:
    return await _all(
        conn,
        f"""
        SELECT {ALERT_COLUMNS} FROM alerts a LEFT JOIN devices d USING (device_id)
        WHERE (%(scope)s::text[] IS NULL OR a.city = ANY(%(scope)s))
          AND (%(city)s::text IS NULL OR a.city = %(city)s)
          AND (%(domain)s::text IS NULL OR a.domain = %(domain)s)
          AND (%(severity)s::text IS NULL OR a.severity = %(severity)s)
          AND (%(device_id)s::text IS NULL OR a.device_id = %(device_id)s)
          AND (%(state)s::text IS NULL OR a.state = %(state)s OR (%(state)s = 'open' AND a.state <> 'cleared'))
          AND (%(since)s::timestamptz IS NULL OR a.last_ts >= %(since)s)
          AND (%(until)s::timestamptz IS NULL OR a.first_ts < %(until)s)
          AND (%(before)s::bigint IS NULL OR a.alert_id < %(before)s)
        ORDER BY a.alert_id DESC LIMIT %(limit)s""",
        {
            "scope": scope,
            "city": city,
            "domain": domain,
            "severity": severity,
            "state": state,
            "device_id": device_id,
            "since": since,
            "until": until,
            "before": before_id,
            "limit": limit,
        },
    )


async def alert(conn: AsyncConnection, scope: list[str] | None, alert_id: int) -> Row | None:
    row = await _one(
        conn,
        f"""SELECT {ALERT_COLUMNS} FROM alerts a LEFT JOIN devices d USING (device_id)
                               WHERE a.alert_id = %(id)s AND (%(scope)s::text[] IS NULL OR a.city = ANY(%(scope)s))""",
        {"id": alert_id, "scope": scope},
    )
    if row is not None:
        row["history"] = await _all(
            conn,
            "SELECT event_id, at, action, actor, severity, comment FROM alert_events "
            "WHERE alert_id = %s ORDER BY event_id",
            (alert_id,),
        )
    return row


async def audit(
    conn: AsyncConnection, scope: list[str] | None, *, city: str | None, before_id: int | None, limit: int
) -> list[Row]:
    return await _all(
        conn,
        """
        SELECT event_id, at, actor, action, target_type, target_id, city, details FROM audit_log
        WHERE (%(scope)s::text[] IS NULL OR city = ANY(%(scope)s))
          AND (%(city)s::text IS NULL OR city = %(city)s)
          AND (%(before)s::bigint IS NULL OR event_id < %(before)s)
        ORDER BY event_id DESC LIMIT %(limit)s""",
        {"scope": scope, "city": city, "before": before_id, "limit": limit},
    )
