"""Hourly and daily rollups and retention on plain PostgreSQL (the TimescaleDB path: test_timescaledb.py)."""

import datetime as dt
import time

import psycopg
import pytest

from kota.schema import ensure_partitions, partition_name
from processing.maintenance import apply_retention
from tests.helpers import (
    minute_aggregates_from_readings,
    provision,
    publish_series,
    query,
    stored_minute_aggregates,
    stored_readings,
    wait_for,
)

pytestmark = pytest.mark.stack

def test_hourly_and_daily_rollups_equal_an_aggregation_of_the_raw_readings(pipeline):
    meter = provision(pipeline, "water_meter")
    # Every 7 minutes for 30 hours ending an hour ago: many hours, at least one day boundary.
    start = int(time.time() * 1000) - 31 * 3_600_000
    points = [(start + i * 420_000, round(3.0 + (i % 13) * 0.1, 2)) for i in range(30 * 60 // 7)]
    publish_series(pipeline, meter, "pressure", points[::2])
    publish_series(pipeline, meter, "pressure", points[1::2])  # late halves merge into the same hours
    wait_for(lambda: len(stored_readings(pipeline, meter.device_id)) == len(points), what="the readings")

    # Merged by the batches that stored the readings: equal as soon as the readings are there.
    for table, width in (("agg_1h", "1 hour"), ("agg_1d", "1 day")):
        assert stored_minute_aggregates(pipeline, meter.device_id, table) == \
            minute_aggregates_from_readings(pipeline, meter.device_id, width), table
    assert len(stored_minute_aggregates(pipeline, meter.device_id, "agg_1h")) >= 30
    daily = stored_minute_aggregates(pipeline, meter.device_id, "agg_1d")
    assert len(daily) >= 2
    assert sum(row[2] for row in daily) == len(points)


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

