"""Domain rules inside the batch transaction, written straight through processing.store against PostgreSQL.

What is under test is that a rule's outcome depends on the readings, not on how a replay happened to
cut them into batches: a fast replay puts many minutes of event time into one batch.
"""

import asyncio
import datetime as dt

import psycopg
import pytest

from kota.contract import READINGS_TOPIC, Reading
from processing import ispu
from processing.store import PartitionSlice, WritePolicy, write_batch
from tests.helpers import provision, query, unique_id

pytestmark = pytest.mark.stack

MINUTE = 60_000


def _pm25(minute: int) -> float:
    """A pollution episode: clean air, a climb to 300 ug/m3 over minutes 30-50, then clearing."""
    if 30 <= minute < 50:
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
            chunk = readings[first:first + per_batch]
            batch = PartitionSlice(0, first, first + len(chunk), [(first + i, [r]) for i, r in enumerate(chunk)])
            await write_batch(conn, group=group, topic=READINGS_TOPIC, slices=[batch], policy=WritePolicy())


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


def test_air_quality_alerts_do_not_depend_on_how_readings_were_batched(stack):
    minutes = 120
    start = (int(dt.datetime.now(dt.UTC).timestamp() * 1000) // 3_600_000 - 4) * 3_600_000
    outcomes = []
    for minutes_per_batch in (1, 7, 120):
        station = provision(stack, "air_quality")
        asyncio.run(_write_in_batches(stack.postgres_dsn, _readings(station.device_id, start, minutes),
                                      minutes_per_batch))
        alerts = query(stack, "SELECT alert_type, count, (extract(epoch FROM first_ts) * 1000)::bigint, "
                              "(extract(epoch FROM last_ts) * 1000)::bigint, severity FROM alerts "
                              "WHERE device_id = %s ORDER BY alert_id", (station.device_id,))
        now = query(stack, "SELECT (extract(epoch FROM ts) * 1000)::bigint, ispu, category FROM station_ispu "
                           "WHERE device_id = %s", (station.device_id,))
        outcomes.append((alerts, now))

    unhealthy = _expected_unhealthy_minutes(minutes)
    assert unhealthy, "the episode must reach Tidak Sehat for this test to mean anything"
    first, last = unhealthy[0], unhealthy[-1]
    assert unhealthy == list(range(first, last + 1)), "one unbroken stretch: one alert, never auto-cleared inside it"
    (alerts, now) = outcomes[0]
    assert [a[:4] for a in alerts] == [("air_quality_unhealthy", len(unhealthy),
                                        start + first * MINUTE + 17_000, start + last * MINUTE + 17_000)]
    assert now[0][0] == start + (minutes - 1) * MINUTE + 17_000
    assert outcomes[1] == outcomes[0], "seven minutes a batch"
    assert outcomes[2] == outcomes[0], "the whole replay in one batch"
