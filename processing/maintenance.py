"""Periodic upkeep the plain-PostgreSQL path does itself, where TimescaleDB has policies.

Retention: the numbers in `retention_settings`; daily partitions of `readings` older than that are
dropped whole, older rows of the other tables deleted. (Hourly and daily rollups need no job: each
batch merges its readings into `agg_1h` and `agg_1d` as into `agg_1m`, processing/store.py.)

One processor at a time does it (advisory lock), in its own short transactions.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

import psycopg

from kota.schema import Backend, daily_partitions

log = logging.getLogger("kota.maintenance")

_LOCK_ID = 0x6B6F7462
RETAINED_BY_DELETE = {"agg_1m": "bucket", "agg_1h": "bucket", "agg_1d": "bucket", "anomalies": "ts",
                      "late_readings": "ts"}


@dataclass
class MaintenanceReport:
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
            apply_retention(conn, now or dt.datetime.now(dt.UTC), report)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return report


def apply_retention(conn: psycopg.Connection, now: dt.datetime, report: MaintenanceReport | None = None
                    ) -> MaintenanceReport:
    report = report or MaintenanceReport()
    keep: dict[str, int] = dict(conn.execute(
        "SELECT table_name, keep_days FROM retention_settings WHERE keep_days IS NOT NULL"))
    if "readings" in keep:
        cutoff = (now - dt.timedelta(days=keep["readings"])).date()
        for name, day in sorted(daily_partitions(conn).items()):
            if day < cutoff:
                conn.execute(f"DROP TABLE {name}")  # noqa: S608 (a partition name we made)
                report.partitions_dropped.append(name)
        deleted = conn.execute("DELETE FROM readings_default WHERE ts < %s",
                               (now - dt.timedelta(days=keep["readings"]),)).rowcount
        report.rows_deleted["readings"] = deleted
    for table, column in RETAINED_BY_DELETE.items():
        if table in keep:
            report.rows_deleted[table] = conn.execute(
                f"DELETE FROM {table} WHERE {column} < %s",  # noqa: S608 (names from the dict above)
                (now - dt.timedelta(days=keep[table]),)).rowcount
    if report.partitions_dropped:
        log.info("retention dropped partitions %s", report.partitions_dropped)
    return report
