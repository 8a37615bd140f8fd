"""Time-series queries that answer the same on both storage backends.

Raw readings come from `readings`; 1-minute windows from `agg_1m` (kept by the processor);
hourly and daily ones from `agg_1h` and `agg_1d`, which are continuous aggregates under
TimescaleDB and project-maintained rollup tables on plain PostgreSQL, with the same columns.
Every query walks the (device_id, metric, time) primary key, so a page stays an index range scan
however many months are stored.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

import psycopg

Resolution = Literal["raw", "1m", "1h", "1d"]
RESOLUTIONS: dict[str, str] = {"1m": "agg_1m", "1h": "agg_1h", "1d": "agg_1d"}


@dataclass(frozen=True, slots=True)
class Point:
    ts: dt.datetime  # the reading's time, or the window's start
    count: int
    mean: float
    min: float
    max: float
    first: float
    last: float


def series_sql(resolution: Resolution) -> str:
    """The page query for one resolution; parameters (device_id, metric, start, end, limit)."""
    if resolution == "raw":
        return ("SELECT ts, 1, value, value, value, value, value FROM readings "
                "WHERE device_id = %s AND metric = %s AND ts >= %s AND ts < %s ORDER BY ts LIMIT %s")
    table = RESOLUTIONS[resolution]
    return (f"SELECT bucket, n, sum / n, min, max, first_value, last_value FROM {table} "  # noqa: S608 (fixed names)
            "WHERE device_id = %s AND metric = %s AND bucket >= %s AND bucket < %s ORDER BY bucket LIMIT %s")


def to_points(rows: list[tuple]) -> list[Point]:  # type: ignore[type-arg]
    return [Point(ts, int(n), mean, low, high, first, last) for ts, n, mean, low, high, first, last in rows]


def query_series(conn: psycopg.Connection, device_id: str, metric: str, resolution: Resolution,
                 start: dt.datetime, end: dt.datetime, *, limit: int = 1000) -> list[Point]:
    """Points in [start, end), oldest first, at most `limit` (page on with start = last ts + 1 µs)."""
    return to_points(conn.execute(series_sql(resolution), (device_id, metric, start, end, limit)).fetchall())


# The page as one JSON array made by the database. Building it in Python (rows, Point objects, JSON)
# cost the API's single thread about 12 ms for a day of 1-minute points; json_agg costs the database
# about as much, but in its own processes, beside the API: bench/api.py went from 46 to 116 requests/s.
# Each point is written by concatenating text, not through json_agg of a row: 0.6x the database time
# for a day of 1-minute points (the database, not the API, is what a series request waits on under
# load). Times are written as orjson and pydantic write them elsewhere in the API: UTC with `Z`, and
# microseconds only when there is a fraction of a second.
# Stored values are finite (the gateway takes no other), so their text is a JSON number; a mean goes
# through to_json all the same, since a sum of finite values can still overflow.
_POINT_JSON = """'{"ts":"' || to_char(p.t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
    || CASE WHEN date_trunc('second', p.t) = p.t THEN '' ELSE to_char(p.t, '.US') END || 'Z","count":' || p.n
    || ',"mean":' || to_json(p.mean) || ',"min":' || p.lo || ',"max":' || p.hi || ',"first":' || p.f
    || ',"last":' || p.l || '}'"""


async def query_series_json(conn: psycopg.AsyncConnection, device_id: str, metric: str, resolution: Resolution,
                            start: dt.datetime, end: dt.datetime, *, limit: int = 1000
                            ) -> tuple[bytes, int, dt.datetime | None]:
    """query_series's page as a JSON array of points, with its length and last point's time."""
    cur = await conn.execute(
        f"SELECT '[' || coalesce(string_agg({_POINT_JSON}, ',' ORDER BY p.t), '') || ']', count(*), max(p.t) "  # noqa: S608
        f"FROM ({series_sql(resolution)}) AS p(t, n, mean, lo, hi, f, l)", (device_id, metric, start, end, limit))
    row = await cur.fetchone()
    assert row is not None  # an aggregate always answers one row
    return row[0].encode(), int(row[1]), row[2]
