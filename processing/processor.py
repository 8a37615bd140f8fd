"""The stream processor: consume `kota.readings` as a consumer group, write micro-batches exactly once.

On start and on every rebalance the processor seeks each assigned partition to the offset stored
in the database (not Kafka's committed offset): the database is the source of truth, because
data and offsets commit there together. Offsets are also committed to Kafka afterwards, only so
that standard tools can show consumer lag.

Each partition has its own detectors (`processing.detect.Detectors`): a device's readings always
land in one partition, so the state of a series only depends on that partition's order. The
state is checkpointed with the offset it reflects in the batch transaction; on assignment it is
restored and the partition is read again from the checkpoint, so the detectors see the records
between checkpoint and stored offset once more while the store writes nothing for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import psycopg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord
from prometheus_client import Counter, Gauge, start_http_server

from kota.alerts import Signal, apply_signals
from kota.contract import METRICS, READINGS_TOPIC, RELATIONS, Reading, decode_device_batch
from kota.registry import device_ranges
from kota.schema import Backend, ensure_partitions, storage_backend
from kota.settings import StackSettings
from processing import kernels, maintenance
from processing.detect import (
    FOUND_COUNT,
    FOUND_INTERVAL,
    FOUND_LAST_TS,
    FOUND_LAST_VALUE,
    Detectors,
    DetectorSnapshot,
    deserialize,
    serialize,
)
from processing.kernels import REASONS
from processing.rulebook import RuleBook
from processing.rules import RulePolicy, detector_signal
from processing.settings import ProcessorSettings
from processing.store import (
    NOT_FINITE,
    TIME_OUT_OF_RANGE,
    UNDECODABLE,
    AnomalyRow,
    Batch,
    Checkpoint,
    DeadLetter,
    PartitionSlice,
    WritePolicy,
    database_unavailable,
    load_checkpoints,
    load_offsets,
    not_signalled_yet,
    write_batch,
    write_isolating,
)

log = logging.getLogger("kota.processor")

EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
ABSENT_RECHECK_S = 60.0  # how long a device missing from the registry is taken as still missing
# Reading and receive times the processor keeps: 1970 to 2200 (UTC, epoch ms). Outside, a record is a
# dead letter: a time of 1e20 ms overflowed the day arithmetic of the readings' partitions.
TS_MIN_MS, TS_MAX_MS = 0, 7_258_118_400_000
STORAGE_RETRY_WAIT_S = 0.2  # between tries of a batch the database refused (not one it could not be reached for)

READINGS_IN = Counter("kota_processor_readings_in", "readings consumed from Kafka")
READINGS_STORED = Counter("kota_processor_readings_stored", "readings newly stored")
DUPLICATES = Counter("kota_processor_duplicates", "readings already stored (Kafka duplicates)")
UNDECODABLE_RECORDS = Counter("kota_processor_undecodable_records", "Kafka records not in the wire format")
DEAD_LETTERS = Counter("kota_processor_dead_letters", "records written to processor_dead_letters", ["reason"])
LAST_BATCH = Gauge(
    "kota_processor_last_batch_unixtime", "when the last batch was committed", multiprocess_mode="max"
)  # the newest of the workers' (processing/workers.py)
LATE = Counter("kota_processor_late_readings", "readings later than the allowed lateness, kept in late_readings")
ANOMALIES = Counter("kota_processor_anomalies", "anomalies stored", ["reason"])
ALERT_CHANGES = Counter("kota_processor_alert_changes", "alerts raised, updated, escalated or cleared", ["action"])


def new_detectors(
    settings: ProcessorSettings, range_of: Callable[[tuple[str, str]], tuple[float, float]] | None = None
) -> Detectors:
    """The kernels' defaults with the processor's settings applied (apply_settings), judging each
    series as the measurement catalogue says (catalogue_kind), and its relations' pairs together
    where `relations` is on; `range_of`: declared ranges."""
    return Detectors(
        apply_settings(kernels.DEFAULT_PARAMS.copy(), settings),
        kind_of=catalogue_kind,
        range_of=range_of,
        relations=RELATIONS if settings.relations else (),
    )


@dataclasses.dataclass
class PartitionState:
    """What the processor keeps for one assigned partition; dropped whole when it is revoked."""

    detectors: Detectors
    detected_until: int | None  # the offset of the next record the detectors' state expects (None: any)
    last_checkpoint: float = -math.inf  # time.monotonic() of the last detector checkpoint
    # Re-reading from a detector checkpoint older than the stored offsets: a new checkpoint is due
    # as soon as the re-read reaches that offset, not a whole interval later (a processor restarted
    # more often than the interval re-read ever more on each start).
    checkpoint_when_past: int | None = None
    sought_back: int | None = None  # the last offset _in_step sought back to
    silent: set[int] = dataclasses.field(default_factory=set)  # series already signalled as dropped out
    # The way each device's readings last came (`source_path`): devices on one way share its pace, so
    # one of them silent while the others go on is a dropout in event time. Not checkpointed: a device
    # not seen since a restart is judged again from its next reading on.
    path_of: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    next_eviction: float = -math.inf  # time.monotonic() of the next look for series to evict
    # Kafka's high watermark at the previous wall-clock dropout check (`Processor._caught_up`).
    highwater_then: int | None = None

    def evict_if_due(self, now_ms: float, settings: ProcessorSettings) -> int:
        """Every `evict_check_s`, evict the series silent for `evict_after_days` of event time (0:
        never); the dropout set follows the renumbered ids, and the ways devices came forget the
        devices left with no series. Returns how many went."""
        if settings.evict_after_days <= 0 or time.monotonic() < self.next_eviction:
            return 0
        self.next_eviction = time.monotonic() + settings.evict_check_s
        new_id = self.detectors.evict_silent(now_ms, settings.evict_after_days * kernels.DAY_MS)
        evicted = int((new_id < 0).sum())
        if evicted:
            self.silent = {int(new_id[sid]) for sid in self.silent if new_id[sid] >= 0}
            kept = {device_id for device_id, _ in self.detectors.keys()}
            self.path_of = {d: way for d, way in self.path_of.items() if d in kept}
        return evicted

    def checkpoint_due(self, next_offset: int, interval_s: float) -> bool:
        """Whether the detectors' state as of `next_offset` is to be saved with this batch."""
        caught_up = self.checkpoint_when_past is not None and next_offset >= self.checkpoint_when_past
        return caught_up or time.monotonic() - self.last_checkpoint >= interval_s


