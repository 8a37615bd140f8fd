"""One Kafka topic read without a consumer group for as long as the API runs.

The live feed (kota.readings) and the recent rejections (kota.deadletter) both read every partition
of a topic in every API process, from a place of their own choosing, and must outlive a Kafka
restart, a topic not created yet or a secret not written yet. This is that loop, once: the consumer
is built and started inside the retry (a bad option or a missing secret is retried, not fatal), the
wait for partitions is bounded, each failure is logged and retried after `retry_s`, and the
consumer is always stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from kota.settings import StackSettings

log = logging.getLogger("kota.api.kafka")

Batches = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


class TopicReader:
    """Reads `topic` until cancelled: `place(consumer, partitions)` seeks each partition where
    reading starts, `take(batches)` gets what each fetch brings, and `lost()` is called whenever the
    reader lets go of its place (a failure, or being cancelled)."""

    def __init__(
        self,
        stack: StackSettings,
        topic: str,
        *,
        place: Callable[[AIOKafkaConsumer, set[TopicPartition]], Awaitable[None]],
        take: Callable[[Batches], None],
        lost: Callable[[], None] = lambda: None,
        max_records: int = 1000,
        retry_s: float = 2.0,
        assignment_timeout_s: float = 30.0,
        consumer_options: dict[str, Any] | None = None,
    ) -> None:
        self._stack = stack
        self.topic = topic
        self._place, self._take, self._lost = place, take, lost
        self._max_records = max_records
        self._retry_s = retry_s
        self._assignment_timeout_s = assignment_timeout_s
        self._options = consumer_options or {}
        self.failures = 0  # in a row; 0 while reading
        self.consumer: AIOKafkaConsumer | None = None  # while started, for others' metadata questions

    async def run(self) -> None:
        while True:
            consumer: AIOKafkaConsumer | None = None
            try:
                consumer = AIOKafkaConsumer(
                    self.topic,
                    **self._stack.kafka_client_options(),
                    group_id=None,
                    auto_offset_reset="latest",
                    enable_auto_commit=False,
                    **self._options,
                )
                await consumer.start()
                self.consumer = consumer
                await self._place(consumer, await self._assigned(consumer))
                self.failures = 0
                while True:
                    self._take(await consumer.getmany(timeout_ms=500, max_records=self._max_records))
                    await asyncio.sleep(0)  # a long catch-up shares the loop with requests
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the API outlives Kafka, and a reader outlives its failures
                self.failures += 1
                if self.failures == 1:
                    log.exception("reading %s failed; retrying every %g s", self.topic, self._retry_s)
                else:
                    log.warning("reading %s failed again (%d in a row): %r", self.topic, self.failures, exc)
            finally:
                self.consumer = None
                self._lost()
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        await consumer.stop()
            await asyncio.sleep(self._retry_s)  # only after a failure: reading never ends otherwise

    async def _assigned(self, consumer: AIOKafkaConsumer) -> set[TopicPartition]:
        """Without a group the consumer takes every partition once metadata is in; a topic that does
        not exist yet never has any, which is a failure to retry, not a wait for ever."""
        waited = time.monotonic()
        while not consumer.assignment():
            if time.monotonic() - waited > self._assignment_timeout_s:
                raise TimeoutError(f"no partition of {self.topic} assigned in {self._assignment_timeout_s:g} s")
            await asyncio.sleep(0.01)
        return set(consumer.assignment())
