"""The series page as JSON made by the database (what the API sends) equals the same page read as rows,
however it is split, and the API's kept pages answer as the database does after every kind of change."""

import asyncio
import contextlib
import datetime as dt

import orjson
import psycopg
import pytest

from ops_api.series import Point, query_series, query_series_json, query_series_split
from ops_api.series_cache import SeriesCache

pytestmark = pytest.mark.stack

DEVICE = "seriesjson-meter-1"
# Values whose text is easy to get wrong: tiny, huge, negative, inexact, whole.
AWKWARD = [1e-300, -2.5e300, 0.1 + 0.2, -0.0, 42.0, 7.123456789012345]


def as_json(points: list[Point]) -> list[dict[str, object]]:
    """Points as the API documents them: UTC times with `Z`, no zero fraction."""
    return [
        {
            "ts": p.ts.astimezone(dt.UTC).replace(tzinfo=None).isoformat() + "Z",
            "count": p.count,
            "mean": p.mean,
            "min": p.min,
            "max": p.max,
            "first": p.first,
            "last": p.last,
        }
        for p in points
    ]


def json_page(
    dsn: str, *args: object, limit: int, **connect: object
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
                cur.execute(
                    "INSERT INTO readings (ts, device_id, metric, value, received_at) "
                    "VALUES (%s, %s, 'flow', %s, now())",
                    (ts, DEVICE, value),
                )
                for table, width in (
                    ("agg_1m", dt.timedelta(minutes=1)),
                    ("agg_1h", dt.timedelta(hours=1)),
                    ("agg_1d", dt.timedelta(days=1)),
                ):
                    bucket = start + i * width
                    cur.execute(
                        f"INSERT INTO {table} (device_id, metric, bucket, n, sum, sum_sq, min, max, first_ts, "  # noqa: S608
                        "first_value, last_ts, last_value) VALUES (%s, 'flow', %s, 3, %s, 0, %s, %s, %s, %s, %s, %s)",
                        (DEVICE, bucket, value * 3, value, value, bucket, value, bucket, value),
                    )

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
            empty = json_page(
                stack.postgres_dsn, DEVICE, "flow", resolution, end, end + dt.timedelta(days=1), limit=100
            )
            assert empty == ([], 0, None)
            # Split at each point's time: the head's JSON and the tail's make the page.
            for at, point in enumerate(rows):
                page = split_page(
                    stack.postgres_dsn, DEVICE, "flow", resolution, start, end, limit=100, cut=point.ts, head_json=True
                )
                assert page.head_print[0] == at and page.count == len(rows)
                assert orjson.loads(
                    b"[" + b",".join(p for p in (page.head_json, page.tail_json) if p) + b"]"
                ) == as_json(rows), (resolution, at)


def split_page(dsn: str, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
    async def run():  # type: ignore[no-untyped-def]
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return await query_series_split(conn, *args, **kwargs)  # type: ignore[arg-type]

    return asyncio.run(run())


KEPT = "seriescache-meter-1"


def lending(conn: psycopg.AsyncConnection):  # type: ignore[no-untyped-def]
    """`connect` for SeriesCache.page: lends the one connection a test holds."""

    @contextlib.asynccontextmanager
    async def connect():  # type: ignore[no-untyped-def]
        yield conn

    return connect


def render(count: int, last: dt.datetime | None) -> tuple[bytes, bytes]:
    """A body that shows all the page holds: what query_series_json answers, as a JSON array."""
    return b"[[", b"]," + orjson.dumps([count, last])[1:]


def rendered(answer: tuple[bytes, int, dt.datetime | None]) -> bytes:
    return orjson.dumps([orjson.Fragment(answer[0]), answer[1], answer[2]])


def start_kept_series(conn: psycopg.Connection) -> None:
    """The kept-page device, in its own city, with no points yet."""
    conn.execute(
        "INSERT INTO devices (device_id, city, domain, device_type) VALUES (%s, 'keptcity', "
        "'utilities', 'water_meter') ON CONFLICT (device_id) DO UPDATE SET city = 'keptcity'",
        (KEPT,),
    )
    conn.execute("DELETE FROM agg_1m WHERE device_id = %s", (KEPT,))


def put(conn: psycopg.Connection, bucket: dt.datetime, value: float = 1.0) -> None:
    """One reading of the kept-page device merged into its minute, as the processor's upsert does."""
    conn.execute(
        "INSERT INTO agg_1m AS a (device_id, metric, bucket, n, sum, sum_sq, min, max, first_ts, first_value, "
        "last_ts, last_value) VALUES (%s, 'flow', %s, 1, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (device_id, metric, bucket) DO UPDATE SET n = a.n + 1, sum = a.sum + excluded.sum, "
        "sum_sq = a.sum_sq + excluded.sum_sq, min = least(a.min, excluded.min), "
        "max = greatest(a.max, excluded.max), last_ts = excluded.last_ts, last_value = excluded.last_value",
        (KEPT, bucket, value, value * value, value, value, bucket, value, bucket, value),
    )


def test_kept_pages_answer_as_the_database_does_after_each_kind_of_change(stack):
    end = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)
    start = end - dt.timedelta(hours=3)

    async def scenario() -> list[tuple[str, int, int, int]]:
        cache = SeriesCache(max_bytes=1 << 20)
        seen = []
        async with await psycopg.AsyncConnection.connect(stack.postgres_dsn, autocommit=True) as conn:

            async def ask(step: str) -> None:
                for limit in (1000, 100):  # a whole page, and one its limit cuts short
                    kept = await cache.page(
                        lending(conn),
                        None,
                        KEPT,
                        "flow",
                        "1m",
                        start,
                        end,
                        limit=limit,
                        start_given=True,
                        end_given=True,
                        render=render,
                    )
                    fresh = await query_series_json(conn, KEPT, "flow", "1m", start, end, limit=limit)
                    assert kept == rendered(fresh), (step, limit)
                    assert orjson.loads(kept)  # the parts joined are JSON
                seen.append((step, cache.answers["unchanged"], cache.answers["new"], cache.answers["changed"]))

            await ask("first")
            await ask("again")
            with psycopg.connect(stack.postgres_dsn, autocommit=True) as sync:
                put(sync, end - dt.timedelta(minutes=1), 99.0)  # a new window after the cut
                await ask("new window in the tail")
                put(sync, start + dt.timedelta(minutes=10), 500.0)  # a late reading into a settled window
                await ask("late reading")
                put(sync, start + dt.timedelta(minutes=7), 3.0)  # a first reading into an empty settled minute
                await ask("new settled window")
                sync.execute(
                    "UPDATE agg_1m SET max = max + 1, sum = sum + 1 WHERE device_id = %s AND bucket = %s",
                    (KEPT, start + dt.timedelta(minutes=20)),
                )  # a rewritten value, same count
                await ask("rewritten value")
                sync.execute(
                    "DELETE FROM agg_1m WHERE device_id = %s AND bucket < %s", (KEPT, start + dt.timedelta(minutes=7))
                )  # retention takes the first minutes
                await ask("retention")
        return seen

    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        start_kept_series(conn)
        for minute in range(0, 180, 2):  # every other minute, so some settled minutes are empty
            put(conn, start + dt.timedelta(minutes=minute), float(minute % 17))
    steps = asyncio.run(scenario())
    # Each step asks for two pages; (hits, misses, changed) after it: a change under the kept part
    # is seen (changed) and the page written again; a change after the cut is not one.
    assert [s[1:] for s in steps] == [(0, 2, 0), (2, 2, 0), (4, 2, 0), (4, 2, 2), (4, 2, 4), (4, 2, 6), (4, 2, 8)]


def test_kept_pages_stay_within_their_budget(stack):
    end = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        start_kept_series(conn)
        for minute in range(60):
            put(conn, end - dt.timedelta(minutes=60 - minute))

    async def scenario() -> tuple[int, int]:
        async with await psycopg.AsyncConnection.connect(stack.postgres_dsn, autocommit=True) as conn:
            one = SeriesCache(max_bytes=1 << 20)
            await one.page(
                lending(conn),
                None,
                KEPT,
                "flow",
                "1m",
                end - dt.timedelta(hours=1),
                end,
                limit=1000,
                start_given=True,
                end_given=True,
                render=render,
            )
            size = one._bytes
            cache = SeriesCache(max_bytes=size * 2)  # room for two of these pages
            for _ in range(2):
                for hours in (1, 2, 3):  # three keys over the same points
                    await cache.page(
                        lending(conn),
                        None,
                        KEPT,
                        "flow",
                        "1m",
                        end - dt.timedelta(hours=hours),
                        end,
                        limit=1000,
                        start_given=True,
                        end_given=True,
                        render=render,
                    )
            return cache._bytes <= size * 2, cache.answers["unchanged"]

    within, hits = asyncio.run(scenario())
    # Three pages in a round-robin through room for two: each is dropped before it is asked again.
    assert within and hits == 0


def test_kept_pages_within_their_fresh_time_skip_the_database_and_keep_to_the_callers_cities(stack):
    end = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)
    start = end - dt.timedelta(hours=1)
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        start_kept_series(conn)
        put(conn, start)

    async def scenario() -> tuple[object, ...]:
        cache = SeriesCache(max_bytes=1 << 20, fresh_s=3600)
        async with await psycopg.AsyncConnection.connect(stack.postgres_dsn, autocommit=True) as conn:

            async def ask(cities: list[str] | None):  # type: ignore[no-untyped-def]
                return await cache.page(
                    lending(conn),
                    cities,
                    KEPT,
                    "flow",
                    "1m",
                    start,
                    end,
                    limit=100,
                    start_given=True,
                    end_given=True,
                    render=render,
                )

            elsewhere = await ask(["othercity"])  # another city's caller: not found, and nothing kept
            first = await ask(["keptcity"])
            await conn.execute("UPDATE agg_1m SET n = 2, sum = 5 WHERE device_id = %s", (KEPT,))
            within = await ask(["keptcity"])  # checked an hour ago at most: answered without asking
            admin = await ask(None)  # another scope is its own page, checked anew
            return elsewhere, first, within, admin, cache.answers["fresh"], cache.answers["new"], cache._kept.keys()

    elsewhere, first, within, admin, fresh, misses, keys = asyncio.run(scenario())
    assert elsewhere is None and within == first and fresh == 1 and misses == 3
    assert orjson.loads(first)[0][0]["count"] == 1 and orjson.loads(admin)[0][0]["count"] == 2
    assert [k[0] for k in keys] == [("keptcity",), None]


