"""Domain rules inside the batch transaction, written straight through processing.store against PostgreSQL.

What is under test is that a rule's outcome depends on the readings, not on how a replay happened to
cut them into batches: a fast replay puts many minutes of event time into one batch.
"""

import asyncio
import datetime as dt

import numpy as np
import psycopg
import pytest

from kota import alerts
from kota.contract import READINGS_TOPIC, Reading
from processing import ispu, maintenance
from processing.rules import window_means
from processing.store import Batch, PartitionSlice, WritePolicy, write_batch
from tests.helpers import provision, query, unique_id

pytestmark = pytest.mark.stack

MINUTE = 60_000


def _pm25(minute: int) -> float:
    """Two pollution episodes, 300 ug/m3 over minutes 30-50 and 150-170, in clean air."""
    if 30 <= minute < 50 or 150 <= minute < 170:
        return 300.0
    return 12.0 + (minute % 5)


def _readings(device_id: str, start_ms: int, minutes: int) -> list[Reading]:
    readings = []
    for m in range(minutes):
        ts = start_ms + m * MINUTE + 17_000  # inside the minute, not on its edge
        for metric, value in (("pm25", _pm25(m)), ("pm10", 40.0)):
            readings.append(Reading(ts, "testkota", "environment", device_id, metric, value, "ug/m3", ts, "test"))
    return readings


async def _write_in_batches(dsn: str, readings: list[Reading], minutes_per_batch: int) -> None:
    group = unique_id("rules")
    per_batch = 2 * minutes_per_batch  # two pollutants a minute
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for first in range(0, len(readings), per_batch):
            chunk = readings[first : first + per_batch]
            batch = PartitionSlice(0, first, first + len(chunk), [(first + i, [r]) for i, r in enumerate(chunk)])
            await write_batch(conn, Batch(group, READINGS_TOPIC, [batch]), WritePolicy())


def _expected_unhealthy_minutes(minutes: int) -> list[int]:
    """Minutes whose hourly ISPU (mean of the last 60 one-minute means, this one included) is Tidak Sehat or worse."""
    unhealthy = []
    for m in range(minutes):
        window = range(max(0, m - 59), m + 1)
        mean_pm25 = sum(_pm25(w) for w in window) / len(window)
        result = ispu.station_ispu({"pm25": mean_pm25, "pm10": 40.0})
        assert result is not None
        if ispu.CATEGORIES.index(result.category) >= 2:
            unhealthy.append(m)
    return unhealthy


