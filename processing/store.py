"""Database writes of the processor: one transaction per micro-batch, offsets included.

Exactly-once rests on four things done together in `write_batch`:
1. the partition offsets are locked (`FOR UPDATE`) and records at or before what is stored are
   skipped, so a rebalance race or a replay after a crash cannot apply a record twice;
2. readings are COPYed into a staging table and inserted with `ON CONFLICT DO NOTHING`, so a
   reading that reached Kafka twice (a gateway retry) is stored once;
3. one-minute aggregates are merged from exactly the rows that insert added (`RETURNING`), so
   they always equal an aggregation of the stored readings;
4. the new offsets are written in the same transaction as the data they produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from kota.contract import Reading


@dataclass(frozen=True, slots=True)
class PartitionSlice:
    """The records of one Kafka partition in a batch, already decoded."""

    partition: int
    first_offset: int
    next_offset: int  # last offset + 1
    readings_by_offset: list[tuple[int, list[Reading]]]


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    readings_in: int
    readings_stored: int
    records_skipped: int  # already applied by an earlier transaction (replay after crash or rebalance)


STAGING_DDL = """
CREATE TEMP TABLE IF NOT EXISTS staging_readings (
    ts_ms bigint NOT NULL, device_id text NOT NULL, metric text NOT NULL,
    value double precision NOT NULL, unit text NOT NULL, received_ms bigint NOT NULL
) ON COMMIT DELETE ROWS
"""


STORE_AND_AGGREGATE = """
WITH inserted AS (
    INSERT INTO readings (ts, device_id, metric, value, received_at)
    SELECT timestamptz 'epoch' + ts_ms * interval '1 millisecond', device_id, metric, value,
           timestamptz 'epoch' + received_ms * interval '1 millisecond'
    FROM staging_readings
    ON CONFLICT DO NOTHING
    RETURNING device_id, metric, ts, value
), partials AS (
    SELECT device_id, metric, date_bin('1 minute', ts, timestamptz 'epoch') AS bucket,
           count(*) AS n, sum(value) AS sum, sum(value * value) AS sum_sq, min(value) AS min, max(value) AS max,
           min(ts) AS first_ts, (array_agg(value ORDER BY ts))[1] AS first_value,
           max(ts) AS last_ts, (array_agg(value ORDER BY ts DESC))[1] AS last_value
    FROM inserted GROUP BY 1, 2, 3
), merged AS (
    INSERT INTO agg_1m AS a (device_id, metric, bucket, n, sum, sum_sq, min, max, first_ts, first_value,
                             last_ts, last_value)
    SELECT * FROM partials
    ON CONFLICT (device_id, metric, bucket) DO UPDATE SET
        n = a.n + EXCLUDED.n, sum = a.sum + EXCLUDED.sum, sum_sq = a.sum_sq + EXCLUDED.sum_sq,
        min = least(a.min, EXCLUDED.min), max = greatest(a.max, EXCLUDED.max),
        first_value = CASE WHEN EXCLUDED.first_ts < a.first_ts THEN EXCLUDED.first_value ELSE a.first_value END,
        first_ts = least(a.first_ts, EXCLUDED.first_ts),
        last_value = CASE WHEN EXCLUDED.last_ts > a.last_ts THEN EXCLUDED.last_value ELSE a.last_value END,
        last_ts = greatest(a.last_ts, EXCLUDED.last_ts)
    RETURNING 1
)
SELECT count(*), (SELECT count(*) FROM merged) FROM inserted
"""


async def load_offsets(conn: psycopg.AsyncConnection, group: str, topic: str,
                       partitions: list[int]) -> dict[int, int]:
    cur = await conn.execute(
        "SELECT partition, next_offset FROM stream_offsets "
        "WHERE consumer_group = %s AND topic = %s AND partition = ANY(%s)", (group, topic, partitions))
    return {p: o for p, o in await cur.fetchall() if o >= 0}


async def write_batch(conn: psycopg.AsyncConnection, *, group: str, topic: str,
                      slices: list[PartitionSlice]) -> BatchOutcome:
    readings_in = sum(len(r) for s in slices for _, r in s.readings_by_offset)
    partitions = [s.partition for s in slices]
    async with conn.transaction():
        await conn.execute(STAGING_DDL)
        # Make sure a row exists to lock, then lock it: a second processor that was handed the
        # same partition waits here until we commit, and then sees our offset.
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO stream_offsets (consumer_group, topic, partition, next_offset) "
                "VALUES (%s, %s, %s, -1) ON CONFLICT DO NOTHING", [(group, topic, p) for p in partitions])
        cur = await conn.execute(
            "SELECT partition, next_offset FROM stream_offsets WHERE consumer_group = %s AND topic = %s "
            "AND partition = ANY(%s) ORDER BY partition FOR UPDATE", (group, topic, partitions))
        stored: dict[int, int] = dict(await cur.fetchall())

        skipped = 0
        rows = 0
        async with conn.cursor() as cur:
            async with cur.copy("COPY staging_readings (ts_ms, device_id, metric, value, unit, received_ms) "
                                "FROM STDIN") as copy:
                for s in slices:
                    already = stored[s.partition]
                    for offset, readings in s.readings_by_offset:
                        if offset < already:
                            skipped += 1
                            continue
                        for r in readings:
                            await copy.write_row((r.ts_ms, r.device_id, r.metric, r.value, r.unit, r.received_ms))
                            rows += 1
        cur = await conn.execute(STORE_AND_AGGREGATE)
        row = await cur.fetchone()
        inserted = int(row[0]) if row else 0
        await conn.execute("""
            INSERT INTO latest_values (device_id, metric, ts, value, unit)
            SELECT DISTINCT ON (device_id, metric) device_id, metric,
                   timestamptz 'epoch' + ts_ms * interval '1 millisecond', value, unit
            FROM staging_readings ORDER BY device_id, metric, ts_ms DESC
            ON CONFLICT (device_id, metric) DO UPDATE
              SET ts = EXCLUDED.ts, value = EXCLUDED.value, unit = EXCLUDED.unit
              WHERE latest_values.ts <= EXCLUDED.ts""")
        async with conn.cursor() as cur:
            await cur.executemany(
                "UPDATE stream_offsets SET next_offset = %s, updated_at = now() "
                "WHERE consumer_group = %s AND topic = %s AND partition = %s AND next_offset < %s",
                [(s.next_offset, group, topic, s.partition, s.next_offset) for s in slices])
    return BatchOutcome(readings_in=readings_in, readings_stored=inserted, records_skipped=skipped)