def test_kept_pages_asked_for_in_the_second_half_of_their_fresh_time_are_checked_in_the_background(stack):
    end = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)
    start = end - dt.timedelta(hours=1)
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        start_kept_series(conn)
        put(conn, start)

    async def scenario() -> tuple[list[int], list[tuple[int, int, int, int]]]:
        cache = SeriesCache(max_bytes=1 << 20, fresh_s=0.6)
        counts, steps = [], []
        async with await psycopg.AsyncConnection.connect(stack.postgres_dsn, autocommit=True) as conn:

            async def ask() -> None:
                body = await cache.page(
                    lending(conn),
                    None,
                    KEPT,
                    "flow",
                    "1m",
                    start,
                    end,
                    limit=100,
                    start_given=True,
                    end_given=True,
                    render=render,
                )
                assert body is not None
                counts.append(orjson.loads(body)[0][0]["count"])
                steps.append(
                    (cache.answers["fresh"], cache.answers["unchanged"], cache.answers["new"], cache.answers["changed"])
                )

            await ask()  # new: checked now
            await asyncio.sleep(0.35)
            await conn.execute("UPDATE agg_1m SET n = 2, sum = 5 WHERE device_id = %s", (KEPT,))
            await ask()  # still fresh: the kept answer, and a check started behind it
            await cache.settled()
            await ask()  # fresh from the background check, which saw the change
            await asyncio.sleep(0.7)
            await ask()  # nothing asked in time: checked before answering
        return counts, steps

    counts, steps = asyncio.run(scenario())
    assert counts == [1, 1, 2, 2]
    # (fresh, unchanged, new, changed) after each request: the background check found the change.
    assert steps == [(0, 0, 1, 0), (1, 0, 1, 0), (2, 0, 1, 1), (2, 1, 1, 1)]


