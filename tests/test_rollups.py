"""Hourly and daily rollups and retention on plain PostgreSQL (the TimescaleDB path: test_timescaledb.py)."""

import datetime as dt
import time

import psycopg
import pytest

from kota.schema import ensure_partitions, partition_name
from processing.maintenance import apply_retention, roll_up
from tests.helpers import provision, publish_series, query, stored_readings, wait_for

pytestmark = pytest.mark.stack

ROLLUP_COLUMNS = "bucket, n, round(sum::numeric, 6), round(sum_sq::numeric, 6), min, max, first_ts, first_value, " \
                 "last_ts, last_value"


def _rollup(stack, table: str, device_id: str) -> list[tuple]:
    return query(stack, f"SELECT {ROLLUP_COLUMNS} FROM {table} WHERE device_id = %s ORDER BY bucket",  # noqa: S608
                 (device_id,))


def _from_readings(stack, width: str, device_id: str) -> list[tuple]:
    return query(stack, f"""
        SELECT date_bin(interval '{width}', ts, timestamptz 'epoch') AS bucket, count(*),
               round(sum(value)::numeric, 6), round(sum(value * value)::numeric, 6), min(value), max(value),
               min(ts), (array_agg(value ORDER BY ts))[1], max(ts), (array_agg(value ORDER BY ts DESC))[1]
        FROM readings WHERE device_id = %s GROUP BY 1 ORDER BY 1""", (device_id,))  # noqa: S608


def test_hourly_and_daily_rollups_equal_an_aggregation_of_the_raw_readings(pipeline):
    meter = provision(pipeline, "water_meter")
    # Every 7 minutes for 30 hours ending an hour ago: many hours, at least one day boundary.
    start = int(time.time() * 1000) - 31 * 3_600_000
    points = [(start + i * 420_000, round(3.0 + (i % 13) * 0.1, 2)) for i in range(30 * 60 // 7)]
    publish_series(pipeline, meter, "pressure", points[::2])
    publish_series(pipeline, meter, "pressure", points[1::2])  # late halves merge into the same hours
    wait_for(lambda: len(stored_readings(pipeline, meter.device_id)) == len(points), what="the readings")

    def rolled_up() -> bool:
        with psycopg.connect(pipeline.postgres_dsn, autocommit=True) as conn:
            roll_up(conn)  # the processor's job may have taken the dirty hours already: either way
        return (_rollup(pipeline, "agg_1h", meter.device_id) == _from_readings(pipeline, "1 hour", meter.device_id)
                and _rollup(pipeline, "agg_1d", meter.device_id) == _from_readings(pipeline, "1 day", meter.device_id))

    wait_for(rolled_up, what="hourly and daily rollups equal to the readings")
    assert len(_rollup(pipeline, "agg_1h", meter.device_id)) >= 30
    assert len(_rollup(pipeline, "agg_1d", meter.device_id)) >= 2
    assert sum(row[1] for row in _rollup(pipeline, "agg_1d", meter.device_id)) == len(points)


def test_retention_drops_old_partitions_and_deletes_old_rollups(stack):
    now = dt.datetime.now(dt.UTC)
    old_day = (now - dt.timedelta(days=200)).date()
    recent = now - dt.timedelta(days=1)
    device = f"retention-{time.time_ns()}"
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        ensure_partitions(conn, old_day)
        old = dt.datetime.combine(old_day, dt.time(12), dt.UTC)
        for ts in (old, recent):
            conn.execute("INSERT INTO readings VALUES (%s, %s, 'pressure', 1.0, %s) ON CONFLICT DO NOTHING",
                         (ts, device, ts))
            conn.execute("INSERT INTO agg_1m VALUES (%s, 'pressure', %s, 1, 1, 1, 1, 1, %s, 1, %s, 1)",
                         (device, ts - dt.timedelta(days=300), ts, ts))  # 300 days older again: past agg_1m's 400
        report = apply_retention(conn, now)
    assert partition_name(old_day) in report.partitions_dropped
    assert query(stack, "SELECT ts FROM readings WHERE device_id = %s", (device,)) == [(recent,)]
    [(kept,)] = query(stack, "SELECT bucket FROM agg_1m WHERE device_id = %s", (device,))
    assert kept == recent - dt.timedelta(days=300)
    assert query(stack, "SELECT keep_days FROM retention_settings WHERE table_name = 'readings'") == [(90,)]