def _dropout(
    partition: int, offset: int, device_id: str, metric: str, since_ms: float, last_value: float
) -> AnomalyRow:
    """A silence found in event time, dated when it crossed the bound, carried with the record at
    `offset` (written exactly once with it) and alerted (`AnomalyRow.silence`)."""
    return AnomalyRow(
        partition, offset, device_id, metric, int(since_ms), float(last_value), 1.0, "dropout", silence=True
    )


def source_path(reading: Reading) -> tuple[str, str]:
    """The way a reading came: (city, "gateway") through a city's gateways, which send their devices'
    readings together, or (device id, "") on the device's own connection."""
    if reading.source.startswith("mqtt-gateway-"):
        return reading.city, "gateway"
    return reading.device_id, ""


def catalogue_kind(key: tuple[str, str]) -> float:
    """How the detectors judge a (device, metric) series, from the measurement catalogue."""
    metric = METRICS.get(key[1])
    if metric is None:
        return kernels.MEASURED
    return kernels.STATE_CODE if metric.state else kernels.SWITCHED if metric.switched else kernels.MEASURED


def apply_settings(params: np.ndarray, settings: ProcessorSettings) -> np.ndarray:
    """The detector parameters the processor's settings choose, in place (also on restored checkpoints):
    - no dropout at the reading that ends a silence (the kernels' gap detector, off): the processor
      finds a silence of more than `dropout_factor` usual intervals while it lasts, in event time
      with each batch (`_silences_in_event_time`, so a replay finds it too) and on the wall clock;
      the reading that ends it would be the same event told again, when it is over;
    - the anomaly likelihood (`anomaly_likelihood`, on) with the parameters it sets as
      `kernels.LIKELIHOOD_PARAMS` does, or raw scores with routine-spike damping at
      `routine_spike_rate` (0: off);
    - judgement against the usual for the hour at `daily_tightness` (0: off), and weekend profiles,
      by local time at `utc_offset_hours`."""
    params[kernels.P_GAP_FACTOR] = 0.0
    params[kernels.P_WEEKENDS] = 1.0 if settings.weekend_profiles else 0.0
    params[kernels.P_DAILY_TIGHTNESS] = settings.daily_tightness
    params[kernels.P_UTC_OFFSET_HOURS] = settings.utc_offset_hours
    calibrated_by = kernels.LIKELIHOOD_PARAMS if settings.anomaly_likelihood else kernels.DEFAULT_PARAMS
    for name in kernels.LIKELIHOOD_SETS:
        params[kernels.param_index(name)] = calibrated_by[kernels.param_index(name)]
    if not settings.anomaly_likelihood:
        params[kernels.P_ROUTINE_RATE] = settings.routine_spike_rate
    params[kernels.P_REPEAT_BELOW] = settings.anomaly_threshold
    return params


class SeekToDatabaseOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    """On each assignment, start every partition at the offset stored with its data in the database
    (exactly once), and forget the state of partitions taken away."""

    def __init__(self, processor: Processor) -> None:
        self._processor = processor

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        partitions = {tp.partition for tp in revoked if tp.topic == READINGS_TOPIC}
        if partitions:
            log.info("partitions %s revoked", sorted(partitions))
        self._processor.forget(partitions)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._processor.seek_to_stored(assigned)


