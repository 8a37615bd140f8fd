"""Periodic upkeep the plain-PostgreSQL path does itself, where TimescaleDB has policies.

- Rollups: hourly and daily aggregates (`agg_1h`, `agg_1d`) recomputed from `agg_1m` for the hours
  the processor marked in `rollup_dirty`. The partials merge exactly (counts and sums add, min and
  max combine, first and last by time), so a rollup equals an aggregation of the raw readings, the
  same answer TimescaleDB's continuous aggregates give. A job, not a merge in each batch: its cost
  follows series and minutes (an hour's agg_1m rows), not readings (docs/processing.md).
- Retention: the numbers in `retention_settings`; daily partitions of `readings` older than that
  are dropped whole, older rows of the other tables deleted.

One processor at a time does it (advisory lock), in its own short transactions.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from kota.schema import Backend, daily_partitions

log = logging.getLogger("kota.maintenance")

_LOCK_ID = 0x6B6F7462


def _roll_up(target: str, source: str, width: str) -> sql.Composed:
    """Recompute `target` windows of `width` (starts given as a parameter) by merging `source`'s
    partials: counts and sums add, min and max combine, first and last go by their times."""
    return sql.SQL("""
INSERT INTO {target} (device_id, metric, bucket, n, sum, sum_sq, min, max, first_ts, first_value, last_ts, last_value)
SELECT a.device_id, a.metric, w.start, sum(n), sum(sum), sum(sum_sq), min(min), max(max),
       min(first_ts), (array_agg(first_value ORDER BY first_ts))[1],
       max(last_ts), (array_agg(last_value ORDER BY last_ts DESC))[1]
FROM unnest(%s::timestamptz[]) AS w(start)
JOIN {source} a ON a.bucket >= w.start AND a.bucket < w.start + {width}::interval
GROUP BY a.device_id, a.metric, w.start
ON CONFLICT (device_id, metric, bucket) DO UPDATE SET n = EXCLUDED.n, sum = EXCLUDED.sum,
    sum_sq = EXCLUDED.sum_sq, min = EXCLUDED.min, max = EXCLUDED.max, first_ts = EXCLUDED.first_ts,
    first_value = EXCLUDED.first_value, last_ts = EXCLUDED.last_ts, last_value = EXCLUDED.last_value
""").format(target=sql.Identifier(target), source=sql.Identifier(source), width=sql.Literal(width))


ROLL_UP_HOURS = _roll_up("agg_1h", "agg_1m", "1 hour")
ROLL_UP_DAYS = _roll_up("agg_1d", "agg_1h", "1 day")
RETAINED_BY_DELETE = {
    "agg_1m": "bucket",
    "agg_1h": "bucket",
    "agg_1d": "bucket",
    "anomalies": "ts",
    "late_readings": "ts",
}


@dataclass
class MaintenanceReport:
    hours_rolled_up: int = 0
    days_rolled_up: int = 0
    partitions_dropped: list[str] = field(default_factory=list)
    rows_deleted: dict[str, int] = field(default_factory=dict)


def run(dsn: str, backend: Backend, *, now: dt.datetime | None = None) -> MaintenanceReport:
    report = MaintenanceReport()
    if backend != "postgres":
        return report  # TimescaleDB's continuous-aggregate, compression and retention policies do this
    with psycopg.connect(dsn, autocommit=True) as conn:
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_ID,)).fetchone()[0]:  # type: ignore[index]
            return report  # another processor is at it
        try:
            roll_up(conn, report)
            apply_retention(conn, now or dt.datetime.now(dt.UTC), report)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return report


def roll_up(conn: psycopg.Connection, report: MaintenanceReport | None = None) -> MaintenanceReport:
    """Recompute the hours marked dirty, then the days that hold them, and delete the marks read.

    Nothing here waits for the processor or makes it wait: batches append marks (migration 0008),
    and this job deletes only the marks it read. A mark is committed with the data it marks, so
    every batch whose mark the first statement reads is visible to the recompute, a later statement
    (read committed); marks added meanwhile stay for the next round."""
    report = report or MaintenanceReport()
    marks = conn.execute("SELECT id, hour FROM rollup_dirty").fetchall()
    if not marks:
        return report
    hours = sorted({hour for _, hour in marks})
    days = sorted({h.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0) for h in hours})
    with conn.transaction():
        conn.execute(ROLL_UP_HOURS, (hours,))
        conn.execute(ROLL_UP_DAYS, (days,))
        conn.execute("DELETE FROM rollup_dirty WHERE id = ANY(%s)", ([mark for mark, _ in marks],))
    report.hours_rolled_up, report.days_rolled_up = len(hours), len(days)
    return report


def apply_retention(
    conn: psycopg.Connection, now: dt.datetime, report: MaintenanceReport | None = None
) -> MaintenanceReport:
    report = report or MaintenanceReport()
    keep: dict[str, int] = dict(
        conn.execute("SELECT table_name, keep_days FROM retention_settings WHERE keep_days IS NOT NULL")
    )
    if "readings" in keep:
        cutoff = (now - dt.timedelta(days=keep["readings"])).date()
        for name, day in sorted(daily_partitions(conn).items()):
            if day < cutoff:
                # As the schema's owner (migration 0011): the processor may drop only these partitions.
                conn.execute("SELECT kota_drop_readings_partition(%s)", (day,))
                report.partitions_dropped.append(name)
        deleted = conn.execute(
            "DELETE FROM readings_default WHERE ts < %s", (now - dt.timedelta(days=keep["readings"]),)
        ).rowcount
        report.rows_deleted["readings"] = deleted
    for table, column in RETAINED_BY_DELETE.items():
        if table in keep:
            report.rows_deleted[table] = conn.execute(
                f"DELETE FROM {table} WHERE {column} < %s",  # noqa: S608 (names from the dict above)
                (now - dt.timedelta(days=keep[table]),),
            ).rowcount
    if report.partitions_dropped:
        log.info("retention dropped partitions %s", report.partitions_dropped)
    return report
