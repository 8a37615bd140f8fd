"""Alerts written for many series at once: `python -m bench.alerts [--series N]`.

The case: a district's power cut silences thousands of sensors together, and the processor's
dropout timer raises an alert for each, then updates them all; its loop waits meanwhile. Prints
the time to raise N alerts and to update them, and, as the same run's baseline, the time the same
N alerts take one statement at a time (what kota.alerts did before its writes were pipelined).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import psycopg
from psycopg.types.json import Jsonb

from bench import start_bench_stack
from kota import alerts
from kota.registry import new_device, upsert_devices

T0 = 1_800_000_000_000


async def one_at_a_time(conn: psycopg.AsyncConnection, signals: list[alerts.Signal]) -> None:
    """The baseline, as kota.alerts wrote a new alert before: insert, raised event, count, each its own round trip."""
    for s in signals:
        cur = await conn.execute(
            "INSERT INTO alerts (device_id, city, domain, alert_type, metric, severity, message, count, first_ts, "
            "last_ts, last_value, details, clear_after_s) SELECT device_id, city, domain, %s, %s, %s, %s, 0, "
            "kota_ms(%s), kota_ms(%s), %s, %s, 600 FROM devices WHERE device_id = %s RETURNING alert_id",
            (s.alert_type, s.metric, s.severity, s.message, s.ts_ms, s.ts_ms, s.value, Jsonb(s.details), s.device_id),
        )
        row = await cur.fetchone()
        assert row is not None
        await conn.execute(
            "INSERT INTO alert_events (alert_id, action, actor, severity, comment) VALUES (%s, 'raised', %s, %s, %s)",
            (row[0], alerts.SYSTEM_ACTOR, s.severity, s.message),
        )
        await conn.execute("UPDATE alerts SET count = count + 1, updated_at = now() WHERE alert_id = %s", (row[0],))


async def run(dsn: str, series: int) -> None:
    prefix = f"alertbench{time.time_ns() % 10**9}"
    devices = {
        kind: [new_device(f"{prefix}-{kind}-{i:05d}", "benchkota", "water_meter") for i in range(series)]
        for kind in ("pipelined", "baseline")
    }
    with psycopg.connect(dsn) as conn:
        upsert_devices(conn, [d for group in devices.values() for d in group])

    def silent(group: str, ts_ms: int) -> list[alerts.Signal]:
        return [
            alerts.Signal(d.device_id, "dropout", "pressure", "minor", ts_ms, 1.0, "silent") for d in devices[group]
        ]

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        timings = {}
        steps = (
            ("baseline, one at a time", lambda: one_at_a_time(conn, silent("baseline", T0))),
            ("kota.alerts, raise", lambda: alerts.apply_signals(conn, silent("pipelined", T0), {}, 600)),
            ("kota.alerts, update", lambda: alerts.apply_signals(conn, silent("pipelined", T0 + 60_000), {}, 600)),
        )
        for label, work in steps:
            start = time.perf_counter()
            async with conn.transaction():
                await work()
            timings[label] = time.perf_counter() - start
            print(f"{label}: {series:,} alerts in {timings[label]:.2f} s")
    print(
        f"raising: {timings['baseline, one at a time'] / timings['kota.alerts, raise']:.1f}x faster than "
        f"one statement at a time"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=2000)
    args = parser.parse_args()
    stack = start_bench_stack(print)
    asyncio.run(run(stack.postgres_dsn, args.series))


if __name__ == "__main__":
    main()
