"""The series page as JSON made by the database (what the API sends) equals the same page read as rows."""

import asyncio
import datetime as dt

import orjson
import psycopg
import pytest

from kota.series import Point, query_series, query_series_json

pytestmark = pytest.mark.stack

DEVICE = "seriesjson-meter-1"
# Values whose text is easy to get wrong: tiny, huge, negative, inexact, whole.
AWKWARD = [1e-300, -2.5e300, 0.1 + 0.2, -0.0, 42.0, 7.123456789012345]


def as_json(points: list[Point]) -> list[dict[str, object]]:
    """Points as the API documents them: UTC times with `Z`, no zero fraction."""
    return [{"ts": p.ts.astimezone(dt.UTC).replace(tzinfo=None).isoformat() + "Z", "count": p.count, "mean": p.mean,
             "min": p.min, "max": p.max, "first": p.first, "last": p.last} for p in points]


def json_page(dsn: str, *args: object, limit: int, **connect: object
              ) -> tuple[list[dict[str, object]], int, dt.datetime | None]:
    async def run() -> tuple[bytes, int, dt.datetime | None]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, **connect) as conn:
            return await query_series_json(conn, *args, limit=limit)  # type: ignore[arg-type]
    text, count, last = asyncio.run(run())
    return orjson.loads(text), count, last


def test_json_page_equals_rows_for_every_resolution(stack):
    start = dt.datetime(2026, 11, 20, 6, 0, tzinfo=dt.UTC)
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        for table in ("readings", "agg_1m", "agg_1h", "agg_1d"):
            conn.execute(f"DELETE FROM {table} WHERE device_id = %s", (DEVICE,))  # noqa: S608 (fixed names)
        with conn.cursor() as cur:
            for i, value in enumerate(AWKWARD):
                # Raw times with and without a fraction of a second.
                ts = start + dt.timedelta(seconds=61 * i, milliseconds=250 * (i % 2))
                cur.execute("INSERT INTO readings (ts, device_id, metric, value, received_at) "
                            "VALUES (%s, %s, 'flow', %s, now())", (ts, DEVICE, value))
                for table, width in (("agg_1m", dt.timedelta(minutes=1)), ("agg_1h", dt.timedelta(hours=1)),
                                     ("agg_1d", dt.timedelta(days=1))):
                    bucket = start + i * width
                    cur.execute(
                        f"INSERT INTO {table} (device_id, metric, bucket, n, sum, sum_sq, min, max, first_ts, "  # noqa: S608
                        "first_value, last_ts, last_value) VALUES (%s, 'flow', %s, 3, %s, 0, %s, %s, %s, %s, %s, %s)",
                        (DEVICE, bucket, value * 3, value, value, bucket, value, bucket, value))

    end = start + dt.timedelta(days=len(AWKWARD) + 1)
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        for resolution in ("raw", "1m", "1h", "1d"):
            rows = query_series(conn, DEVICE, "flow", resolution, start, end, limit=100)
            assert len(rows) == len(AWKWARD), resolution
            points, count, last = json_page(stack.postgres_dsn, DEVICE, "flow", resolution, start, end, limit=100)
            assert points == as_json(rows), resolution
            assert (count, last) == (len(rows), rows[-1].ts)
            # A page cut short by its limit, and an empty one.
            points, count, last = json_page(stack.postgres_dsn, DEVICE, "flow", resolution, start, end, limit=2)
            assert points == as_json(rows[:2]) and count == 2 and last == rows[1].ts
            empty = json_page(stack.postgres_dsn, DEVICE, "flow", resolution, end, end + dt.timedelta(days=1),
                              limit=100)
            assert empty == ([], 0, None)
