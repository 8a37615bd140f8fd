"""The TimescaleDB path, for real: TimescaleDB 2.23 in PGlite (deploy/pglite.py) behind a local port.

Small data only (PGlite's limits: one connection, no COPY, small statements): the schema with its
hypertables, continuous aggregates and policies; the processor's batch write; the hourly and daily
rollups answering the same series queries as on plain PostgreSQL; compression; retention.
"""

import asyncio
import datetime as dt
import socket
from collections.abc import Iterator

import psycopg
import pytest

from deploy import pglite
from kota.contract import Reading
from kota.schema import migrate, storage_backend
from ops_api.series import query_series
from processing.store import AnomalyRow, Batch, Checkpoint, PartitionSlice, WritePolicy, write_batch
from tests.test_series import as_json, json_page

DEVICE = "tsdb-gate-1"
HOUR = 3_600_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tsdb(tmp_path_factory) -> Iterator[str]:
    port = _free_port()
    proc = pglite.start(port, tmp_path_factory.mktemp("pglite") / "server.log")
    try:
        yield pglite.dsn(port)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _readings(start_ms: int) -> list[Reading]:
    # Three hours and a bit of one reading a minute, crossing a day boundary; every 50th is a spike.
    return [
        Reading(
            start_ms + i * 60_000,
            "tsdbkota",
            "environment",
            DEVICE,
            "currentLevel",
            500.0 if i % 50 == 49 else 40.0 + (i % 9),
            "cm",
            start_ms + i * 60_000 + 5,
            "test",
        )
        for i in range(200)
    ]


def test_migrations_choose_timescaledb_with_hypertables_caggs_and_policies(tsdb):
    backend, applied = migrate(tsdb)
    assert backend == "timescaledb" and applied[0] == 1
    with psycopg.connect(tsdb) as conn:
        assert storage_backend(conn) == "timescaledb"
        hypertables = {r[0] for r in conn.execute("SELECT hypertable_name FROM timescaledb_information.hypertables")}
        assert {"readings", "agg_1m"} <= hypertables
        caggs = {r[0] for r in conn.execute("SELECT view_name FROM timescaledb_information.continuous_aggregates")}
        assert caggs == {"agg_1h", "agg_1d"}
        jobs = {
            (r[0], r[1]): r[2]
            for r in conn.execute(
                "SELECT proc_name, hypertable_name, config FROM timescaledb_information.jobs WHERE proc_name <> "
                "'policy_job_error_retention' AND hypertable_name IS NOT NULL"
            )
        }
        settings = {
            r[0]: r[1:]
            for r in conn.execute("SELECT table_name, keep_days, compress_after_days FROM retention_settings")
        }
    assert jobs[("policy_retention", "readings")]["drop_after"] == f"{settings['readings'][0]} days"
    assert jobs[("policy_compression", "readings")]["compress_after"] == f"{settings['readings'][1]} days"
    assert jobs[("policy_retention", "agg_1m")]["drop_after"] == f"{settings['agg_1m'][0]} days"
    assert sum(1 for name, _ in jobs if name == "policy_refresh_continuous_aggregate") == 2


async def _write(dsn: str, readings: list[Reading], anomalies: list[AnomalyRow]) -> int:
    policy = WritePolicy(use_copy=False, track_rollups=False)
    stored = 0
    # PGlite is one backend behind every connection: prepared statement names would collide.
    async with await psycopg.AsyncConnection.connect(dsn, prepare_threshold=None) as conn:
        for start in range(0, len(readings), 50):  # small batches: PGlite's statement limits
            chunk = readings[start : start + 50]
            batch = PartitionSlice(0, start, start + len(chunk), [(start + i, [r]) for i, r in enumerate(chunk)])
            outcome = await write_batch(
                conn,
                Batch(
                    "tsdb-test",
                    "kota.readings",
                    [batch],
                    anomalies=[a for a in anomalies if start <= a.offset < start + len(chunk)],
                    checkpoints=[Checkpoint(0, start + len(chunk), [[DEVICE, "currentLevel"]], b"state")],
                ),
                policy,
            )
            stored += outcome.readings_stored
    return stored


