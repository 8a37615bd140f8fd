"""The stream processor: consume `kota.readings` as a consumer group, write micro-batches exactly once.

On start and on every rebalance the processor seeks each assigned partition to the offset stored
in the database (not Kafka's committed offset): the database is the source of truth, because
data and offsets commit there together. Offsets are also committed to Kafka afterwards, only so
that standard tools can show consumer lag.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

import psycopg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from prometheus_client import Counter, Gauge, start_http_server
from pydantic_settings import BaseSettings, SettingsConfigDict

from kota.contract import READINGS_TOPIC, Reading, decode_device_batch
from kota.schema import ensure_partitions, storage_backend
from kota.settings import StackSettings
from processing.store import PartitionSlice, load_offsets, write_batch

log = logging.getLogger("kota.processor")

READINGS_IN = Counter("kota_processor_readings_in", "readings consumed from Kafka")
READINGS_STORED = Counter("kota_processor_readings_stored", "readings newly stored")
DUPLICATES = Counter("kota_processor_duplicates", "readings already stored (Kafka duplicates)")
UNDECODABLE = Counter("kota_processor_undecodable_records", "Kafka records not in the wire format")
LAST_BATCH = Gauge("kota_processor_last_batch_unixtime", "when the last batch was committed")


class ProcessorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KOTA_PROCESSOR_", extra="ignore")

    group_id: str = "kota-processor"
    max_batch_records: int = 5_000
    poll_timeout_ms: int = 200
    retry_wait_s: float = 1.0
    metrics_enabled: bool = True


class SeekToDatabaseOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, processor: Processor) -> None:
        self._processor = processor

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._processor.seek_to_stored(assigned)


class Processor:
    def __init__(self, *, stack: StackSettings, settings: ProcessorSettings) -> None:
        self._stack, self._settings = stack, settings
        self._consumer: AIOKafkaConsumer | None = None
        self._partition_days: set[dt.date] = set()
        self._backend = "postgres"

    async def seek_to_stored(self, assigned: set[TopicPartition]) -> None:
        assert self._consumer is not None
        partitions = sorted(tp.partition for tp in assigned if tp.topic == READINGS_TOPIC)
        async with await self._connect() as conn:
            stored = await load_offsets(conn, self._settings.group_id, READINGS_TOPIC, partitions)
        for p in partitions:
            tp = TopicPartition(READINGS_TOPIC, p)
            if p in stored:
                self._consumer.seek(tp, stored[p])
            else:
                await self._consumer.seek_to_beginning(tp)
        log.info("assigned partitions %s; resuming from database offsets %s", partitions, stored)

    async def _connect(self) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(self._stack.postgres_dsn, connect_timeout=5)

    async def run(self, stop: asyncio.Event) -> None:
        if self._settings.metrics_enabled:
            start_http_server(self._stack.processor_metrics_port, addr="127.0.0.1")
        with psycopg.connect(self._stack.postgres_dsn) as sync_conn:
            self._backend = storage_backend(sync_conn)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._stack.kafka_bootstrap, group_id=self._settings.group_id,
            enable_auto_commit=False, auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024)
        self._consumer.subscribe([READINGS_TOPIC], listener=SeekToDatabaseOffsets(self))
        await self._consumer.start()
        conn = await self._connect()
        try:
            while not stop.is_set():
                batch = await self._consumer.getmany(timeout_ms=self._settings.poll_timeout_ms,
                                                     max_records=self._settings.max_batch_records)
                if batch:
                    conn = await self._store_until_done(conn, batch, stop)
        finally:
            await conn.close()
            await self._consumer.stop()

    async def _store_until_done(self, conn: psycopg.AsyncConnection, batch: dict, stop: asyncio.Event
                                ) -> psycopg.AsyncConnection:
        slices = [self._decode(tp, records) for tp, records in batch.items() if records]
        while True:
            try:
                if self._backend == "postgres":
                    await self._ensure_partitions(slices)
                outcome = await write_batch(conn, group=self._settings.group_id, topic=READINGS_TOPIC,
                                            slices=slices)
                break
            except psycopg.OperationalError as exc:
                # Database down or restarting: wait and retry the same batch; nothing is dropped.
                log.warning("database unavailable (%s); retrying batch in %.0f s", exc, self._settings.retry_wait_s)
                await asyncio.sleep(self._settings.retry_wait_s)
                if conn.closed or conn.broken:
                    try:
                        conn = await self._connect()
                    except psycopg.OperationalError:
                        continue
        READINGS_IN.inc(outcome.readings_in)
        READINGS_STORED.inc(outcome.readings_stored)
        DUPLICATES.inc(outcome.readings_in - outcome.readings_stored)
        LAST_BATCH.set(time.time())
        await self._commit_to_kafka(slices)
        return conn

    def _decode(self, tp: TopicPartition, records: list) -> PartitionSlice:
        by_offset: list[tuple[int, list[Reading]]] = []
        for record in records:
            try:
                by_offset.append((record.offset, decode_device_batch(record.value)))
            except (ValueError, KeyError, TypeError) as exc:
                UNDECODABLE.inc()
                log.error("%s[%d]@%d is not a readings record, skipped: %s", tp.topic, tp.partition,
                          record.offset, exc)
                by_offset.append((record.offset, []))
        return PartitionSlice(tp.partition, records[0].offset, records[-1].offset + 1, by_offset)

    async def _ensure_partitions(self, slices: list[PartitionSlice]) -> None:
        days = {dt.datetime.fromtimestamp(r.ts_ms / 1000, dt.UTC).date()
                for s in slices for _, readings in s.readings_by_offset for r in readings}
        missing = days - self._partition_days
        if not missing:
            return

        def create() -> None:
            with psycopg.connect(self._stack.postgres_dsn, autocommit=True) as conn:
                for day in sorted(missing):
                    ensure_partitions(conn, day)

        await asyncio.to_thread(create)
        self._partition_days |= missing

    async def _commit_to_kafka(self, slices: list[PartitionSlice]) -> None:
        assert self._consumer is not None
        try:
            await self._consumer.commit({TopicPartition(READINGS_TOPIC, s.partition): s.next_offset for s in slices})
        except (CommitFailedError, KafkaError) as exc:
            log.info("offset commit to Kafka skipped (%s); the database holds the real offsets", exc)


async def run_processor(stack: StackSettings, settings: ProcessorSettings, stop: asyncio.Event) -> None:
    await Processor(stack=stack, settings=settings).run(stop)
