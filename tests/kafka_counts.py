"""Count what reached the readings topic in Kafka, for the gateway's delivery tests."""

from __future__ import annotations

import asyncio
from collections import Counter

from aiokafka import AIOKafkaConsumer, TopicPartition

from kota.contract import READINGS_TOPIC, decode_device_batch
from kota.settings import StackSettings


async def _count(stack: StackSettings, device_ids: set[str]) -> Counter[tuple[str, str, int]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    counts: Counter[tuple[str, str, int]] = Counter()
    try:
        partitions = [TopicPartition(READINGS_TOPIC, p) for p in consumer.partitions_for_topic(READINGS_TOPIC) or ()]
        if not partitions:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - first use of a fresh client
            partitions = [TopicPartition(READINGS_TOPIC, p) for p in consumer.partitions_for_topic(READINGS_TOPIC)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
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


def readings_in_kafka(stack: StackSettings, device_ids: set[str]) -> Counter[tuple[str, str, int]]:
    """(device, metric, ts) → how many times it is in the readings topic."""
    return asyncio.run(_count(stack, device_ids))
