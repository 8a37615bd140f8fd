"""Count what reached the readings topic in Kafka, for the gateway's delivery tests."""

from __future__ import annotations

import asyncio
from collections import Counter

from aiokafka import AIOKafkaConsumer, TopicPartition

from kota.contract import READINGS_TOPIC, decode_device_batch
from kota.settings import StackSettings


async def _partitions(consumer: AIOKafkaConsumer) -> list[TopicPartition]:
    partitions = consumer.partitions_for_topic(READINGS_TOPIC)
    if not partitions:
        await consumer._client.force_metadata_update()  # noqa: SLF001 - first use of a fresh client
        partitions = consumer.partitions_for_topic(READINGS_TOPIC) or set()
    return [TopicPartition(READINGS_TOPIC, p) for p in sorted(partitions)]


async def _end_offsets(stack: StackSettings) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(await _partitions(consumer))
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


def end_offsets(stack: StackSettings) -> dict[int, int]:
    """Where each partition of the readings topic ends now: count from here to skip older tests' records."""
    return asyncio.run(_end_offsets(stack))


async def _count(stack: StackSettings, device_ids: set[str], since: dict[int, int] | None
                 ) -> Counter[tuple[str, str, int]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    counts: Counter[tuple[str, str, int]] = Counter()
    try:
        partitions = await _partitions(consumer)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        for tp in partitions:
            if since and tp.partition in since:
                consumer.seek(tp, since[tp.partition])
        end = await consumer.end_offsets(partitions)
        async def behind() -> bool:
            return any([await consumer.position(tp) < end[tp] for tp in partitions])

        while await behind():
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batch.values():
                for record in records:
                    if record.key is not None and record.key.decode() in device_ids:
                        for r in decode_device_batch(record.value):
                            counts[(r.device_id, r.metric, r.ts_ms)] += 1
    finally:
        await consumer.stop()
    return counts


def readings_in_kafka(stack: StackSettings, device_ids: set[str], since: dict[int, int] | None = None
                      ) -> Counter[tuple[str, str, int]]:
    """(device, metric, ts) → how many times it is in the readings topic (from `since`, or the start)."""
    return asyncio.run(_count(stack, device_ids, since))