def test_processor_writes_and_rollups_answer_the_same_queries(tsdb):
    migrate(tsdb)
    start_ms = int(dt.datetime(2026, 11, 20, 22, 30, tzinfo=dt.UTC).timestamp() * 1000)
    readings = _readings(start_ms)
    anomalies = [
        AnomalyRow(0, i, DEVICE, r.metric, r.ts_ms, r.value, 0.9, "spike")
        for i, r in enumerate(readings)
        if r.value == 500.0
    ]
    with psycopg.connect(tsdb, autocommit=True, prepare_threshold=None) as conn:
        conn.execute(
            "INSERT INTO devices (device_id, city, domain, device_type) VALUES (%s, 'tsdbkota', "
            "'environment', 'water_level') ON CONFLICT DO NOTHING",
            (DEVICE,),
        )
    assert asyncio.run(_write(tsdb, readings, anomalies)) == len(readings)
    assert asyncio.run(_write(tsdb, readings, anomalies)) == 0, "a replayed batch stores nothing twice"

    with psycopg.connect(tsdb, autocommit=True, prepare_threshold=None) as conn:
        conn.execute("CALL refresh_continuous_aggregate('agg_1h', NULL, NULL)")
        conn.execute("CALL refresh_continuous_aggregate('agg_1d', NULL, NULL)")
        day = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
        span = (day, day + dt.timedelta(days=2))
        raw = query_series(conn, DEVICE, "currentLevel", "raw", *span, limit=10_000)
        minutes = query_series(conn, DEVICE, "currentLevel", "1m", *span, limit=10_000)
        hours = query_series(conn, DEVICE, "currentLevel", "1h", *span)
        days = query_series(conn, DEVICE, "currentLevel", "1d", *span)
        n_anomalies = conn.execute("SELECT count(*) FROM anomalies WHERE device_id = %s", (DEVICE,)).fetchone()
        alerts = conn.execute(
            "SELECT alert_type, count, state FROM alerts WHERE device_id = %s AND alert_type IN "
            "('spike', 'flood_siaga') ORDER BY alert_type, alert_id",
            (DEVICE,),
        ).fetchall()
        [(offset, checkpoint_offset)] = conn.execute(
            "SELECT o.next_offset, c.next_offset FROM stream_offsets o JOIN detector_checkpoints c "
            "USING (consumer_group, topic, partition) WHERE consumer_group = 'tsdb-test'"
        ).fetchall()
    assert [p.last for p in raw] == [r.value for r in readings]
    for resolution, points in (("raw", raw), ("1m", minutes), ("1h", hours), ("1d", days)):
        # What the API sends: the same page as JSON made by the database.
        page = json_page(tsdb, DEVICE, "currentLevel", resolution, *span, limit=10_000, prepare_threshold=None)
        assert page == (as_json(points), len(points), points[-1].ts), resolution
    assert len(minutes) == 200 and sum(p.count for p in minutes) == 200
    assert len(hours) == 4  # 200 minutes from 22:30: the hours of 22, 23, 00 and 01
    for resolution, points in (("1h", hours), ("1d", days)):
        expected = _expected(readings, HOUR if resolution == "1h" else 24 * HOUR)
        assert [(int(p.ts.timestamp() * 1000), p.count, p.min, p.max, p.first, p.last) for p in points] == [
            (b, n, lo, hi, first, last) for b, n, lo, hi, first, last, _ in expected
        ]
        assert [p.mean for p in points] == pytest.approx([mean for *_, mean in expected])
    assert len(days) == 2 and sum(p.count for p in days) == 200
    assert n_anomalies == (4,)
    # The spikes (500 cm) also cross this gate's default Siaga 1 threshold. They are 50 minutes apart with
    # normal readings between: each alert clears itself after 10 minutes, and the next spike raises a new one.
    assert alerts == [
        (kind, 1, state) for kind in ("flood_siaga", "spike") for state in ("cleared", "cleared", "cleared", "active")
    ]
    assert offset == checkpoint_offset == 200


def _expected(readings: list[Reading], width_ms: int) -> list[tuple]:
    buckets: dict[int, list[Reading]] = {}
    for r in readings:
        buckets.setdefault(r.ts_ms // width_ms * width_ms, []).append(r)
    return [
        (
            b,
            len(rs),
            min(r.value for r in rs),
            max(r.value for r in rs),
            rs[0].value,
            rs[-1].value,
            sum(r.value for r in rs) / len(rs),
        )
        for b, rs in sorted(buckets.items())
    ]


def test_compression_and_retention_policies_act_on_old_chunks(tsdb):
    migrate(tsdb)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=200)
    with psycopg.connect(tsdb, autocommit=True, prepare_threshold=None) as conn:
        conn.execute(
            "INSERT INTO readings VALUES (%s, 'old-device', 'pressure', 1.0, %s), "
            "(%s, 'old-device', 'pressure', 2.0, %s)",
            (old, old, old + dt.timedelta(minutes=1), old),
        )
        [chunk] = [r[0] for r in conn.execute("SELECT show_chunks('readings', older_than => INTERVAL '100 days')")]
        conn.execute("SELECT compress_chunk(%s)", (chunk,))
        assert conn.execute("SELECT sum(value) FROM readings WHERE device_id = 'old-device'").fetchone() == (3.0,)
        [job] = [
            r[0]
            for r in conn.execute(
                "SELECT job_id FROM timescaledb_information.jobs "
                "WHERE proc_name = 'policy_retention' AND hypertable_name = 'readings'"
            )
        ]
        conn.execute("CALL run_job(%s)", (job,))
        assert conn.execute("SELECT count(*) FROM readings WHERE device_id = 'old-device'").fetchone() == (0,)