def _stretches(minutes: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive minutes, as (first, last)."""
    runs: list[tuple[int, int]] = []
    for m in minutes:
        if runs and m == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], m)
        else:
            runs.append((m, m))
    return runs


def test_air_quality_alerts_do_not_depend_on_how_readings_were_batched(stack):
    minutes = 240
    start = (int(dt.datetime.now(dt.UTC).timestamp() * 1000) // 3_600_000 - 4) * 3_600_000
    outcomes = []
    for minutes_per_batch in (1, 7, minutes):
        station = provision(stack, "air_quality")
        asyncio.run(
            _write_in_batches(stack.postgres_dsn, _readings(station.device_id, start, minutes), minutes_per_batch)
        )
        alerts = query(
            stack,
            "SELECT alert_type, count, (extract(epoch FROM first_ts) * 1000)::bigint, "
            "(extract(epoch FROM last_ts) * 1000)::bigint, severity, state FROM alerts "
            "WHERE device_id = %s ORDER BY alert_id",
            (station.device_id,),
        )
        now = query(
            stack,
            "SELECT (extract(epoch FROM ts) * 1000)::bigint, ispu, category FROM station_ispu WHERE device_id = %s",
            (station.device_id,),
        )
        outcomes.append((alerts, now))

    stretches = _stretches(_expected_unhealthy_minutes(minutes))
    assert len(stretches) == 2, "two unhealthy stretches, far more than the clear-after time (10 min) apart"
    (alerts, now) = outcomes[0]
    # One alert per stretch, each minute counted; the first cleared itself before the second began.
    assert [a[:4] for a in alerts] == [
        ("air_quality_unhealthy", last - first + 1, start + first * MINUTE + 17_000, start + last * MINUTE + 17_000)
        for first, last in stretches
    ]
    assert [a[5] for a in alerts] == ["cleared", "cleared"]
    assert now[0][0] == start + (minutes - 1) * MINUTE + 17_000
    assert outcomes[1] == outcomes[0], "seven minutes a batch"
    assert outcomes[2] == outcomes[0], "the whole replay in one batch"


async def _apply(dsn: str, *args, **kwargs) -> list[alerts.AlertChange]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn, conn.transaction():
        return await alerts.apply_signals(conn, *args, **kwargs)


def test_an_alert_clears_itself_between_two_signals_of_one_batch_where_readings_show_it_would_have(stack):
    meter = provision(stack, "water_meter")
    t0 = 1_800_000_000_000

    def spike(minute: int) -> alerts.Signal:
        return alerts.Signal(meter.device_id, "spike", "pressure", "major", t0 + minute * MINUTE, 40.0, "spike")

    times = {(meter.device_id, "pressure"): [t0 + m * MINUTE for m in range(60)]}  # a reading every minute
    signals = [spike(0), spike(1), spike(30), spike(31)]
    repeats = [
        alerts.Repeat(meter.device_id, "pressure", t0 + 8 * MINUTE, 35.0),  # holds the first alert open
        alerts.Repeat(meter.device_id, "pressure", t0 + 25 * MINUTE, 36.0),
    ]  # too late: it had cleared
    changes = asyncio.run(_apply(stack.postgres_dsn, signals, {}, 600.0, repeats=repeats, times=times))
    rows = query(
        stack,
        "SELECT count, (extract(epoch FROM last_ts) * 1000)::bigint, last_value, state FROM alerts "
        "WHERE device_id = %s ORDER BY alert_id",
        (meter.device_id,),
    )
    # Cleared at minute 19 (the first reading past 8 + 10 minutes); the spike at minute 30 is a new alert.
    assert rows == [(3, t0 + 8 * MINUTE, 35.0, "cleared"), (2, t0 + 31 * MINUTE, 40.0, "active")]
    assert [c.action for c in changes] == ["raised", "cleared", "raised"]

    # Without reading times (a timer's signals), nothing is taken to have cleared inside the batch.
    later = [
        alerts.Signal(meter.device_id, "spike", "pressure", "major", t0 + m * MINUTE, 40.0, "spike") for m in (100, 200)
    ]
    asyncio.run(_apply(stack.postgres_dsn, later, {}, 600.0))
    assert query(stack, "SELECT count, state FROM alerts WHERE device_id = %s ORDER BY alert_id", (meter.device_id,))[
        1:
    ] == [(4, "active")]


def test_latest_values_and_dirty_hours_come_from_the_batch_as_written(stack):
    """The newest reading per series and the hours to roll up are worked out in Python from the
    batch: out of order, with a duplicate, and across batches, they must be what the readings say."""
    device = unique_id("latest")
    hour = (int(dt.datetime.now(dt.UTC).timestamp() * 1000) // 3_600_000 - 30) * 3_600_000

    def reading(ts: int, metric: str, value: float) -> Reading:
        return Reading(ts, "testkota", "utilities", device, metric, value, "bar", ts, "test")

    first = [
        reading(hour + 3_600_000 + 5_000, "pressure", 3.0),  # the newest pressure, arriving first
        reading(hour + 10_000, "pressure", 1.0),
        reading(hour + 3_600_000 + 5_000, "pressure", 9.0),  # a duplicate: refused, as in readings
        reading(hour + 20_000, "flow", 7.5),
    ]
    second = [
        reading(hour + 15_000, "flow", 2.0),  # older than the stored newest flow: ignored
        reading(hour + 2 * 3_600_000, "pressure", 4.0),
    ]

    async def newest(conn: psycopg.AsyncConnection) -> list[tuple]:
        cur = await conn.execute(
            "SELECT metric, (extract(epoch FROM ts) * 1000)::bigint, value FROM latest_values "
            "WHERE device_id = %s ORDER BY metric",
            (device,),
        )
        return await cur.fetchall()

    async def write() -> None:
        group = unique_id("latest")
        async with (
            await psycopg.AsyncConnection.connect(stack.postgres_dsn, autocommit=True) as lock,
            await psycopg.AsyncConnection.connect(stack.postgres_dsn) as conn,
        ):
            # Held, the processor's maintenance (which takes the dirty hours) waits its turn.
            await lock.execute("SELECT pg_advisory_lock(%s)", (maintenance._LOCK_ID,))
            await conn.execute(
                "DELETE FROM rollup_dirty WHERE hour >= kota_ms(%s) AND hour <= kota_ms(%s)",
                (hour, hour + 2 * 3_600_000),
            )
            await conn.commit()
            await write_batch(
                conn, Batch(group, READINGS_TOPIC, [PartitionSlice(0, 0, 1, [(0, first)])]), WritePolicy()
            )
            cur = await conn.execute(
                "SELECT DISTINCT (extract(epoch FROM hour) * 1000)::bigint FROM rollup_dirty "
                "WHERE hour >= kota_ms(%s) AND hour <= kota_ms(%s) ORDER BY 1",
                (hour, hour + 2 * 3_600_000),
            )
            assert [h for (h,) in await cur.fetchall()] == [hour, hour + 3_600_000]
            assert await newest(conn) == [("flow", hour + 20_000, 7.5), ("pressure", hour + 3_600_000 + 5_000, 3.0)]
            await conn.commit()
            await write_batch(
                conn, Batch(group, READINGS_TOPIC, [PartitionSlice(0, 1, 2, [(1, second)])]), WritePolicy()
            )
            assert await newest(conn) == [("flow", hour + 20_000, 7.5), ("pressure", hour + 2 * 3_600_000, 4.0)]
            await conn.commit()

    asyncio.run(write())
    stored = query(
        stack,
        "SELECT value FROM readings WHERE device_id = %s AND metric = 'pressure' AND ts = kota_ms(%s)",
        (device, hour + 3_600_000 + 5_000),
    )
    assert stored == [(3.0,)]  # the duplicate kept its first value, which latest_values showed


def test_window_means_equal_a_plain_average_of_each_minutes_window(stack):
    """The ISPU's concentrations: per station, pollutant and minute evaluated, the mean of the
    one-minute aggregates in the window ending at that minute, with minutes missing from the data."""
    rng = np.random.default_rng(11)
    station = unique_id("window")
    start = (int(dt.datetime.now(dt.UTC).timestamp() * 1000) // MINUTE - 300) * MINUTE
    rows = [
        (station, metric, start + m * MINUTE, int(n), float(rng.uniform(5, 400)) * n)
        for metric in ("pm25", "no2")
        for m in range(200)
        if (n := rng.integers(0, 4))
    ]  # n 0: no row
    with psycopg.connect(stack.postgres_dsn) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO agg_1m (device_id, metric, bucket, n, sum, sum_sq, min, max, first_ts, "
            "first_value, last_ts, last_value) VALUES (%s, %s, kota_ms(%s), %s, %s, 0, 0, 0, "
            "kota_ms(%s), 0, kota_ms(%s), 0)",
            [(d, m, b, n, s, b, b) for d, m, b, n, s in rows],
        )
    evaluated = {start + m * MINUTE: start + m * MINUTE + 7_000 for m in (0, 1, 59, 60, 61, 140, 199)}

    async def means() -> dict[tuple[str, int], dict[str, float]]:
        async with await psycopg.AsyncConnection.connect(stack.postgres_dsn) as conn:
            return await window_means(conn, {station: evaluated}, 60)

    got = asyncio.run(means())
    expected: dict[tuple[str, int], dict[str, float]] = {}
    for bucket, t_ms in evaluated.items():
        for metric in ("pm25", "no2"):
            window = [(n, s) for _, m, b, n, s in rows if m == metric and bucket - 59 * MINUTE <= b <= bucket]
            if window:
                expected.setdefault((station, t_ms), {})[metric] = sum(s for _, s in window) / sum(n for n, _ in window)
    assert got.keys() == expected.keys() and len(got) == len(evaluated)
    for key, by_metric in expected.items():
        assert got[key] == pytest.approx(by_metric, rel=1e-12)


def test_a_stations_minute_brought_by_several_batches_is_evaluated_once(stack):
    """A live stream brings a station's minute over many batches. As the processor writes them (the
    minutes evaluated kept across batches), each minute's ISPU is evaluated in the first batch that
    holds it, and counts once on the alert; batch by batch on their own, the same minute counted in
    each batch."""
    start = (int(dt.datetime.now(dt.UTC).timestamp() * 1000) // 3_600_000 - 2) * 3_600_000

    def reading(device_id: str, minute: int, second: int) -> Reading:
        ts = start + minute * MINUTE + second * 1000
        return Reading(ts, "testkota", "environment", device_id, "pm25", 300.0, "ug/m3", ts, "test")

    async def write(device_id: str, evaluated: dict[str, int] | None) -> None:
        batches = [
            [reading(device_id, 0, 10)],
            [reading(device_id, 0, 40)],
            [reading(device_id, 0, 50), reading(device_id, 1, 5)],
            [reading(device_id, 1, 30)],
        ]
        async with await psycopg.AsyncConnection.connect(stack.postgres_dsn) as conn:
            for offset, batch in enumerate(batches):
                one_record = [PartitionSlice(0, offset, offset + 1, [(offset, batch)])]
                outcome = await write_batch(
                    conn, Batch(unique_id("once"), READINGS_TOPIC, one_record, ispu_evaluated=evaluated), WritePolicy()
                )
                if evaluated is not None:
                    evaluated.update(outcome.ispu_minutes)

    counts = {}
    for kept in (True, False):
        station = provision(stack, "air_quality").device_id
        asyncio.run(write(station, {} if kept else None))
        counts[kept] = query(
            stack, "SELECT count FROM alerts WHERE device_id = %s AND alert_type = 'air_quality_unhealthy'", (station,)
        )
    assert counts[True] == [(2,)], "minutes 0 and 1, once each"
    assert counts[False] == [(5,)], "each batch on its own evaluates every minute it holds: 1 + 1 + 2 + 1"
