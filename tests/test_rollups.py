"""Hourly and daily rollups and retention on plain PostgreSQL (the TimescaleDB path: test_timescaledb.py)."""

import asyncio
import concurrent.futures
import datetime as dt
import time

import psycopg
import pytest

from kota.contract import READINGS_TOPIC, Reading
from kota.schema import ensure_partitions, partition_name
from processing import maintenance
from processing.maintenance import apply_retention, roll_up
from processing.store import Batch, PartitionSlice, WritePolicy, write_batch
from tests.helpers import (
    minute_aggregates_from_readings,
    provision,
    publish_series,
    query,
    stored_minute_aggregates,
    stored_readings,
    unique_id,
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

    def rolled_up() -> bool:
        with psycopg.connect(pipeline.postgres_dsn, autocommit=True) as conn:
            roll_up(conn)  # the processor's job may have taken the dirty hours already: either way
        return all(
            stored_minute_aggregates(pipeline, meter.device_id, table)
            == minute_aggregates_from_readings(pipeline, meter.device_id, width)
            for table, width in (("agg_1h", "1 hour"), ("agg_1d", "1 day"))
        )

    wait_for(rolled_up, what="hourly and daily rollups equal to the readings")
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
            conn.execute(
                "INSERT INTO readings VALUES (%s, %s, 'pressure', 1.0, %s) ON CONFLICT DO NOTHING", (ts, device, ts)
            )
            conn.execute(
                "INSERT INTO agg_1m VALUES (%s, 'pressure', %s, 1, 1, 1, 1, 1, %s, 1, %s, 1)",
                (device, ts - dt.timedelta(days=300), ts, ts),
            )  # 300 days older again: past agg_1m's 400
        report = apply_retention(conn, now)
    assert partition_name(old_day) in report.partitions_dropped
    assert query(stack, "SELECT ts FROM readings WHERE device_id = %s", (device,)) == [(recent,)]
    [(kept,)] = query(stack, "SELECT bucket FROM agg_1m WHERE device_id = %s", (device,))
    assert kept == recent - dt.timedelta(days=300)
    assert query(stack, "SELECT keep_days FROM retention_settings WHERE table_name = 'readings'") == [(90,)]


def test_a_batch_marking_an_hour_does_not_wait_for_the_rollup_job_nor_lose_its_mark(stack):
    """The rollup job recomputes an hour for seconds on a big day; a batch that touches that hour
    meanwhile must neither wait for it (it held the processor still) nor have its mark deleted
    before its data is rolled up."""
    device = provision(stack, "water_meter").device_id
    hour = (int(time.time() * 1000) - 2 * 3_600_000) // 3_600_000 * 3_600_000

    def batch(offset: int, ts: int) -> list[PartitionSlice]:
        reading = Reading(ts, "testkota", "utilities", device, "pressure", 2.5, "bar", ts, "test")
        return [PartitionSlice(0, offset, offset + 1, [(offset, [reading])])]

    async def write(group: str, slices: list[PartitionSlice]) -> None:
        async with await psycopg.AsyncConnection.connect(stack.postgres_dsn, options="-c statement_timeout=5s") as conn:
            await write_batch(conn, Batch(group, READINGS_TOPIC, slices), WritePolicy())

    def marks() -> list[tuple[int, int]]:
        return query(
            stack,
            "SELECT id, (extract(epoch FROM hour) * 1000)::bigint FROM rollup_dirty WHERE hour = kota_ms(%s)",
            (hour,),
        )

    def roll_up_as_the_job_does() -> None:
        with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
            roll_up(conn)

    group = unique_id("marks")
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as held:
        # The processors' own job stays out of the way (advisory lock), and this test's roll_up
        # stops at its first write, with the marks read, until agg_1h is released.
        held.execute("SELECT pg_advisory_lock(%s)", (maintenance._LOCK_ID,))
        try:
            asyncio.run(write(group, batch(0, hour + 60_000)))
            read_by_the_job = marks()
            assert read_by_the_job
            held.execute("BEGIN")
            held.execute("LOCK TABLE agg_1h IN EXCLUSIVE MODE")
            job = concurrent.futures.ThreadPoolExecutor(1).submit(roll_up_as_the_job_does)
            wait_for(
                lambda: (
                    query(stack, "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'agg_1h'::regclass")[
                        0
                    ][0]
                    > 0
                ),
                what="the rollup job to wait for agg_1h",
            )
            started = time.monotonic()
            asyncio.run(write(group, batch(1, hour + 120_000)))  # the same hour, while the job holds its marks
            waited = time.monotonic() - started
            held.execute("COMMIT")
            job.result(timeout=60)
        finally:
            held.execute("SELECT pg_advisory_unlock(%s)", (maintenance._LOCK_ID,))
    left = marks()
    assert waited < 5, "the batch waited for the rollup job"
    assert left and not set(left) & set(read_by_the_job), "the job deleted the marks it read, and only those"
