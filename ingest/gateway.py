"""The ingest gateway: MQTT (QoS 1) → parse and check → Kafka, acknowledging only what Kafka holds.

    paho thread ──bounded queue──► asyncio: take a batch → parse → produce (idempotent, acks=all)
                                            → await every send → MQTT ack
Rejected input goes to the dead-letter topic with its original bytes and a reason, and is
acknowledged only once that record is in Kafka too: nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter, defaultdict

import psycopg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram, start_http_server

from ingest.dedupe import RecentReadings
from ingest.mqtt_inbox import InboundMessage, MqttInbox
from ingest.parse import ParseLimits, ParseResult, parse_message
from ingest.ratelimit import AccountBudgets, RateLimit, is_rate
from ingest.settings import GatewaySettings
from kota.contract import (
    DEADLETTER_TOPIC,
    GATEWAY_SEGMENT,
    INGEST_PROBE_TOPIC,
    MQTT_INGEST_FILTER,
    MQTT_SHARED_GROUP,
    READINGS_TOPIC,
    Reading,
    Reason,
    Rejection,
    encode_dead_letter,
    encode_device_batch,
    escaped,
    printable,
)
from kota.registry import Device, Gateway, load_devices, load_gateways, load_rate_limits, registry_version
from kota.settings import StackSettings

log = logging.getLogger("kota.gateway")

MESSAGES_IN = PromCounter("kota_gateway_messages_in", "MQTT messages received")
READINGS_OUT = PromCounter("kota_gateway_readings_out", "readings acknowledged by Kafka")
PROBES = PromCounter("kota_gateway_probes", "platform probes acknowledged (not readings)")
REJECTED = PromCounter("kota_gateway_rejected", "rejected readings or messages, by reason", ["reason"])
QUEUE_DEPTH = Gauge("kota_gateway_queue_depth", "messages waiting between paho and Kafka")
INTERNAL_ERRORS = PromCounter(
    "kota_gateway_internal_errors",
    "messages whose checking failed unexpectedly (dead-lettered as internal_error; a platform bug)",
)
SEND_SECONDS = Histogram("kota_gateway_kafka_send_seconds", "time for Kafka to acknowledge a batch")


class BurstLog:
    """Log the first of a kind, then at most one summary per window: no log storms."""

    def __init__(self, logger: logging.Logger, window_s: float) -> None:
        self._log, self._window = logger, window_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def first(self, key: str) -> bool:
        """Whether a line of this kind may be logged now (then it counts as logged)."""
        now = time.monotonic()
        if now - self._last.get(key, -1e18) < self._window:
            self._suppressed[key] += 1
            return False
        self._last[key] = now
        return True

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e18) < self._window:
            self._suppressed[key] += 1
            return
        more = self._suppressed.pop(key, 0)
        suffix = f" (and {more} more like it in the last {self._window:.0f} s)" if more else ""
        self._log.warning("%s%s", message, suffix)
        self._last[key] = now


class IngestGateway:
    """MQTT in, Kafka out: take batches from the inbox, check each message, send readings and dead
    letters, and acknowledge the MQTT messages only once Kafka holds every record they became."""

    def __init__(self, *, stack: StackSettings, settings: GatewaySettings, drain: bool = False) -> None:
        self._stack, self._settings = stack, settings
        self._drain = drain
        self._limits = ParseLimits(settings.max_payload_bytes, settings.max_future_ms, settings.max_age_ms)
        topic_filter = (
            f"$share/{MQTT_SHARED_GROUP}/{MQTT_INGEST_FILTER}" if settings.shared_subscription else MQTT_INGEST_FILTER
        )
        password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
        client_id = settings.client_id.format(hostname=socket.gethostname())
        # The ingest listener: only the ingest account logs in there, devices cannot.
        self._inbox = MqttInbox(
            host=stack.mqtt_host,
            port=stack.mqtt_ingest_port,
            client_id=client_id,
            topic_filter=topic_filter,
            maxsize=settings.queue_size,
            max_bytes=settings.queue_max_bytes,
            username=settings.mqtt_username,
            password=password,
            drain=drain,
        )
        self._recent = RecentReadings(settings.duplicate_memory)
        self._devices: dict[str, Device] = {}
        self._gateways: dict[str, Gateway] = {}
        self._devices_loaded_at = 0.0  # monotonic, for the periodic refresh
        self._devices_as_of_ms = 0  # wall clock when the registry was read
        self._registry_version: tuple[int, ...] = ()  # kota.registry.registry_version at that read
        self._producer: AIOKafkaProducer | None = None
        self._burst = BurstLog(log, settings.log_burst_s)
        # (topic, key) → partition, computed once per device with Kafka's own (murmur2)
        # partitioner: in aiokafka it is pure Python and was a third of the send cost per record.
        self._partition_of: dict[tuple[str, bytes], int] = {}
        self._partitions: dict[str, list[int]] = {}
        self._partitioner = DefaultPartitioner()
        self._budgets = AccountBudgets(
            bytes_per_message=settings.bytes_per_message,
            readings_per_message=settings.readings_per_message,
            volume_burst_s=settings.volume_burst_s,
            largest_payload=self._limits.max_payload_bytes,
            most_readings=self._limits.max_values,
        )
        self._device_rate = RateLimit.of(settings.device_rate_per_s, settings.rate_burst_s)
        self._gateway_rate = RateLimit.of(settings.gateway_rate_per_s, settings.rate_burst_s)
        self._rate_overrides: dict[str, RateLimit] = {}  # registry rows with a rate of their own
        self._registry_rechecked = False

    async def run(self, stop: asyncio.Event) -> None:
        if self._settings.metrics_enabled:
            start_http_server(self._stack.gateway_metrics_port, addr=self._stack.bind_host)
        await self._refresh_devices()
        self._producer = await self._start_producer(stop)
        self._inbox.start()
        last_message = time.monotonic()
        drained = 0
        try:
            while not stop.is_set():
                batch = await asyncio.to_thread(
                    self._inbox.take_batch,
                    self._settings.batch_max_messages,
                    self._settings.batch_max_bytes,
                    self._settings.batch_wait_s,
                )
                QUEUE_DEPTH.set(self._inbox.depth)
                if batch:
                    last_message = time.monotonic()
                    drained += len(batch)
                    await self._forward(batch, stop)
                elif (
                    self._drain
                    and self._inbox.unsubscribed.is_set()
                    and time.monotonic() - last_message > self._settings.drain_quiet_s
                ):
                    log.info("drained %d message(s) from session %s", drained, self._inbox.client_id)
                    print(f"drained {drained} message(s) from session {self._inbox.client_id}", flush=True)
                    return
                if time.monotonic() - self._devices_loaded_at > self._settings.registry_refresh_s:
                    # Busy or idle: a changed rate limit or metric range must not wait for a quiet moment.
                    await self._refresh_devices()
        finally:
            self._inbox.stop()
            if self._producer is not None:
                await self._producer.stop()

    # -- registry ------------------------------------------------------------------------------
    async def _refresh_devices(self) -> bool:
        """Read the registry again if it changed since the last read; True when it was read again.

        Unchanged costs one small query instead of reading every device (a 10,000-device registry
        read every 10 s cost the idle gateway a third of a core)."""
        as_of_ms = time.time_ns() // 1_000_000
        try:
            reload = not self._devices or await asyncio.to_thread(self._read_version) != self._registry_version
            if reload:
                self._devices, self._gateways = await asyncio.to_thread(self._load_registry)
        except psycopg.Error as exc:
            self._burst.warning(
                "registry", f"device registry unavailable, keeping {len(self._devices)} cached devices: {exc}"
            )
            return False
        self._devices_loaded_at = time.monotonic()
        self._devices_as_of_ms = as_of_ms
        return reload

    def _load_registry(self) -> tuple[dict[str, Device], dict[str, Gateway]]:
        with psycopg.connect(self._stack.postgres_dsn, connect_timeout=5) as conn:
            # One transaction on one snapshot: the version describes exactly the devices read with it.
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            self._registry_version = registry_version(conn)
            self._rate_overrides = {
                sender: RateLimit.of(per_s, self._settings.rate_burst_s)
                for sender, per_s in load_rate_limits(conn).items()
                if is_rate(per_s)  # the column's CHECK lets NaN and infinity through
            }
            return load_devices(conn), load_gateways(conn)

    def _read_version(self) -> tuple[int, ...]:
        with psycopg.connect(self._stack.postgres_dsn, connect_timeout=5) as conn:
            return registry_version(conn)

    # -- Kafka ---------------------------------------------------------------------------------
    async def _start_producer(self, stop: asyncio.Event) -> AIOKafkaProducer:
        while True:
            producer = AIOKafkaProducer(
                **self._stack.kafka_client_options(),
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                max_batch_size=512 * 1024,
                request_timeout_ms=30_000,
            )
            try:
                await producer.start()
                log.info("Kafka producer connected to %s", self._stack.kafka_bootstrap)
                return producer
            except KafkaError as exc:
                await producer.stop()
                self._burst.warning("kafka-start", f"Kafka not reachable at {self._stack.kafka_bootstrap}: {exc}")
                if stop.is_set():
                    raise
                await asyncio.sleep(1.0)

    async def _forward(self, batch: list[InboundMessage], stop: asyncio.Event) -> None:
        MESSAGES_IN.inc(len(batch))
        # Never call a device unknown on the word of a registry read older than its message:
        # it may have been provisioned a moment ago.
        if any(
            _sender_of(m.topic) not in self._devices
            and _sender_of(m.topic) not in self._gateways
            and m.received_ms >= self._devices_as_of_ms
            for m in batch
        ):
            await self._refresh_devices()
        records: list[tuple[str, bytes, bytes]] = []
        accepted = 0
        rejected: Counter[str] = Counter()
        throttled: dict[str, list[InboundMessage]] = {}
        self._registry_rechecked = False
        now_s = time.monotonic()
        for msg in batch:
            if msg.topic == INGEST_PROBE_TOPIC:
                PROBES.inc()
                continue
            sender = _sender_of(msg.topic)
            limit = self._rate_limit_of(sender, msg.topic)
            over = self._budgets.admit(sender, limit, len(msg.payload), now_s)
            if over == "messages":
                throttled.setdefault(sender, []).append(msg)
                continue
            if over is not None:
                records.append(self._over_budget_letter(msg, sender, limit, over, len(msg.payload)))
                rejected[Reason.RATE_LIMITED.value] += 1
                continue
            try:
                accepted += await self._check_one(msg, records, rejected, sender, limit, now_s)
            except Exception as exc:  # noqa: BLE001 - the boundary: one message never stops ingest
                # A bug in checking this message, not the sender's fault: it is dead-lettered with its
                # bytes, so nothing is lost and it can be replayed once fixed; the batch goes on. The
                # message is acknowledged with the rest: kept unacknowledged it would come back after
                # every restart (a crash loop, before this boundary existed).
                INTERNAL_ERRORS.inc()
                if self._burst.first(f"internal:{type(exc).__name__}"):
                    log.exception(
                        "checking a message on %s failed; dead-lettered as internal_error", escaped(msg.topic, 200)
                    )
                rejection = Rejection(
                    Reason.INTERNAL_ERROR,
                    f"the platform failed to check this message ({type(exc).__name__}); it is kept here for replay",
                )
                records.append(_dead_letter(msg, [rejection]))
                rejected[Reason.INTERNAL_ERROR.value] += 1
        for sender, messages in throttled.items():
            records.append(self._rate_limited_letter(sender, messages))
            rejected[Reason.RATE_LIMITED.value] += len(messages)
        await self._send_until_acknowledged(records, stop)
        self._inbox.ack(batch)
        READINGS_OUT.inc(accepted)
        for reason, count in rejected.items():
            REJECTED.labels(reason).inc(count)

    async def _check_one(
        self,
        msg: InboundMessage,
        records: list[tuple[str, bytes, bytes]],
        rejected: Counter[str],
        sender: str,
        limit: RateLimit,
        now_s: float,
    ) -> int:
        """Parse one message of `sender`, whose message limit is `limit`, and append its Kafka records
        (readings by device, and at most one dead letter); return how many readings it adds."""
        result = self._parse(msg)
        if (
            not self._registry_rechecked
            and msg.received_ms >= self._devices_as_of_ms
            and any(r.reason in (Reason.UNKNOWN_DEVICE, Reason.DEVICE_DISABLED) for r in result.rejections)
        ):
            # A device behind a known gateway, registered after our last read of the registry
            # (`kota devices add --gateway`, a replay's devices), or one enabled again a moment
            # ago (the broker already lets it in). Once per batch, a cheap check whether the
            # registry changed, so a flood of such messages costs no full reads.
            self._registry_rechecked = True
            if await self._refresh_devices():
                result = self._parse(msg)
        count = len(result.readings)
        if not self._budgets.admit_readings(sender, limit, count, now_s):
            records.append(self._over_budget_letter(msg, sender, limit, "readings", count))
            rejected[Reason.RATE_LIMITED.value] += 1
            return 0
        new, duplicates = self._recent.split_new(result.readings)
        for dup in duplicates:
            result.reject(Reason.DUPLICATE, f"{dup.device_id} {dup.metric} at ts {dup.ts_ms} was already accepted")
        by_device: defaultdict[str, list[Reading]] = defaultdict(list)
        for reading in new:
            by_device[reading.device_id].append(reading)
        accepted = 0
        for device_id, readings in by_device.items():
            records.append((READINGS_TOPIC, device_id.encode(), encode_device_batch(readings)))
            accepted += len(readings)
        if result.rejections:
            # One dead letter per message, however many of its values were rejected.
            records.append(_dead_letter(msg, result.rejections, result.reason_counts))
            rejected.update(result.reason_counts)
            for rejection in result.rejections[:3]:
                self._log_rejection(msg, rejection)
        return accepted

    def _parse(self, msg: InboundMessage) -> ParseResult:
        return parse_message(
            msg.topic,
            msg.payload,
            devices=self._devices,
            gateways=self._gateways,
            received_ms=msg.received_ms,
            limits=self._limits,
        )

    def _rate_limit_of(self, sender: str, topic: str) -> RateLimit:
        override = self._rate_overrides.get(sender)
        is_gateway = topic.split("/", 3)[2:3] == [GATEWAY_SEGMENT]
        default = self._gateway_rate if is_gateway else self._device_rate
        return default if override is None else override

    def _over_budget_letter(
        self, msg: InboundMessage, sender: str, limit: RateLimit, unit: str, amount: int
    ) -> tuple[str, bytes, bytes]:
        """A message that would overdraw its sender's budget in bytes or readings → refused whole."""
        budget = self._budgets.budget(unit, limit)
        rejection = Rejection(
            Reason.RATE_LIMITED,
            f"this message's {amount} {unit} from {printable(sender)} are over its limit of "
            f"{budget.per_s:g} {unit}/s (burst {budget.burst:g}); none of it was accepted",
        )
        self._burst.warning(f"reject:{Reason.RATE_LIMITED}", f"rate limited {escaped(sender, 64)}: {rejection.message}")
        return _dead_letter(msg, [rejection], {Reason.RATE_LIMITED.value: 1})

    def _rate_limited_letter(self, sender: str, messages: list[InboundMessage]) -> tuple[str, bytes, bytes]:
        """A sender's messages over its limit in one batch → one dead letter with the first one's bytes."""
        first = messages[0]
        limit = self._rate_limit_of(sender, first.topic)
        rejection = Rejection(
            Reason.RATE_LIMITED,
            f"{len(messages)} message(s) from {printable(sender)} over its "
            f"limit of {limit.per_s:g}/s (burst {limit.burst:g}) were not "
            "accepted; the first is kept here",
        )
        self._burst.warning(f"reject:{Reason.RATE_LIMITED}", f"rate limited {escaped(sender, 64)}: {rejection.message}")
        return _dead_letter(first, [rejection], {Reason.RATE_LIMITED.value: len(messages)})

    async def _send_until_acknowledged(self, records: list[tuple[str, bytes, bytes]], stop: asyncio.Event) -> None:
        """Send every record; on failure send them all again. A retry may duplicate a record in
        Kafka, never lose one; the processor stores each reading once."""
        while True:
            started = time.perf_counter()
            try:
                await asyncio.gather(*await self._send_batched(records))
                SEND_SECONDS.observe(time.perf_counter() - started)
                return
            except KafkaError as exc:
                self._burst.warning(
                    "kafka-send",
                    f"Kafka send failed ({exc!r}); retrying {len(records)} records "
                    "with a fresh producer; MQTT messages stay unacknowledged",
                )
                assert self._producer is not None
                await self._producer.stop()
                await asyncio.sleep(0.5)
                self._producer = await self._start_producer(stop)
                self._partitions.clear()  # the topics may have been re-partitioned meanwhile
                self._partition_of.clear()

    async def _send_batched(self, records: list[tuple[str, bytes, bytes]]) -> list[asyncio.Future[object]]:
        """Records, still one per device and keyed by its id, go to Kafka as one batch per partition.

        aiokafka's send() costs about 18 us a record (a future each, Python-level partitioning);
        a BatchBuilder per partition costs a fraction of that. Order within a partition, and so
        per device, is the order of `records`.
        """
        producer = self._producer
        assert producer is not None
        by_partition: defaultdict[tuple[str, int], list[tuple[bytes, bytes]]] = defaultdict(list)
        for topic, key, value in records:
            by_partition[(topic, await self._partition(topic, key))].append((key, value))
        futures = []
        for (topic, partition), items in by_partition.items():
            batch = producer.create_batch()
            for key, value in items:
                if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start anew
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    if batch.append(key=key, value=value, timestamp=None) is None:  # larger than any batch
                        futures.append(await producer.send(topic, value=value, key=key, partition=partition))
                        batch = producer.create_batch()
            if batch.record_count():
                futures.append(await producer.send_batch(batch, topic, partition=partition))
        return futures

    async def _partition(self, topic: str, key: bytes) -> int:
        """Kafka's own (murmur2) choice for this key, computed once per key: a device stays on one partition."""
        cached = self._partition_of.get((topic, key))
        if cached is not None:
            return cached
        partitions = self._partitions.get(topic)
        if partitions is None:
            assert self._producer is not None
            partitions = self._partitions[topic] = sorted(await self._producer.partitions_for(topic))
        partition: int = self._partitioner(key, partitions, partitions)
        self._partition_of[(topic, key)] = partition
        return partition

    def _log_rejection(self, msg: InboundMessage, rejection: Rejection) -> None:
        # Messages are built from escaped device text already; the topic is escaped here.
        self._burst.warning(
            f"reject:{rejection.reason}",
            f"rejected {rejection.reason} on {escaped(msg.topic, 200)}: {escaped(rejection.message)}",
        )


def _dead_letter(
    msg: InboundMessage, rejections: list[Rejection], reason_counts: dict[str, int] | None = None
) -> tuple[str, bytes, bytes]:
    """The one dead-letter record of a rejected message: (topic, key, value) for Kafka."""
    value = encode_dead_letter(
        topic=msg.topic,
        payload=msg.payload,
        rejections=rejections,
        reason_counts=reason_counts,
        received_ms=msg.received_ms,
    )
    return (DEADLETTER_TOPIC, msg.topic.encode(), value)


def _sender_of(topic: str) -> str:
    parts = topic.split("/")
    return parts[3] if len(parts) == 5 else ""


async def run_gateway(
    stack: StackSettings, settings: GatewaySettings, stop: asyncio.Event, drain: bool = False
) -> None:
    await IngestGateway(stack=stack, settings=settings, drain=drain).run(stop)