def test_under_load_a_page_past_its_fresh_time_is_answered_as_kept_while_it_is_checked_and_asked_once(stack):
    """Past fresh_s but within stale_s, a page is answered as kept and checked behind the answer;
    past stale_s, callers wait for one check, not one each."""
    end = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)
    start = end - dt.timedelta(hours=1)
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        start_kept_series(conn)
        put(conn, start)

    async def scenario() -> tuple[list[int], tuple[int, ...], list[int], tuple[int, ...]]:
        cache = SeriesCache(max_bytes=1 << 20, fresh_s=0.2, stale_s=0.8)
        async with await psycopg.AsyncConnection.connect(stack.postgres_dsn, autocommit=True) as conn:

            async def ask() -> int:
                body = await cache.page(
                    lending(conn),
                    None,
                    KEPT,
                    "flow",
                    "1m",
                    start,
                    end,
                    limit=100,
                    start_given=True,
                    end_given=True,
                    render=render,
                )
                assert body is not None
                return int(orjson.loads(body)[0][0]["count"])

            def answers() -> tuple[int, ...]:
                return tuple(cache.answers[a] for a in ("fresh", "unchanged", "changed", "new"))

            first = [await ask()]
            await asyncio.sleep(0.3)  # past fresh_s
            await conn.execute("UPDATE agg_1m SET n = 2, sum = 5 WHERE device_id = %s", (KEPT,))
            first.append(await ask())  # the kept answer, at once; its check starts behind it
            await cache.settled()
            first.append(await ask())  # what the check found
            after_stale = answers()
            await asyncio.sleep(0.9)  # past stale_s: five callers at once wait for one check
            await conn.execute("UPDATE agg_1m SET n = 3, sum = 7 WHERE device_id = %s", (KEPT,))
            together = list(await asyncio.gather(*(ask() for _ in range(5))))
            return first, after_stale, together, answers()

    first, after_stale, together, final = asyncio.run(scenario())
    assert first == [1, 1, 2]
    assert after_stale == (2, 0, 1, 1)  # (fresh, unchanged, changed, new)
    assert together == [3] * 5 and final == (2, 0, 2, 1)  # one more check, seen by all five
