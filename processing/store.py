"""Database writes of the processor: one transaction per micro-batch, offsets included.

Exactly-once rests on four things done together in `write_batch`:
1. the partition offsets are locked (`FOR UPDATE`) and records at or before what is stored are
   skipped, so a rebalance race or a replay after a crash cannot apply a record twice;
2. readings are COPYed into a staging table and inserted; where the insert meets a reading
   already stored (a gateway retry put it on Kafka twice), it is done again with `ON CONFLICT DO
   NOTHING`, so that reading is stored once;
3. one-minute aggregates are merged from exactly the rows that insert added (`RETURNING`), so
   they always equal an aggregation of the stored readings;
4. the new offsets are written in the same transaction as the data they produced, together with
   what was derived from those readings: anomalies (keyed by reading and reason), alert changes,
   air-quality and flood-gate status, late readings and the detectors' checkpoint.
Anomalies carry the offset of their record, so those from records an earlier transaction already
applied are dropped here, while the detectors still saw them (which is how a restart replays
detector state from its checkpoint without writing anything twice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg.types.json import Jsonb

from kota.alerts import AlertChange, Repeat, Signal, apply_signals, auto_clear
from kota.contract import Reading
from processing.kernels import REASONS, REPEAT
from processing.rules import RulePolicy, detector_signal, evaluate_air_quality, evaluate_flood_gates, rule_inputs


@dataclass(frozen=True, slots=True)
class PartitionSlice:
    """The records of one Kafka partition in a batch, already decoded."""

    partition: int
    first_offset: int
    next_offset: int  # last offset + 1
    readings_by_offset: list[tuple[int, list[Reading]]]


@dataclass(frozen=True, slots=True)
class AnomalyRow:
    """A reading a detector scored at or above the threshold, with the Kafka position it came from; or,
    with reason "repeat", one that would have been an anomaly but is not news (processing.kernels.REPEAT), which
    is not stored as an anomaly but counts on, and holds open, its metric's open alert (kota.alerts.apply_signals)."""

    partition: int
    offset: int
    device_id: str
    metric: str
    ts_ms: int
    value: float
    score: float
    reason: str


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Detector state of one partition as of `next_offset` (see processing.detect.serialize)."""

    partition: int
    next_offset: int
    series: list[list[str]]
    state: bytes


@dataclass(frozen=True, slots=True)
class WritePolicy:
    allowed_lateness_ms: int = 2 * 86_400_000
    rules: RulePolicy = field(default_factory=RulePolicy)
    clear_after_s: dict[str, float] = field(default_factory=lambda: {"dropout": 0.0})
    default_clear_after_s: float = 600.0
    track_rollups: bool = True  # plain PostgreSQL: mark changed hours for processing.maintenance
    use_copy: bool = True  # False for servers without COPY FROM STDIN (the PGlite TimescaleDB test server)
    insert_chunk: int = 500

    def is_late(self, reading: Reading) -> bool:
        """Later than the allowed lateness after its time (by the gateway's receive time): kept aside."""
        return reading.received_ms - reading.ts_ms > self.allowed_lateness_ms


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    readings_in: int
    readings_stored: int
    records_skipped: int  # already applied by an earlier transaction (replay after crash or rebalance)
    late: int = 0
    anomalies: int = 0
    alert_changes: list[AlertChange] = field(default_factory=list)


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
    {on_conflict}
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
# ON CONFLICT DO NOTHING checks the index before each row and again after (speculative insertion):
# a third of the insert's time (20,000 readings: 300-360 ms with it, 200-270 ms without, against the
# bench database). Duplicates are rare, so a batch is first inserted without it, in a savepoint; a
# batch holding one is rolled back to there and inserted again with it.
STORE_NEW_AND_AGGREGATE = STORE_AND_AGGREGATE.format(on_conflict="")
STORE_AND_AGGREGATE = STORE_AND_AGGREGATE.format(on_conflict="ON CONFLICT DO NOTHING")


# The hours (epoch ms) and the newest reading per series come from the batch in Python, where they
# cost a pass over readings the processor holds anyway: as SQL over the staging table (a DISTINCT of
# every reading's hour, a DISTINCT ON sort of every reading) they took 5 µs of database time per
# reading, a seventh of the batch's (bench.processing, pg_stat_statements).
# Ordered, so that two processors marking the same hours cannot deadlock.
# Arrays go as binary parameters (%b) here and in the rules and alerts: as text, psycopg wrote and the
# server parsed every element: 5,000 rows of UPSERT_LATEST's columns took 2-3x as long a round trip
# (bench.processing --only writes).
MARK_ROLLUPS_DIRTY = """
INSERT INTO rollup_dirty (hour)
SELECT kota_ms(h) FROM unnest(%b::bigint[]) AS h ORDER BY 1
ON CONFLICT DO NOTHING
"""

UPSERT_LATEST = """
INSERT INTO latest_values (device_id, metric, ts, value, unit)
SELECT device_id, metric, kota_ms(ts_ms), value, unit
FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::float8[], %b::text[]) AS n(device_id, metric, ts_ms, value, unit)
ON CONFLICT (device_id, metric) DO UPDATE
  SET ts = EXCLUDED.ts, value = EXCLUDED.value, unit = EXCLUDED.unit
  WHERE latest_values.ts <= EXCLUDED.ts
"""


def newest_per_series(readings: list[Reading]) -> list[Reading]:
    """Each (device, metric)'s newest reading by event time, in key order. Of two with the same time
    (a duplicate), the first: the one the readings table keeps."""
    newest: dict[tuple[str, str], Reading] = {}
    for r in readings:
        key = (r.device_id, r.metric)
        known = newest.get(key)
        if known is None or r.ts_ms > known.ts_ms:
            newest[key] = r
    return [newest[key] for key in sorted(newest)]


def hours_of(readings: list[Reading]) -> list[int]:
    """The distinct hours (epoch ms of their start) the readings fall in, in order."""
    return sorted({r.ts_ms // 3_600_000 * 3_600_000 for r in readings})


async def load_checkpoints(conn: psycopg.AsyncConnection, group: str, topic: str, partitions: list[int]
                           ) -> dict[int, Checkpoint]:
    cur = await conn.execute(
        "SELECT partition, next_offset, series, state FROM detector_checkpoints "
        "WHERE consumer_group = %s AND topic = %s AND partition = ANY(%s)", (group, topic, partitions))
    return {p: Checkpoint(p, o, series, bytes(state)) for p, o, series, state in await cur.fetchall()}


async def load_offsets(conn: psycopg.AsyncConnection, group: str, topic: str,
                       partitions: list[int]) -> dict[int, int]:
    cur = await conn.execute(
        "SELECT partition, next_offset FROM stream_offsets "
        "WHERE consumer_group = %s AND topic = %s AND partition = ANY(%s)", (group, topic, partitions))
    return {p: o for p, o in await cur.fetchall() if o >= 0}


async def write_batch(conn: psycopg.AsyncConnection, *, group: str, topic: str, slices: list[PartitionSlice],
                      anomalies: list[AnomalyRow] | None = None, checkpoints: list[Checkpoint] | None = None,
                      policy: WritePolicy | None = None) -> BatchOutcome:
    policy = policy or WritePolicy()
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
        fresh: list[Reading] = []
        late: list[Reading] = []
        for s in slices:
            already = stored[s.partition]
            for offset, readings in s.readings_by_offset:
                if offset < already:
                    skipped += 1
                    continue
                for r in readings:
                    (late if policy.is_late(r) else fresh).append(r)
        await _stage(conn, fresh, policy)
        try:
            async with conn.transaction():
                cur = await conn.execute(STORE_NEW_AND_AGGREGATE)
        except psycopg.errors.UniqueViolation:
            cur = await conn.execute(STORE_AND_AGGREGATE)
        row = await cur.fetchone()
        inserted = int(row[0]) if row else 0
        newest = newest_per_series(fresh)
        await conn.execute(UPSERT_LATEST, ([r.device_id for r in newest], [r.metric for r in newest],
                                           [r.ts_ms for r in newest], [r.value for r in newest],
                                           [r.unit for r in newest]))
        if policy.track_rollups:
            await conn.execute(MARK_ROLLUPS_DIRTY, (hours_of(fresh),))
        if late:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO late_readings (device_id, metric, ts, value, received_at, reason) VALUES "
                    "(%s, %s, kota_ms(%s), %s, kota_ms(%s), %s) ON CONFLICT DO NOTHING",
                    [(r.device_id, r.metric, r.ts_ms, r.value, r.received_ms,
                      f"arrived {(r.received_ms - r.ts_ms) / 3_600_000:.1f} h after its time; "
                      f"allowed lateness is {policy.allowed_lateness_ms / 3_600_000:.1f} h") for r in late])

        unapplied = [a for a in anomalies or () if a.offset >= stored[a.partition]]
        kept = [a for a in unapplied if a.reason != REASONS[REPEAT]]
        repeats = [Repeat(a.device_id, a.metric, a.ts_ms, a.value) for a in unapplied if a.reason == REASONS[REPEAT]]
        if kept:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO anomalies (device_id, metric, ts, reason, value, score) VALUES (%s, %s, kota_ms(%s), "
                    "%s, %s, %s) ON CONFLICT DO NOTHING",
                    [(a.device_id, a.metric, a.ts_ms, a.reason, a.value, a.score) for a in kept])
        # A dropout from the detectors is a gap seen in event time, over by the time it is seen (data
        # came back): stored as an anomaly, not alerted. The processor's timer alerts while a silence lasts.
        signals: list[Signal] = [detector_signal(a.device_id, a.metric, a.ts_ms, a.value, a.score, a.reason)
                                 for a in kept if a.reason != "dropout"]
        stations, gates = rule_inputs(fresh)
        signals += await evaluate_air_quality(conn, stations, policy.rules)
        signals += await evaluate_flood_gates(conn, gates, policy.rules)
        changes = await apply_signals(conn, signals, policy.clear_after_s, policy.default_clear_after_s,
                                      repeats=repeats, times=_reading_times(fresh, signals, repeats))
        changes += await auto_clear(conn, sorted({r.device_id for r in fresh}))

        for c in checkpoints or ():
            await conn.execute(
                "INSERT INTO detector_checkpoints (consumer_group, topic, partition, next_offset, series, state) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET "
                "next_offset = EXCLUDED.next_offset, series = EXCLUDED.series, state = EXCLUDED.state, "
                "saved_at = now() WHERE detector_checkpoints.next_offset <= EXCLUDED.next_offset",
                (group, topic, c.partition, c.next_offset, Jsonb(c.series), c.state))
        async with conn.cursor() as cur:
            await cur.executemany(
                "UPDATE stream_offsets SET next_offset = %s, updated_at = now() "
                "WHERE consumer_group = %s AND topic = %s AND partition = %s AND next_offset < %s",
                [(s.next_offset, group, topic, s.partition, s.next_offset) for s in slices])
    return BatchOutcome(readings_in=readings_in, readings_stored=inserted, records_skipped=skipped, late=len(late),
                        anomalies=len(kept), alert_changes=changes)


def _reading_times(readings: list[Reading], signals: list[Signal], repeats: list[Repeat]
                   ) -> dict[tuple[str, str], list[int]]:
    """Sorted reading times per (device, metric), for the devices with signals or repeats: where an
    alert would have cleared itself between two of them (kota.alerts.apply_signals)."""
    devices = {s.device_id for s in signals} | {r.device_id for r in repeats}
    times: dict[tuple[str, str], list[int]] = {}
    if devices:
        for r in readings:
            if r.device_id in devices:
                times.setdefault((r.device_id, r.metric), []).append(r.ts_ms)
        for t in times.values():
            t.sort()
    return times


async def _stage(conn: psycopg.AsyncConnection, readings: list[Reading], policy: WritePolicy) -> None:
    rows = ((r.ts_ms, r.device_id, r.metric, r.value, r.unit, r.received_ms) for r in readings)
    if policy.use_copy:
        # Binary: 20,000 readings took 23 ms of the processor's time against 53 ms as text (no number
        # formatting on this side, no parsing on the server's).
        async with conn.cursor() as cur:
            async with cur.copy("COPY staging_readings (ts_ms, device_id, metric, value, unit, received_ms) "
                                "FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "text", "text", "float8", "text", "int8"])
                for row in rows:
                    await copy.write_row(row)
        return
    values = list(rows)
    for start in range(0, len(values), policy.insert_chunk):
        chunk = values[start:start + policy.insert_chunk]
        async with conn.cursor() as cur:
            await cur.executemany("INSERT INTO staging_readings (ts_ms, device_id, metric, value, unit, received_ms) "
                                  "VALUES (%s, %s, %s, %s, %s, %s)", chunk)
