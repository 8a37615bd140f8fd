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
    """The page query for one resolution; parameters (device_id, metric, start, end, limit). Its eighth
    column, the sum of the values, goes into a page's fingerprint (query_series_split)."""
    if resolution == "raw":
        return (
            "SELECT ts, 1, value, value, value, value, value, value FROM readings "
            "WHERE device_id = %s AND metric = %s AND ts >= %s AND ts < %s ORDER BY ts LIMIT %s"
        )
    table = RESOLUTIONS[resolution]
    return (
        f"SELECT bucket, n, sum / n, min, max, first_value, last_value, sum FROM {table} "  # noqa: S608
        "WHERE device_id = %s AND metric = %s AND bucket >= %s AND bucket < %s ORDER BY bucket LIMIT %s"
    )


def to_points(rows: list[tuple]) -> list[Point]:  # type: ignore[type-arg]
    return [Point(ts, int(n), mean, low, high, first, last) for ts, n, mean, low, high, first, last, _ in rows]


def query_series(
    conn: psycopg.Connection,
    device_id: str,
    metric: str,
    resolution: Resolution,
    start: dt.datetime,
    end: dt.datetime,
    *,
    limit: int = 1000,
) -> list[Point]:
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


@dataclass(frozen=True, slots=True)
class SplitPage:
    """A page split at a time `cut`: the points before it, as a fingerprint and (when asked for) their
    JSON, and the JSON of the points from the cut on. JSON parts are points joined by commas, without
    brackets; either may be empty."""

    head_print: tuple[object, ...]  # (points, readings, first time, last time, sum of values) before the cut
    head_json: bytes | None
    tail_json: bytes
    count: int  # points on the whole page
    last: dt.datetime | None  # the page's last point's time
    visible: bool  # the device is one of the cities asked about


async def query_series_split(
    conn: psycopg.AsyncConnection,
    device_id: str,
    metric: str,
    resolution: Resolution,
    start: dt.datetime,
    end: dt.datetime,
    *,
    limit: int,
    cut: dt.datetime,
    head_json: bool,
    cities: list[str] | None = None,
) -> SplitPage:
    """One page (as query_series) read once: the JSON of its points from `cut` on, the fingerprint of
    those before it, and their JSON only if `head_json`. The points before a cut some way behind the
    present rarely change, so the API keeps their JSON and asks for the fingerprint alone, which
    costs the database about a quarter of writing the day's points (ops_api/series_cache.py).
    `visible` says whether the device is in one of `cities` (None: any city), in the same round trip.
    """
    cur = await conn.execute(
        f"SELECT count(*) FILTER (WHERE p.t < %(cut)s), sum(p.n) FILTER (WHERE p.t < %(cut)s), "  # noqa: S608
        f"min(p.t) FILTER (WHERE p.t < %(cut)s), max(p.t) FILTER (WHERE p.t < %(cut)s), "
        f"sum(p.s) FILTER (WHERE p.t < %(cut)s), "
        f"string_agg({_POINT_JSON}, ',' ORDER BY p.t) FILTER (WHERE p.t < %(cut)s AND %(head)s), "
        f"string_agg({_POINT_JSON}, ',' ORDER BY p.t) FILTER (WHERE p.t >= %(cut)s), count(*), max(p.t), "
        f"EXISTS (SELECT FROM devices WHERE device_id = %(device_id)s "
        f"AND (%(cities)s::text[] IS NULL OR city = ANY(%(cities)s))) "
        f"FROM ({_named(series_sql(resolution))}) AS p(t, n, mean, lo, hi, f, l, s)",
        {
            "device_id": device_id,
            "metric": metric,
            "start": start,
            "end": end,
            "limit": limit,
            "cut": cut,
            "head": head_json,
            "cities": cities,
        },
    )
    row = await cur.fetchone()
    assert row is not None  # an aggregate always answers one row
    points, readings, first, last_before, total, head, tail, count, last, visible = row
    return SplitPage(
        (points, readings, first, last_before, total),
        (head or "").encode() if head_json else None,
        (tail or "").encode(),
        int(count),
        last,
        visible,
    )


def _named(page_sql: str) -> str:
    """series_sql with named parameters, to sit inside a query that names its own."""
    for name in ("device_id", "metric", "start", "end", "limit"):
        page_sql = page_sql.replace("%s", f"%({name})s", 1)
    return page_sql


async def query_series_json(
    conn: psycopg.AsyncConnection,
    device_id: str,
    metric: str,
    resolution: Resolution,
    start: dt.datetime,
    end: dt.datetime,
    *,
    limit: int = 1000,
) -> tuple[bytes, int, dt.datetime | None]:
    """query_series's page as a JSON array of points, with its length and last point's time."""
    page = await query_series_split(
        conn, device_id, metric, resolution, start, end, limit=limit, cut=start, head_json=False
    )
    return b"[" + page.tail_json + b"]", page.count, page.last