class Processor:
    """The stream processor: Kafka batches in; readings, aggregates, anomalies, alerts and offsets out,
    in one database transaction per batch.

    Detector state is kept per assigned partition (PartitionState) and checkpointed with the data, so
    a partition that moves to another processor, or a restart, goes on exactly where it was."""

    def __init__(self, *, stack: StackSettings, settings: ProcessorSettings) -> None:
        self._stack, self._settings = stack, settings
        self._consumer: AIOKafkaConsumer | None = None
        self._partition_days: set[dt.date] = set()
        self._backend: Backend = "postgres"
        self._partitions: dict[int, PartitionState] = {}
        # Each air-quality station's newest minute whose ISPU a committed batch evaluated, and each water
        # meter's newest night hour evaluated for leaks (write_batch):
        # not kept across restarts, when a station's current minute is evaluated once more.
        self._ispu_evaluated: dict[str, int] = {}
        self._ranges: dict[str, dict[str, tuple[float, float]]] = {}
        # Devices with readings on the topic but not in the registry (deleted since), or with a metric
        # it does not declare, as of their last load: not loaded again until ABSENT_RECHECK_S has passed.
        self._absent: set[str] = set()
        self._absent_since = 0.0
        # Until batches show it, records are taken to be as big as a gateway's batches of readings.
        self._readings_per_record = 50.0
        self._policy = WritePolicy(
            allowed_lateness_ms=int(settings.allowed_lateness_s * 1000),
            rules=RulePolicy(ispu_window_minutes=settings.ispu_window_minutes),
            default_clear_after_s=settings.clear_after_s,
            rulebook=RuleBook(),  # the operators' rules, read again when they change (processing/rulebook.py)
        )

    async def seek_to_stored(self, assigned: set[TopicPartition]) -> None:
        assert self._consumer is not None
        partitions = sorted(tp.partition for tp in assigned if tp.topic == READINGS_TOPIC)
        async with await self._connect() as conn:
            stored = await load_offsets(conn, self._settings.group_id, READINGS_TOPIC, partitions)
            checkpoints = await load_checkpoints(conn, self._settings.group_id, READINGS_TOPIC, partitions)
        for p in partitions:
            tp = TopicPartition(READINGS_TOPIC, p)
            detectors = new_detectors(self._settings, self._range)
            if p in checkpoints:
                # Each series' kind from today's catalogue (a checkpoint may predate a kind).
                detectors.restore(deserialize(checkpoints[p].series, checkpoints[p].state))
                # Settings, not learned state: today's settings win over the ones a checkpoint was saved with.
                apply_settings(detectors.params, self._settings)
                self._consumer.seek(tp, checkpoints[p].next_offset)
                state = PartitionState(detectors, checkpoints[p].next_offset, last_checkpoint=time.monotonic())
                if stored.get(p, -1) > checkpoints[p].next_offset:
                    state.checkpoint_when_past = stored[p]
            else:
                # No detector state yet: the detectors start learning here, and the first batch
                # writes a checkpoint, so from then on a restart resumes with the same state.
                if p in stored:
                    self._consumer.seek(tp, stored[p])
                else:
                    await self._consumer.seek_to_beginning(tp)
                state = PartitionState(detectors, stored.get(p))
            self._partitions[p] = state
            detectors.mark_arrivals(np.arange(detectors.n_series), time.time() * 1000)
        log.info(
            "assigned partitions %s; database offsets %s; detector checkpoints at %s",
            partitions,
            stored,
            {p: c.next_offset for p, c in checkpoints.items()},
        )

    def forget(self, partitions: set[int]) -> None:
        """Drop the state of revoked partitions: whoever gets them next restores from the checkpoint."""
        for p in partitions:
            self._partitions.pop(p, None)

    async def _connect(self) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(self._stack.postgres_dsn, connect_timeout=5)

    async def _reconnect_if_broken(self, conn: psycopg.AsyncConnection) -> psycopg.AsyncConnection:
        """A fresh connection if `conn` is gone or stuck; `conn` itself while the database is still down.

        Stuck: a server shutdown in the middle of an executemany (psycopg's pipeline mode) left the
        connection neither closed nor broken, but still in the aborted pipeline ("cannot exit pipeline
        mode while busy"); every retry of the batch on it failed the same way, for good (seen in
        tests/test_faults.py). Between batches a usable connection is idle, so any other state is
        replaced too."""
        stuck = not (conn.closed or conn.broken) and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        if not (conn.closed or conn.broken or stuck):
            return conn
        try:
            fresh = await self._connect()
        except psycopg.OperationalError:
            return conn
        if stuck:
            with contextlib.suppress(Exception):
                await conn.close()
        return fresh

    async def run(self, stop: asyncio.Event) -> None:
        # Python's cycle collector ran after every 700 new container objects, and a batch makes a
        # tuple per reading: a sixth of a worker's CPU went to collections that found nothing (a
        # batch's objects go with their reference counts; perf, a live stream at 35,000 readings/s).
        # Everything loaded at start stays out of the collections, and the young generation is
        # collected a hundred times less often.
        gc.freeze()
        gc.set_threshold(70_000, 20, 20)
        if self._settings.metrics_enabled:
            start_http_server(self._stack.processor_metrics_port, addr=self._stack.bind_host)
        with psycopg.connect(self._stack.postgres_dsn) as sync_conn:
            self._backend = storage_backend(sync_conn)
        self._policy = dataclasses.replace(self._policy, track_rollups=self._backend == "postgres")
        self._consumer = AIOKafkaConsumer(
            **self._stack.kafka_client_options(),
            group_id=self._settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            # A member joining or leaving (a worker restarted, a second processor) is noticed at the
            # next heartbeat; at the default 3 s the others went on alone for that long.
            heartbeat_interval_ms=1000,
        )
        self._consumer.subscribe([READINGS_TOPIC], listener=SeekToDatabaseOffsets(self))
        await self._consumer.start()
        conn = await self._connect()
        next_dropout_check = time.monotonic() + self._settings.dropout_check_s
        next_maintenance = time.monotonic() + min(5.0, self._settings.maintenance_interval_s)
        try:
            while not stop.is_set():
                batch = await self._consumer.getmany(
                    timeout_ms=self._settings.poll_timeout_ms, max_records=self._batch_records()
                )
                if batch:
                    conn = await self._store_until_done(conn, batch, stop)
                if time.monotonic() >= next_dropout_check:
                    next_dropout_check = time.monotonic() + self._settings.dropout_check_s
                    conn = await self._check_dropouts(conn)
                if time.monotonic() >= next_maintenance:
                    next_maintenance = time.monotonic() + self._settings.maintenance_interval_s
                    await self._maintain()
        finally:
            await conn.close()
            await self._consumer.stop()

    def _batch_records(self) -> int:
        """How many records to ask Kafka for: max_batch_readings at the readings per record seen lately."""
        wanted = self._settings.max_batch_readings / max(self._readings_per_record, 1.0)
        return max(1, min(self._settings.max_batch_records, int(wanted)))

    async def _store_until_done(
        self,
        conn: psycopg.AsyncConnection,
        batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
        stop: asyncio.Event,
    ) -> psycopg.AsyncConnection:
        slices = [self._decode(tp, records) for tp, records in batch.items() if records]
        records = sum(len(s.readings_by_offset) for s in slices)
        readings = sum(len(r) for s in slices for _, r in s.readings_by_offset)
        if records:
            self._readings_per_record += 0.5 * (readings / records - self._readings_per_record)
        await self._refresh_ranges(slices)
        slices, anomalies, snapshots = self._detect(slices)
        if not slices:
            return conn
        # Serialising a checkpoint deflates every series' state (about 1.6 s at 100,000 series, zlib's
        # CPU, which releases the GIL): on a thread, so the consumer's heartbeats and fetches go on.
        checkpoints = [
            Checkpoint(partition, next_offset, *await asyncio.to_thread(serialize, snapshot))
            for partition, next_offset, snapshot in snapshots
        ]
        to_store = Batch(self._settings.group_id, READINGS_TOPIC, slices, anomalies, checkpoints, self._ispu_evaluated)
        tries = 0
        while True:
            isolating = tries >= self._settings.storage_tries
            try:
                if self._backend == "postgres":
                    await self._ensure_partitions(slices, quiet=isolating)
                if not isolating:
                    outcome = await write_batch(conn, to_store, self._policy)
                else:
                    raw = {(tp.partition, r.offset): (r.key, r.value) for tp, records in batch.items() for r in records}
                    outcome = await write_isolating(conn, to_store, raw, self._policy)
                break
            except Exception as exc:
                if database_unavailable(exc, conn):
                    # Database down or restarting: wait and retry the same batch; nothing is dropped.
                    log.warning("database unavailable (%s); retrying batch in %.0f s", exc, self._settings.retry_wait_s)
                    await asyncio.sleep(self._settings.retry_wait_s)
                    conn = await self._reconnect_if_broken(conn)
                    continue
                # The data, not the database: a record whose readings it refuses. Tried again a few
                # times, then stored without the records that fail (as dead letters).
                if isolating:
                    raise
                tries += 1
                log.warning(
                    "batch not stored (%s: %s); try %d of %d%s",
                    type(exc).__name__,
                    str(exc)[:300],
                    tries,
                    self._settings.storage_tries,
                    ", now storing it in parts to find the records at fault"
                    if tries >= self._settings.storage_tries
                    else "",
                )
                await asyncio.sleep(STORAGE_RETRY_WAIT_S)
        self._ispu_evaluated.update(outcome.ispu_minutes)  # committed: later batches need not evaluate these
        READINGS_IN.inc(outcome.readings_in)
        READINGS_STORED.inc(outcome.readings_stored)
        DUPLICATES.inc(outcome.readings_in - outcome.readings_stored - outcome.late)
        LATE.inc(outcome.late)
        for reason in outcome.dead_letters:
            DEAD_LETTERS.labels(reason).inc()
        for change in outcome.alert_changes:
            ALERT_CHANGES.labels(change.action).inc()
        LAST_BATCH.set(time.time())
        await self._commit_to_kafka(slices)
        return conn

    def _detect(
        self, slices: list[PartitionSlice]
    ) -> tuple[list[PartitionSlice], list[AnomalyRow], list[tuple[int, int, DetectorSnapshot]]]:
        """Score every on-time reading, in partition order; keep what crosses the threshold; snapshot
        the detectors of partitions due a checkpoint (partition, offset it reflects, snapshot). Slices
        that do not start where their partition's detectors left off are left out (to be read again)."""
        detected: list[PartitionSlice] = []
        anomalies: list[AnomalyRow] = []
        snapshots: list[tuple[int, int, DetectorSnapshot]] = []
        threshold = self._settings.anomaly_threshold
        now_ms = time.time() * 1000
        for s in slices:
            # No await between these checks and the scoring: a rebalance can move the detectors only at an await.
            partition = self._partitions.get(s.partition)
            if partition is None:
                continue  # revoked during an await, or not set up yet: its owner reads these records from its seek
            if not self._in_step(TopicPartition(READINGS_TOPIC, s.partition), s.first_offset):
                continue
            detected.append(s)
            detectors = partition.detectors
            rows = [
                (offset, r)
                for offset, readings in s.readings_by_offset
                for r in readings
                if not self._policy.is_late(r)
            ]
            ids, scores, reasons, found = detectors.score_readings(
                [r for _, r in rows], now_ms, records=[offset for offset, _ in rows]
            )
            anomalies.extend(self._silences_inside(s.partition, partition, rows, ids, found))
            for i in np.flatnonzero((scores >= threshold) | (reasons == kernels.REPEAT)):
                offset, r = rows[i]
                anomalies.append(
                    AnomalyRow(
                        s.partition,
                        offset,
                        r.device_id,
                        r.metric,
                        r.ts_ms,
                        r.value,
                        float(scores[i]),
                        REASONS[reasons[i]],
                    )
                )
                if reasons[i] != kernels.REPEAT:
                    ANOMALIES.labels(REASONS[reasons[i]]).inc()
            partition.silent.difference_update(ids.tolist())
            if rows:
                anomalies.extend(self._silences_in_event_time(s.partition, partition, rows))
            partition.detected_until = s.next_offset
            if evicted := partition.evict_if_due(now_ms, self._settings):
                log.info(
                    "partition %d: evicted %d series silent for %g days",
                    s.partition,
                    evicted,
                    self._settings.evict_after_days,
                )
            if partition.checkpoint_due(s.next_offset, self._settings.checkpoint_interval_s):
                partition.checkpoint_when_past = None
                snapshots.append((s.partition, s.next_offset, detectors.snapshot()))
                partition.last_checkpoint = time.monotonic()
        return detected, anomalies, snapshots

    def _silences_inside(
        self,
        partition_id: int,
        partition: PartitionState,
        rows: list[tuple[int, Reading]],
        ids: np.ndarray,
        found: np.ndarray,
    ) -> list[AnomalyRow]:
        """Dropouts that began and ended inside what this batch shows: a series' reading more than
        `dropout_factor` usual intervals after its one before (in the batch, or before it: `found` is
        each reading's series as the batch found it, `BatchScores.found`). A batch of a fast replay
        holds hours of event time, so a silence can start and end within one; dated when it crossed
        the bound, as `_silences_in_event_time` dates the ones that last, and not again for a series
        that one already signalled."""
        if not rows:
            return []
        factor = self._settings.dropout_factor
        warmup = partition.detectors.params[kernels.P_WARMUP]
        ts = np.fromiter((r.ts_ms for _, r in rows), np.float64, len(rows))
        order = np.lexsort((ts, ids))
        sorted_ids, sorted_ts, found = ids[order], ts[order], found[order]
        first = np.ones(len(order), bool)
        first[1:] = sorted_ids[1:] != sorted_ids[:-1]
        previous = np.where(first, found[:, FOUND_LAST_TS], np.concatenate(([0.0], sorted_ts[:-1])))
        interval = found[:, FOUND_INTERVAL]
        known = (found[:, FOUND_COUNT] >= warmup) & (interval > 0.0) & (previous > 0.0)
        since = previous + factor * interval
        dropouts = []
        for k in np.flatnonzero(known & (sorted_ts > since)).tolist():
            if first[k] and int(sorted_ids[k]) in partition.silent:
                continue  # signalled while it lasted; this reading ends it
            offset, r = rows[int(order[k])]
            last_value = found[k, FOUND_LAST_VALUE] if first[k] else rows[int(order[k - 1])][1].value
            dropouts.append(_dropout(partition_id, offset, r.device_id, r.metric, since[k], last_value))
        return dropouts

    def _silences_in_event_time(
        self, partition_id: int, partition: PartitionState, rows: list[tuple[int, Reading]]
    ) -> list[AnomalyRow]:
        """Dropouts while they last, in event time: series silent for more than `dropout_factor`
        usual intervals by what came after them in this batch. A series is judged against its own
        device's readings in records after its own last one (a metric silent while its device reports
        on; a device that sends each metric in messages of its own may send one metric's hours ahead
        of another's, so only what came after counts), and against the others that come the same way
        (`source_path`: through a city's gateways, which send their devices' readings together) with
        a record after its own last one: the lowest of their newest readings, which every one of them
        has reached. Readings that come different ways run ahead or behind each other in a replay,
        so only a device's own way says it is silent, and a device alone on its way (its own
        connection) is left to its own readings and the wall-clock timer. A replay, however fast, so
        finds a silence near the event time it happened. Each is dated when its silence crossed the
        bound (a function of the series' state, so the same batch read again dates it alike) and
        carried with the batch's last record, so it is written exactly once with it."""
        detectors = partition.detectors
        factor = self._settings.dropout_factor
        series_last: dict[tuple[str, str], int] = {}  # each series' last record in the batch
        readings_of: dict[str, list[tuple[int, int]]] = {}  # each device's (record, time), in order
        for offset, r in rows:
            series_last[(r.device_id, r.metric)] = offset
            readings_of.setdefault(r.device_id, []).append((offset, r.ts_ms))
            partition.path_of[r.device_id] = source_path(r)
        # Per way, each device's last record and newest reading.
        by_way: dict[tuple[str, str], list[tuple[str, int, int]]] = {}
        for device_id, readings in readings_of.items():
            by_way.setdefault(partition.path_of[device_id], []).append(
                (device_id, readings[-1][0], max(ts for _, ts in readings))
            )

        def reached_after(device_id: str, after: int) -> int:
            """The furthest its device, or the others on its way, have gone in records after `after`."""
            furthest = max((ts for offset, ts in readings_of.get(device_id, ()) if offset > after), default=-1)
            way = partition.path_of.get(device_id)
            if way is not None and way[1]:  # not alone on its way (its own connection)
                others = [newest for d, last, newest in by_way.get(way, ()) if d != device_id and last > after]
                furthest = max(furthest, min(others, default=-1))
            return furthest

        # Silent by the newest reading of all: a superset, judged one by one below.
        newest_of_all = max(r.ts_ms for _, r in rows)
        candidates = np.flatnonzero(detectors.silence(float(newest_of_all), factor) > 0).tolist()
        found = []
        keys = detectors.keys() if candidates else []
        state = detectors.state
        for sid in candidates:
            if sid in partition.silent:
                continue
            device_id, metric = keys[sid]
            since = state[sid, kernels.LAST_TS] + factor * state[sid, kernels.INTERVAL]
            if reached_after(device_id, series_last.get((device_id, metric), -1)) <= since:
                continue
            partition.silent.add(sid)
            found.append(_dropout(partition_id, rows[-1][0], device_id, metric, since, state[sid, kernels.LAST_VALUE]))
        return found

    def _in_step(self, tp: TopicPartition, first_offset: int) -> bool:
        """Whether these records start where the partition's detector state left off. If not, seek
        there and skip them: they come again in order. The seek to a checkpoint made on assignment
        can be lost in the consumer's own start-up (it resumed at the committed offset after a
        kill -9), and detectors that miss records see a false gap and drift from a clean run."""
        assert self._consumer is not None
        partition = self._partitions[tp.partition]
        expected = partition.detected_until
        if expected is None or first_offset == expected:
            return True
        if first_offset > expected and partition.sought_back == expected:
            # Asked for once already and still not there: Kafka's retention has deleted them.
            log.warning(
                "partition %d: records %d to %d are no longer on Kafka; the detectors go on without them",
                tp.partition,
                expected,
                first_offset - 1,
            )
            return True
        log.warning(
            "partition %d: records from %d, but the detectors are at %d; reading again from there",
            tp.partition,
            first_offset,
            expected,
        )
        partition.sought_back = expected
        try:
            self._consumer.seek(tp, expected)
        except IllegalStateError:
            pass  # revoked meanwhile: its next owner starts from the stored checkpoint
        return False

    def _range(self, key: tuple[str, str]) -> tuple[float, float]:
        return self._ranges.get(key[0], {}).get(key[1], (-math.inf, math.inf))

    async def _refresh_ranges(self, slices: list[PartitionSlice]) -> None:
        """Declared metric ranges per device, for the range detector (and the resting-at-the-floor
        rule); loaded for a device before readings of a metric not loaded yet are scored (a new
        device, or a new metric declared), since a series keeps the range it was created with."""
        if time.monotonic() - self._absent_since >= ABSENT_RECHECK_S:
            self._absent.clear()
        metrics_of: dict[str, set[str]] = {}
        for s in slices:
            for _, readings in s.readings_by_offset:
                for r in readings:
                    if r.metric not in self._ranges.get(r.device_id, ()) and r.device_id not in self._absent:
                        metrics_of.setdefault(r.device_id, set()).add(r.metric)
        if not metrics_of:
            return

        def load() -> dict[str, dict[str, tuple[float, float]]]:
            # Only the devices not seen yet: a whole registry of 21,000 devices took 1.7 s to load,
            # in a thread but holding the interpreter, on every batch that brought a new device.
            with psycopg.connect(self._stack.postgres_dsn, connect_timeout=5) as conn:
                return device_ranges(conn, sorted(metrics_of))

        try:
            loaded = await asyncio.to_thread(load)
        except psycopg.Error as exc:  # unreachable, or a device id it refuses (a NUL): scored without ranges
            log.warning("device ranges not refreshed (%s)", str(exc)[:300])
            return
        self._ranges.update(loaded)
        if not self._absent:
            self._absent_since = time.monotonic()
        # Missing from the registry, or sending a metric it does not declare: not asked again for a while.
        self._absent |= {d for d, metrics in metrics_of.items() if not metrics <= self._ranges.get(d, {}).keys()}

    def _caught_up(self) -> set[int]:
        """The assigned partitions whose detectors have scored everything Kafka held for them at the
        previous check (its high watermark then). A partition whose readings wait there (a backlog
        after an outage or a restart, or one partition served while another waits its turn) has no
        silent devices on the wall clock: the silence is the processor's own, and the event-time check
        finds real ones as it catches up. Against the high watermark of the check before, not of now:
        on a busy partition new readings arrive while a batch is stored, so "nothing waiting now" is
        seldom true of a processor that keeps up. Reads only what the consumer already knows: no
        request to Kafka, so no wait, and no rebalance between looking and judging."""
        assert self._consumer is not None
        assigned = self._consumer.assignment()
        caught_up = set()
        for partition_id, partition in self._partitions.items():
            tp = TopicPartition(READINGS_TOPIC, partition_id)
            if tp not in assigned:
                continue
            before, partition.highwater_then = partition.highwater_then, self._consumer.highwater(tp)
            if before is not None and partition.detected_until is not None and partition.detected_until >= before:
                caught_up.add(partition_id)
        return caught_up

    def _timer_silences(self, now_ms: float, caught_up: set[int]) -> list[Signal]:
        """Dropouts on the wall clock: series of caught-up partitions silent for much longer than
        their usual interval since their last arrival, each signalled once."""
        signals: list[Signal] = []
        for partition_id, partition in self._partitions.items():
            if partition_id not in caught_up:
                continue
            detectors = partition.detectors
            silence = detectors.silence(now_ms, self._settings.dropout_factor, since_arrival=True)
            newly_silent = [sid for sid in np.flatnonzero(silence > 0).tolist() if sid not in partition.silent]
            keys = detectors.keys() if newly_silent else []
            for sid in newly_silent:
                partition.silent.add(sid)
                device_id, metric = keys[sid]
                last_ts = int(detectors.state[sid, kernels.LAST_TS])
                last_value = float(detectors.state[sid, kernels.LAST_VALUE])
                signals.append(detector_signal(device_id, metric, last_ts, last_value, 1.0, "dropout"))
        return signals

    async def _check_dropouts(self, conn: psycopg.AsyncConnection) -> psycopg.AsyncConnection:
        """Signal series silent for much longer than their usual interval (wall clock since last
        arrival), on partitions the processor has caught up with."""
        signals = self._timer_silences(time.time() * 1000, self._caught_up())
        if not signals:
            return conn
        try:
            async with conn.transaction():
                signals = await not_signalled_yet(conn, signals)
                changes = await apply_signals(
                    conn, signals, self._policy.clear_after_s, self._policy.default_clear_after_s
                )
            for change in changes:
                ALERT_CHANGES.labels(change.action).inc()
        except psycopg.OperationalError as exc:
            log.warning("dropout alerts not written (%s); will retry", exc)
            for partition in self._partitions.values():
                partition.silent.clear()
            conn = await self._reconnect_if_broken(conn)
        return conn

    async def _maintain(self) -> None:
        try:
            await asyncio.to_thread(maintenance.run, self._stack.postgres_dsn, self._backend)
        except psycopg.Error as exc:
            log.warning("maintenance skipped (%s)", exc)

    def _decode(self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> PartitionSlice:
        """The records' readings; a record not in the wire format, or with a time or value the
        platform does not keep, holds none and becomes a dead letter (written with the batch)."""
        by_offset: list[tuple[int, list[Reading]]] = []
        dead: list[DeadLetter] = []
        for record in records:
            try:
                readings = decode_device_batch(record.value)
                # PostgreSQL text and jsonb (the detectors' checkpoint names the series) hold no NUL; in
                # JSON it can only come escaped, and one search of the record's bytes costs next to nothing.
                fault = (
                    (UNDECODABLE, "a string holds a NUL character") if b"\\u0000" in record.value else poison(readings)
                )
            except Exception as exc:  # noqa: BLE001 - whatever a record holds, it must not stop the partition
                UNDECODABLE_RECORDS.inc()
                readings, fault = [], (UNDECODABLE, f"not a readings record: {type(exc).__name__}: {exc}")
            if fault is not None:
                log.error(
                    "%s[%d]@%d not stored (%s), written to processor_dead_letters: %s",
                    tp.topic,
                    tp.partition,
                    record.offset,
                    fault[0],
                    fault[1][:300].encode("unicode_escape").decode(),
                )
                dead.append(DeadLetter(tp.partition, record.offset, fault[0], fault[1], record.key, record.value))
                readings = []
            by_offset.append((record.offset, readings))
        return PartitionSlice(tp.partition, records[0].offset, records[-1].offset + 1, by_offset, dead)

    async def _ensure_partitions(self, slices: list[PartitionSlice], *, quiet: bool = False) -> None:
        """`quiet`: a failure (not of the connection) is logged, and readings of a day without its
        partition go to the default one."""
        # UTC days by integer division first: a datetime per reading took 1.0 s per million readings, this 0.2 s.
        days = {
            dt.date.fromordinal(EPOCH_ORDINAL + day)
            for day in {r.ts_ms // 86_400_000 for s in slices for _, readings in s.readings_by_offset for r in readings}
        }
        missing = days - self._partition_days
        if not missing:
            return

        def create() -> None:
            with psycopg.connect(self._stack.postgres_dsn, autocommit=True) as conn:
                for day in sorted(missing):
                    ensure_partitions(conn, day)

        try:
            await asyncio.to_thread(create)
        except psycopg.OperationalError:
            raise
        except Exception as exc:
            if not quiet:
                raise
            log.warning("readings partitions for %s not made (%s: %s)", sorted(missing), type(exc).__name__, exc)
            return
        self._partition_days |= missing

    async def _commit_to_kafka(self, slices: list[PartitionSlice]) -> None:
        assert self._consumer is not None
        try:
            await self._consumer.commit({TopicPartition(READINGS_TOPIC, s.partition): s.next_offset for s in slices})
        except (CommitFailedError, KafkaError) as exc:
            log.info("offset commit to Kafka skipped (%s); the database holds the real offsets", exc)


def poison(readings: list[Reading]) -> tuple[str, str] | None:
    """Why a decoded record's readings cannot be kept (reason, message), or None. Checked per record,
    in passes the interpreter runs in C where it can: this is the processor's hottest loop."""
    if not readings:
        return None
    first = readings[0]
    if not all(type(v) is str for v in (first.city, first.domain, first.device_id, first.source)) or not all(
        type(r.metric) is str and type(r.unit) is str for r in readings
    ):
        return UNDECODABLE, "a device, city, domain, source, metric or unit that is not a string"
    if any("~" in r.metric for r in readings):
        # The gateway takes only catalogue metrics; past it, a name with "~" would be taken for a
        # relation between two of the device's metrics (kota.contract.Relation.series_name).
        return UNDECODABLE, "a metric name with '~', which relations between metrics keep for themselves"
    times = [r.ts_ms for r in readings]
    low, high = min(times), max(times)
    if low < TS_MIN_MS or high >= TS_MAX_MS:
        return TIME_OUT_OF_RANGE, f"reading time {low if low < TS_MIN_MS else high} ms is outside 1970..2200"
    received = first.received_ms
    if type(received) is not int or not TS_MIN_MS <= received < TS_MAX_MS:
        return TIME_OUT_OF_RANGE, f"receive time {received!r} is not an epoch ms within 1970..2200"
    if not all(map(math.isfinite, [r.value for r in readings])):
        return NOT_FINITE, "a value that is NaN or infinite"
    return None


async def run_processor(stack: StackSettings, settings: ProcessorSettings, stop: asyncio.Event) -> None:
    await Processor(stack=stack, settings=settings).run(stop)
