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

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from kota.alerts import AlertChange, Repeat, Signal, apply_signals, auto_clear, clear_back_to_normal
from kota.contract import Reading
from processing import kernels
from processing.kernels import REASONS, REPEAT
from processing.rulebook import RULE_CLEAR_AFTER_S, CityRules, CustomVerdicts, RuleBook, RuleSnapshot, judge_batch
from processing.rules import (
    RulePolicy,
    detector_signal,
    evaluate_air_quality,
    evaluate_flood_gates,
    evaluate_leaks,
    night_hours_reached,
    rule_inputs,
)

log = logging.getLogger("kota.processor")

MINUTE_MS = 60_000

# Reasons a record becomes a processor dead letter (processor_dead_letters.reason); stable, for dashboards.
UNDECODABLE = "undecodable"  # not the wire format (kota.contract.encode_device_batch)
TIME_OUT_OF_RANGE = "time_out_of_range"  # a reading's or the receive time outside DeadLetter's years
NOT_FINITE = "not_finite"  # a value that is NaN or infinite
STORAGE_ERROR = "storage_error"  # the database refused its readings, in every try
DEAD_LETTER_VALUE_MAX = 64 * 1024
DEAD_LETTER_MESSAGE_MAX = 1000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record the processor will not store: written with its position in the batch transaction that
    moves the partition past it (write_batch), once."""

    partition: int
    offset: int
    reason: str
    message: str
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class PartitionSlice:
    """The records of one Kafka partition in a batch, already decoded."""

    partition: int
    first_offset: int
    next_offset: int  # last offset + 1
    readings_by_offset: list[tuple[int, list[Reading]]]
    dead_letters: list[DeadLetter] = field(default_factory=list)  # records of the slice not to be stored


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
    # A dropout found in event time while it lasts (the partition's other series report on and this
    # one is silent): alerted, unlike a gap seen when data comes back, which is over by then.
    silence: bool = False


async def not_signalled_yet(conn: psycopg.AsyncConnection, signals: list[Signal]) -> list[Signal]:
    """Dropout signals less those of a silence the device's open dropout alert already holds (its
    last time at or after the series' last reading). Which series were signalled is kept in memory,
    and a restarted processor (or a partition's new owner) counted every silence again."""
    cursor = await conn.execute(
        "SELECT device_id, (extract(epoch FROM last_ts) * 1000)::bigint FROM alerts "
        "WHERE alert_type = 'dropout' AND state <> 'cleared' AND device_id = ANY(%s)",
        (sorted({s.device_id for s in signals}),),
    )
    held_until: dict[str, int] = dict(await cursor.fetchall())
    return [s for s in signals if s.ts_ms > held_until.get(s.device_id, -math.inf)]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Detector state of one partition as of `next_offset` (see processing.detect.serialize)."""

    partition: int
    next_offset: int
    series: list[list[str]]
    state: bytes


@dataclass(frozen=True, slots=True)
class Batch:
    """What one transaction stores for a consumer group's topic: the partitions' slices of records,
    the detectors' anomalies and checkpoints for them, and `ispu_evaluated`: each station's newest
    minute (epoch ms) an earlier batch evaluated ISPU at (and each water meter's newest night hour's
    end evaluated for leaks, the same way), kept by the caller: a minute is evaluated once, in the
    first batch that holds readings of it (a live stream brings each station's minute over many
    batches, and an unhealthy minute must count on its alert once). None: every minute the batch
    holds (each batch on its own, as tests/test_rules.py writes them)."""

    group: str
    topic: str
    slices: list[PartitionSlice]
    anomalies: list[AnomalyRow] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    ispu_evaluated: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class WritePolicy:
    """How write_batch writes: lateness allowed, the rules' thresholds, when alerts clear, and the
    storage path (COPY or INSERT, rollup marks)."""

    allowed_lateness_ms: int = 2 * 86_400_000
    rules: RulePolicy = field(default_factory=RulePolicy)
    # A leak is signalled at night hours only: held open to the next night's verdict (which clears
    # it when the flow drops again), or 36 h if no night is evaluated.
    clear_after_s: dict[str, float] = field(default_factory=lambda: {"dropout": 0.0, "leak": 36 * 3600.0})
    default_clear_after_s: float = 600.0
    track_rollups: bool = True  # plain PostgreSQL: mark changed hours for processing.maintenance
    use_copy: bool = True  # False for servers without COPY FROM STDIN (the PGlite TimescaleDB test server)
    insert_chunk: int = 500
    # The operators' rules (processing/rulebook.py): read once per batch, in its transaction. None: the
    # defaults, and no custom rules (tests that write batches without a processor).
    rulebook: RuleBook | None = None

    def is_late(self, reading: Reading) -> bool:
        """Later than the allowed lateness after its time (by the gateway's receive time): kept aside."""
        return reading.received_ms - reading.ts_ms > self.allowed_lateness_ms


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What one batch's transaction did: readings in and stored, records skipped, anomalies and alerts."""

    readings_in: int
    readings_stored: int
    records_skipped: int  # already applied by an earlier transaction (replay after crash or rebalance)
    late: int = 0
    anomalies: int = 0
    alert_changes: list[AlertChange] = field(default_factory=list)
    # Each station's newest minute evaluated (ISPU) and each water meter's newest night hour (leaks).
    ispu_minutes: dict[str, int] = field(default_factory=dict)
    dead_letters: list[str] = field(default_factory=list)  # reasons of the dead letters written now

    def plus(self, other: BatchOutcome) -> BatchOutcome:
        ispu = dict(self.ispu_minutes)
        for device, minute in other.ispu_minutes.items():
            ispu[device] = max(minute, ispu.get(device, minute))
        return BatchOutcome(
            self.readings_in + other.readings_in,
            self.readings_stored + other.readings_stored,
            self.records_skipped + other.records_skipped,
            self.late + other.late,
            self.anomalies + other.anomalies,
            self.alert_changes + other.alert_changes,
            ispu,
            self.dead_letters + other.dead_letters,
        )


STAGING_DDL = """
CREATE TEMP TABLE IF NOT EXISTS staging_readings (
    ts_ms bigint NOT NULL, device_id text NOT NULL, metric text NOT NULL,
    value double precision NOT NULL, unit text NOT NULL, received_ms bigint NOT NULL
) ON COMMIT DELETE ROWS
"""


# The usual batch holds only readings not stored yet: inserted without ON CONFLICT DO NOTHING, whose
# speculative insertion was a third of the insert's time (docs/processing.md). A batch holding a
# reading already stored fails on the primary key, in a savepoint, and is inserted again with it.
STORE_NEW = """
INSERT INTO readings (ts, device_id, metric, value, received_at)
SELECT kota_ms(ts_ms), device_id, metric, value, kota_ms(received_ms) FROM staging_readings
"""
STORE_NOT_STORED = """
INSERT INTO readings (ts, device_id, metric, value, received_at)
SELECT kota_ms(ts_ms), device_id, metric, value, kota_ms(received_ms) FROM staging_readings
ON CONFLICT DO NOTHING
RETURNING device_id, metric, (extract(epoch FROM ts) * 1000)::bigint, value
"""

# One-minute aggregates are merged, in the same transaction, from the partials of exactly the
# readings the insert added: so they always equal an aggregation of the stored readings, once each.
# The partials come from the numba kernel (kernels.minute_partials), cheaper than grouping in SQL.
# Hourly and daily ones are rolled up from agg_1m by processing/maintenance.py (plain PostgreSQL,
# for the hours the batch marks) and by continuous aggregates on TimescaleDB.


MERGE_MINUTES = """
INSERT INTO agg_1m AS a (device_id, metric, bucket, n, sum, sum_sq, min, max, first_ts, first_value, last_ts,
                         last_value)
SELECT device_id, metric, kota_ms(bucket), n, sum, sum_sq, min, max, kota_ms(first_ts), first_value,
       kota_ms(last_ts), last_value
FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::bigint[], %b::float8[], %b::float8[], %b::float8[],
            %b::float8[], %b::bigint[], %b::float8[], %b::bigint[], %b::float8[])
     AS p(device_id, metric, bucket, n, sum, sum_sq, min, max, first_ts, first_value, last_ts, last_value)
ON CONFLICT (device_id, metric, bucket) DO UPDATE SET
    n = a.n + EXCLUDED.n, sum = a.sum + EXCLUDED.sum, sum_sq = a.sum_sq + EXCLUDED.sum_sq,
    min = least(a.min, EXCLUDED.min), max = greatest(a.max, EXCLUDED.max),
    first_value = CASE WHEN EXCLUDED.first_ts < a.first_ts THEN EXCLUDED.first_value ELSE a.first_value END,
    first_ts = least(a.first_ts, EXCLUDED.first_ts),
    last_value = CASE WHEN EXCLUDED.last_ts > a.last_ts THEN EXCLUDED.last_value ELSE a.last_value END,
    last_ts = greatest(a.last_ts, EXCLUDED.last_ts)
"""


# The hours (epoch ms) and the newest reading per series come from the batch in Python, a pass over
# readings the processor holds anyway (cheaper than SQL over the staging table).
# Hours are marked by appending (migration 0008): no batch waits for the rollup job, nor for another
# processor marking the same hour.
# Arrays go as binary parameters (%b) here and in the rules and alerts: as text, every element is
# written by psycopg and parsed by the server.

MARK_ROLLUPS_DIRTY = """
INSERT INTO rollup_dirty (hour) SELECT kota_ms(h) FROM unnest(%b::bigint[]) AS h
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


@dataclass(frozen=True, slots=True)
class StoredColumns:
    """The readings an insert added, as columns: dense series ids (into `keys`), times, values."""

    keys: list[tuple[str, str]]  # (device_id, metric) of each series id
    series: np.ndarray  # int64
    ts_ms: np.ndarray  # float64
    values: np.ndarray  # float64

    @classmethod
    def of(cls, rows: Sequence[tuple[str, str, int, float]]) -> StoredColumns:
        """From (device_id, metric, ts_ms, value) rows."""
        index: dict[tuple[str, str], int] = {}
        n = len(rows)
        series = np.fromiter((index.setdefault((d, m), len(index)) for d, m, _, _ in rows), np.int64, n)
        return cls(
            list(index),
            series,
            np.fromiter((r[2] for r in rows), np.float64, n),
            np.fromiter((r[3] for r in rows), np.float64, n),
        )

    def partials(self, width_ms: int) -> list[list]:  # type: ignore[type-arg]
        """One row per (device, metric, window), as the columns of MERGE_MINUTES: device ids, metrics,
        window start (epoch ms), n, sum, sum of squares, min, max, first time and value, last time
        and value."""
        n = self.series.shape[0]
        if n == 0:
            return [[] for _ in range(12)]
        out_series, out_bucket = np.empty(n, np.int64), np.empty(n)
        out_stats = np.empty((n, kernels.AGG_COLUMNS))
        rows = kernels.minute_partials(
            self.series, self.ts_ms, self.values, float(width_ms), out_series, out_bucket, out_stats
        )
        of_row = [self.keys[s] for s in out_series[:rows].tolist()]
        stats = out_stats[:rows]

        def floats(column: int) -> list[float]:
            return list(stats[:, column].tolist())

        def integers(column: int) -> list[int]:  # counts and times (epoch ms)
            return list(stats[:, column].astype(np.int64).tolist())

        return [
            [k[0] for k in of_row],
            [k[1] for k in of_row],
            out_bucket[:rows].astype(np.int64).tolist(),
            integers(kernels.AGG_N),
            floats(kernels.AGG_SUM),
            floats(kernels.AGG_SUM_SQ),
            floats(kernels.AGG_MIN),
            floats(kernels.AGG_MAX),
            integers(kernels.AGG_FIRST_TS),
            floats(kernels.AGG_FIRST_VALUE),
            integers(kernels.AGG_LAST_TS),
            floats(kernels.AGG_LAST_VALUE),
        ]


def hours_of(readings: list[Reading]) -> list[int]:
    """The distinct hours (epoch ms of their start) the readings fall in, in order."""
    return sorted({r.ts_ms // 3_600_000 * 3_600_000 for r in readings})


async def load_checkpoints(
    conn: psycopg.AsyncConnection, group: str, topic: str, partitions: list[int]
) -> dict[int, Checkpoint]:
    cur = await conn.execute(
        "SELECT partition, next_offset, series, state FROM detector_checkpoints "
        "WHERE consumer_group = %s AND topic = %s AND partition = ANY(%s)",
        (group, topic, partitions),
    )
    return {p: Checkpoint(p, o, series, bytes(state)) for p, o, series, state in await cur.fetchall()}


async def load_offsets(conn: psycopg.AsyncConnection, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
    cur = await conn.execute(
        "SELECT partition, next_offset FROM stream_offsets "
        "WHERE consumer_group = %s AND topic = %s AND partition = ANY(%s)",
        (group, topic, partitions),
    )
    return {p: o for p, o in await cur.fetchall() if o >= 0}


async def write_batch(
    conn: psycopg.AsyncConnection,
    batch: Batch,
    policy: WritePolicy | None = None,
    *,
    nested: bool = False,
    rules: RuleSnapshot | None = None,
) -> BatchOutcome:
    """Store a batch exactly once, in one transaction of named phases: lock the offsets, dead letters,
    the readings not applied yet, their one-minute partials, rollup marks, newest values, late
    readings, anomalies, rules and alerts, detector checkpoints, and the new offsets.

    `nested`: inside a transaction of the caller's (write_isolating), as a savepoint.
    `rules`: the rules to judge by (write_isolating pins one for all its parts); None: the policy's
    rulebook as of this transaction."""
    group, topic, slices = batch.group, batch.topic, batch.slices
    policy = policy or WritePolicy()
    readings_in = sum(len(r) for s in slices for _, r in s.readings_by_offset)
    async with conn.transaction():
        await conn.execute(STAGING_DDL)
        if nested:  # the staging rows of the savepoints before go only at the outer commit
            await conn.execute("DELETE FROM staging_readings")
        stored = await _lock_offsets(conn, group, topic, [s.partition for s in slices])
        dead = await _write_dead_letters(
            conn, group, topic, [d for s in slices for d in s.dead_letters if d.offset >= stored[s.partition]]
        )
        fresh, late, skipped = _unapplied_readings(slices, stored, policy)
        added = await _insert_readings(conn, fresh, policy)
        await _merge_minutes(conn, added, policy)
        if policy.track_rollups:
            await conn.execute(MARK_ROLLUPS_DIRTY, (hours_of(fresh),))
        await _upsert_latest(conn, fresh)
        await _keep_late(conn, late, policy)
        if rules is None and policy.rulebook is not None:
            rules = await policy.rulebook.current(conn)
        kept, changes, stations = await _anomalies_rules_and_alerts(
            conn, batch.anomalies, stored, fresh, policy, batch.ispu_evaluated, rules
        )
        await _save_checkpoints(conn, group, topic, batch.checkpoints)
        await _advance_offsets(conn, group, topic, slices)
    return BatchOutcome(
        readings_in=readings_in,
        readings_stored=len(added.series),
        records_skipped=skipped,
        late=len(late),
        anomalies=len(kept),
        alert_changes=changes,
        ispu_minutes=stations,
        dead_letters=dead,
    )


# The phases of write_batch, in its order, each inside its transaction.


async def _lock_offsets(conn: psycopg.AsyncConnection, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
    """The stored offset of each partition, locked until commit. A row is made first so there is
    one to lock: a second processor handed the same partition waits here until we commit, and then
    sees our offset."""
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO stream_offsets (consumer_group, topic, partition, next_offset) "
            "VALUES (%s, %s, %s, -1) ON CONFLICT DO NOTHING",
            [(group, topic, p) for p in partitions],
        )
    cur = await conn.execute(
        "SELECT partition, next_offset FROM stream_offsets WHERE consumer_group = %s AND topic = %s "
        "AND partition = ANY(%s) ORDER BY partition FOR UPDATE",
        (group, topic, partitions),
    )
    return dict(await cur.fetchall())


def _unapplied_readings(
    slices: list[PartitionSlice], stored: dict[int, int], policy: WritePolicy
) -> tuple[list[Reading], list[Reading], int]:
    """The readings of records not applied yet, on time and late, and how many records were applied
    already (by an earlier transaction: a replay after a crash or a rebalance)."""
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
    return fresh, late, skipped


async def _insert_readings(conn: psycopg.AsyncConnection, fresh: list[Reading], policy: WritePolicy) -> StoredColumns:
    """Stage and insert the readings; the ones the insert added (not those stored already)."""
    await _stage(conn, fresh, policy)
    try:
        async with conn.transaction():
            await conn.execute(STORE_NEW)
        return StoredColumns.of([(r.device_id, r.metric, r.ts_ms, r.value) for r in fresh])
    except psycopg.errors.UniqueViolation:
        cur = await conn.execute(STORE_NOT_STORED)
        return StoredColumns.of(await cur.fetchall())


async def _merge_minutes(conn: psycopg.AsyncConnection, added: StoredColumns, policy: WritePolicy) -> None:
    """Merge the one-minute partials of exactly the readings added into agg_1m: one statement, in
    chunks where the server cannot take long array parameters (PGlite)."""
    partials = added.partials(MINUTE_MS)
    chunk = len(partials[0]) if policy.use_copy else policy.insert_chunk
    for start in range(0, len(partials[0]), chunk or 1):
        await conn.execute(MERGE_MINUTES, [column[start : start + chunk] for column in partials])


async def _upsert_latest(conn: psycopg.AsyncConnection, fresh: list[Reading]) -> None:
    """Each series' newest value, where it is newer than the one stored."""
    newest = newest_per_series(fresh)
    await conn.execute(
        UPSERT_LATEST,
        (
            [r.device_id for r in newest],
            [r.metric for r in newest],
            [r.ts_ms for r in newest],
            [r.value for r in newest],
            [r.unit for r in newest],
        ),
    )


async def _keep_late(conn: psycopg.AsyncConnection, late: list[Reading], policy: WritePolicy) -> None:
    """Readings later than the allowed lateness, kept aside with why (never merged)."""
    if not late:
        return
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO late_readings (device_id, metric, ts, value, received_at, reason) VALUES "
            "(%s, %s, kota_ms(%s), %s, kota_ms(%s), %s) ON CONFLICT DO NOTHING",
            [
                (
                    r.device_id,
                    r.metric,
                    r.ts_ms,
                    r.value,
                    r.received_ms,
                    f"arrived {(r.received_ms - r.ts_ms) / 3_600_000:.1f} h after its time; "
                    f"allowed lateness is {policy.allowed_lateness_ms / 3_600_000:.1f} h",
                )
                for r in late
            ],
        )


async def _anomalies_rules_and_alerts(
    conn: psycopg.AsyncConnection,
    anomalies: list[AnomalyRow],
    stored: dict[int, int],
    fresh: list[Reading],
    policy: WritePolicy,
    ispu_evaluated: dict[str, int] | None,
    rules: RuleSnapshot | None = None,
) -> tuple[list[AnomalyRow], list[AlertChange], dict[str, int]]:
    """Store the anomalies of records not applied yet, evaluate the domain rules, and raise, update
    and clear alerts from both (repeats count on open alerts). Returns the anomalies stored, the
    alert changes and each station's newest minute whose ISPU was evaluated and each meter's newest
    night hour evaluated for leaks."""
    unapplied = [a for a in anomalies if a.offset >= stored[a.partition]]
    kept = [a for a in unapplied if a.reason != REASONS[REPEAT]]
    repeats = [Repeat(a.device_id, a.metric, a.ts_ms, a.value) for a in unapplied if a.reason == REASONS[REPEAT]]
    if kept:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO anomalies (device_id, metric, ts, reason, value, score) VALUES (%s, %s, kota_ms(%s), "
                "%s, %s, %s) ON CONFLICT DO NOTHING",
                [(a.device_id, a.metric, a.ts_ms, a.reason, a.value, a.score) for a in kept],
            )
    # A dropout from the detectors is a gap seen in event time, over by the time it is seen (data
    # came back): stored as an anomaly, not alerted. A silence found while it lasts is alerted (the
    # processor finds them in event time with each batch, and on a wall-clock timer), once per
    # silence however often it is found again (after a restart, by the timer).
    signals: list[Signal] = [
        detector_signal(a.device_id, a.metric, a.ts_ms, a.value, a.score, a.reason)
        for a in kept
        if a.reason != "dropout"
    ]
    silences = [detector_signal(a.device_id, a.metric, a.ts_ms, a.value, a.score, a.reason) for a in kept if a.silence]
    if silences:
        signals += await not_signalled_yet(conn, silences)
    stations, gates, flows = rule_inputs(fresh)
    evaluated = ispu_evaluated or {}
    stations = {
        d: later
        for d, minutes in stations.items()
        if (later := {b: t for b, t in minutes.items() if b > evaluated.get(d, -1)})
    }
    # Leaks: each meter's night hours reached by this batch's flow readings, not evaluated before
    # (at most once per meter per night hour, however many batches bring that hour's readings).
    meters = {
        d: ends
        for d, (first, last) in flows.items()
        if (ends := [e for e in night_hours_reached(first, last, policy.rules) if e > evaluated.get(d, -1)])
    }
    rules_of = None
    custom = CustomVerdicts()
    if rules is not None:
        city_of = {r.device_id: r.city for r in fresh}
        snapshot = rules

        def rules_of(device_id: str) -> CityRules:
            return snapshot.of(city_of.get(device_id, ""))

        custom = await judge_batch(conn, rules, fresh)
    signals += await evaluate_air_quality(conn, stations, policy.rules, rules_of)
    signals += await evaluate_flood_gates(conn, gates, policy.rules, rules_of)
    leaks, normal = await evaluate_leaks(conn, meters, policy.rules)
    signals += leaks
    clear_after_s = policy.clear_after_s | dict.fromkeys(custom.alert_types, RULE_CLEAR_AFTER_S)
    rounds = custom.rounds or [([], [])]
    changes = await apply_signals(
        conn,
        signals + rounds[0][0],
        clear_after_s,
        policy.default_clear_after_s,
        repeats=repeats,
        times=_reading_times(fresh, signals, repeats),
    )
    # A custom rule's episode that clears and comes back within the batch: its clears, then its next
    # signals, round by round (processing.rulebook.CustomVerdicts).
    for depth, (_, clears) in enumerate(rounds):
        if depth > 0:
            changes += await apply_signals(conn, rounds[depth][0], clear_after_s, policy.default_clear_after_s)
        for alert_type in sorted({t for t, _, _ in clears}):
            normal_now = [(d, ts) for t, d, ts in clears if t == alert_type]
            changes += await clear_back_to_normal(conn, alert_type, normal_now, "back past the rule's deadband")
    changes += await clear_back_to_normal(conn, "leak", normal, "night flow back to its usual minimum")
    changes += await auto_clear(conn, sorted({r.device_id for r in fresh}))
    evaluated_now = {d: max(minutes) for d, minutes in stations.items()} | {d: max(e) for d, e in meters.items()}
    return kept, changes, evaluated_now


async def _save_checkpoints(
    conn: psycopg.AsyncConnection, group: str, topic: str, checkpoints: list[Checkpoint]
) -> None:
    """The detectors' state with the offset it reflects (never replacing a newer one)."""
    for c in checkpoints:
        await conn.execute(
            "INSERT INTO detector_checkpoints (consumer_group, topic, partition, next_offset, series, state) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET "
            "next_offset = EXCLUDED.next_offset, series = EXCLUDED.series, state = EXCLUDED.state, "
            "saved_at = now() WHERE detector_checkpoints.next_offset <= EXCLUDED.next_offset",
            (group, topic, c.partition, c.next_offset, Jsonb(c.series), c.state),
        )


async def _advance_offsets(conn: psycopg.AsyncConnection, group: str, topic: str, slices: list[PartitionSlice]) -> None:
    """Move each partition's stored offset past the batch, in the transaction of what it produced."""
    async with conn.cursor() as cur:
        await cur.executemany(
            "UPDATE stream_offsets SET next_offset = %s, updated_at = now() "
            "WHERE consumer_group = %s AND topic = %s AND partition = %s AND next_offset < %s",
            [(s.next_offset, group, topic, s.partition, s.next_offset) for s in slices],
        )


async def _write_dead_letters(
    conn: psycopg.AsyncConnection, group: str, topic: str, letters: list[DeadLetter]
) -> list[str]:
    """Insert dead letters not written yet; the reasons of those written now."""
    if not letters:
        return []
    written: list[str] = []
    async with conn.cursor() as cur:
        for d in letters:
            value = d.value[:DEAD_LETTER_VALUE_MAX] if d.value is not None else None
            # PostgreSQL text holds no NUL; the message may quote a record's bytes.
            message = d.message.replace("\x00", "\\x00")[:DEAD_LETTER_MESSAGE_MAX]
            await cur.execute(
                'INSERT INTO processor_dead_letters (consumer_group, topic, partition, "offset", reason, message, '
                "record_key, record_value, value_length) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING RETURNING reason",
                (
                    group,
                    topic,
                    d.partition,
                    d.offset,
                    d.reason,
                    message,
                    d.key,
                    value,
                    len(d.value) if d.value is not None else 0,
                ),
            )
            if await cur.fetchone():
                written.append(d.reason)
    return written


def database_unavailable(exc: BaseException, conn: psycopg.AsyncConnection) -> bool:
    """Whether a failed write says the database is down, restarting, busy or short of resources (retry
    the batch as long as that lasts), rather than that it refuses the data: psycopg raises
    OperationalError for both (a metric too long for an index is ProgramLimitExceeded, one of them)."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    if conn.closed or conn.broken:
        return True
    state = exc.sqlstate or ""
    # 08 connection, 40 rollback (deadlock, serialization), 53 resources, 55 lock, 57 shutdown or cancel, 58 I/O.
    return not state or state[:2] in ("08", "40", "53", "55", "57", "58")


RawRecords = dict[tuple[int, int], tuple[bytes | None, bytes | None]]  # (partition, offset) -> (key, value)


async def write_isolating(
    conn: psycopg.AsyncConnection, batch: Batch, raw: RawRecords, policy: WritePolicy | None = None
) -> BatchOutcome:
    """Store a batch that write_batch failed on in every try, in one transaction: halves of it, each
    in a savepoint, halved again where they fail, down to the records that fail alone, which become
    dead letters (STORAGE_ERROR). The good records are stored once and every offset moves on with
    them. A batch with k bad records of n takes about 2k log2(n) savepoints; the usual batch none."""
    records = [(s.partition, offset, readings) for s in batch.slices for offset, readings in s.readings_by_offset]
    letters = {(s.partition, d.offset): d for s in batch.slices for d in s.dead_letters}
    by_record: dict[tuple[int, int], list[AnomalyRow]] = {}
    for a in batch.anomalies:
        by_record.setdefault((a.partition, a.offset), []).append(a)
    total = BatchOutcome(0, 0, 0)

    def slices_of(chunk: list[tuple[int, int, list[Reading]]], dead: DeadLetter | None = None) -> list[PartitionSlice]:
        out: dict[int, PartitionSlice] = {}
        for p, offset, readings in chunk:
            s = out.get(p)
            letter = [dead] if dead else [letters[(p, offset)]] if (p, offset) in letters else []
            if s is None:
                out[p] = PartitionSlice(p, offset, offset + 1, [(offset, [] if dead else readings)], letter)
            else:
                s.readings_by_offset.append((offset, readings))
                s.dead_letters.extend(letter)
                out[p] = PartitionSlice(p, s.first_offset, offset + 1, s.readings_by_offset, s.dead_letters)
        return list(out.values())

    async def attempt(chunk: list[tuple[int, int, list[Reading]]]) -> None:
        nonlocal total
        try:
            total = total.plus(
                await write_batch(
                    conn,
                    replace(
                        batch,
                        slices=slices_of(chunk),
                        anomalies=[a for p, o, _ in chunk for a in by_record.get((p, o), ())],
                        checkpoints=[],
                    ),
                    policy,
                    nested=True,
                    rules=pinned,
                )
            )
            return
        except Exception as exc:  # noqa: BLE001 - whatever a record makes the write raise, it must not stop the partition
            if database_unavailable(exc, conn):
                raise  # the database, not the data: the caller retries the whole batch
            if len(chunk) > 1:
                middle = len(chunk) // 2
                await attempt(chunk[:middle])
                await attempt(chunk[middle:])
                return
            p, offset, _ = chunk[0]
            log.error(
                "%s[%d]@%d: readings not stored, written to processor_dead_letters: %s: %s",
                batch.topic,
                p,
                offset,
                type(exc).__name__,
                str(exc)[:300],
            )
            key, value = raw.get((p, offset), (None, None))
            letter = DeadLetter(p, offset, STORAGE_ERROR, f"{type(exc).__name__}: {exc}", key, value)
            only_the_letter = Batch(batch.group, batch.topic, slices_of(chunk, letter))
            total = total.plus(await write_batch(conn, only_the_letter, policy, nested=True))

    pinned: RuleSnapshot | None = None
    async with conn.transaction():
        if policy is not None and policy.rulebook is not None:
            pinned = await policy.rulebook.current(conn)  # one version for every part of the batch
        if records:
            await attempt(records)
        if batch.checkpoints:  # the detectors' state as of the whole batch, records dead-lettered or not
            offsets_only = [PartitionSlice(s.partition, s.first_offset, s.next_offset, []) for s in batch.slices]
            try:
                await write_batch(
                    conn,
                    Batch(batch.group, batch.topic, offsets_only, checkpoints=batch.checkpoints),
                    policy,
                    nested=True,
                )
            except Exception as exc:  # noqa: BLE001 - a restart re-reads from the checkpoint before: slower, not wrong
                if database_unavailable(exc, conn):
                    raise
                log.error("detector checkpoints not saved (%s: %s)", type(exc).__name__, str(exc)[:300])
    return total


def _reading_times(
    readings: list[Reading], signals: list[Signal], repeats: list[Repeat]
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
        # Binary: no number formatting on this side, no parsing on the server's.
        async with conn.cursor() as cur:
            async with cur.copy(
                "COPY staging_readings (ts_ms, device_id, metric, value, unit, received_ms) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["int8", "text", "text", "float8", "text", "int8"])
                for row in rows:
                    await copy.write_row(row)
        return
    values = list(rows)
    for start in range(0, len(values), policy.insert_chunk):
        chunk = values[start : start + policy.insert_chunk]
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO staging_readings (ts_ms, device_id, metric, value, unit, received_ms) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                chunk,
            )
