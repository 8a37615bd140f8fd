"""The minimum-night-flow rule in the processor: a water meter whose night flow never drops raises one
`leak` alert once it has enough earlier nights, and a night back to normal clears it."""

import asyncio
import datetime as dt
from zoneinfo import ZoneInfo

import psycopg
import pytest

from kota.contract import READINGS_TOPIC, Reading
from processing.rules import RulePolicy, night_hours_reached
from processing.store import Batch, PartitionSlice, WritePolicy, write_batch
from tests.helpers import provision, query, unique_id

pytestmark = pytest.mark.stack

MINUTE = 60_000
ZONE = ZoneInfo("Asia/Jakarta")


def _night(device_id: str, midnight_ms: int, flow: float) -> list[Reading]:
    """00:00-05:00 local, a reading a minute: `flow` m3/h and a little more, never less."""
    readings = []
    for m in range(5 * 60):
        ts = midnight_ms + m * MINUTE + 20_000
        value = flow + 0.05 * (m % 4)
        readings.append(Reading(ts, "testkota", "utilities", device_id, "waterConsumption", value, "m3/h", ts, "test"))
    return readings


def _write(dsn: str, group: str, offset: int, readings: list[Reading], evaluated: dict[str, int]) -> int:
    async def go() -> int:
        nonlocal offset
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            for first in range(0, len(readings), 37):  # batches that do not fall on hours
                chunk = readings[first : first + 37]
                batch = PartitionSlice(0, offset, offset + len(chunk), [(offset + i, [r]) for i, r in enumerate(chunk)])
                outcome = await write_batch(
                    conn, Batch(group, READINGS_TOPIC, [batch], ispu_evaluated=evaluated), WritePolicy()
                )
                evaluated.update(outcome.ispu_minutes)
                offset += len(chunk)
        return offset

    return asyncio.run(go())


def _leak_alerts(stack, device_id: str) -> list[tuple]:
    return query(
        stack,
        "SELECT alert_type, state, count, severity FROM alerts WHERE device_id = %s ORDER BY alert_id",
        (device_id,),
    )


def test_night_hours_are_the_ends_of_0200_0300_and_0400_local():
    midnight = dt.datetime(2026, 12, 1, tzinfo=ZONE)
    start = int(midnight.timestamp() * 1000)
    ends = night_hours_reached(start, start + 5 * 3_600_000, RulePolicy())
    assert [dt.datetime.fromtimestamp(e / 1000, ZONE).hour for e in ends] == [2, 3, 4]
    assert night_hours_reached(start + 6 * 3_600_000, start + 20 * 3_600_000, RulePolicy()) == []


def test_a_meter_whose_night_flow_stays_high_raises_one_leak_alert_after_two_nights(stack):
    today = dt.datetime.now(ZONE).replace(hour=0, minute=0, second=0, microsecond=0)
    nights = [int((today - dt.timedelta(days=d)).timestamp() * 1000) for d in (4, 3, 2, 1)]
    leaking, normal = provision(stack, "water_meter"), provision(stack, "water_meter")
    group, offset, evaluated = unique_id("leak"), 0, {}

    def night(i: int, leak_flow: float) -> None:
        nonlocal offset
        readings = _night(leaking.device_id, nights[i], leak_flow) + _night(normal.device_id, nights[i], 0.2)
        readings.sort(key=lambda r: r.ts_ms)
        offset = _write(stack.postgres_dsn, group, offset, readings, evaluated)

    night(0, 0.2)  # a usual night: down to 0.2 m3/h
    night(1, 1.7)  # leaking from here on, but one earlier night is not enough history
    assert _leak_alerts(stack, leaking.device_id) == []
    night(2, 1.7)  # two earlier nights (0.2 and 1.7: usual 0.95), 1.7 >= 0.95 + 0.5
    assert _leak_alerts(stack, leaking.device_id) == [("leak", "active", 3, "major")], "02:00, 03:00, 04:00"
    night(3, 0.2)  # the flow drops at night again: cleared
    assert _leak_alerts(stack, leaking.device_id) == [("leak", "cleared", 3, "major")]
    assert _leak_alerts(stack, normal.device_id) == []
