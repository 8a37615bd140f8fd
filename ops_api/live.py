"""The live feed: readings from Kafka and alert changes from PostgreSQL, fanned out to clients.

One Kafka consumer (no group, all partitions, from the end; running only while some client wants
readings) and one LISTEN connection per API process, however many clients are connected. Each
event is serialised once and the same bytes are offered to every client whose filter matches.
Each client has a bounded queue: a client that lets it fill is dropped with a reason, so one slow
reader never slows the others and memory stays flat.

Readings come from the stream the gateway writes, so the feed shows a reading as soon as it is
accepted (before the processor has stored it); alert changes are announced by the database on commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from aiokafka import AIOKafkaConsumer
from prometheus_client import Counter, Gauge

from kota.contract import READINGS_TOPIC
from kota.settings import StackSettings

log = logging.getLogger("kota.api.live")

CLIENTS = Gauge("kota_api_live_clients", "connected live-feed clients")
DROPPED = Counter("kota_api_live_dropped_clients", "live-feed clients dropped", ["reason"])
EVENTS = Counter("kota_api_live_events", "events received for the live feed", ["type"])
ALERT_CHANNEL = "kota_alert_events"
SLOW_CLIENT = "slow client: more than {n} events waiting; reconnect and read faster"


@dataclass(frozen=True, slots=True)
class Filter:
    """What one client asked for; an empty set means "any". Scope is the caller's cities."""

    scope: frozenset[str] | None
    cities: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    devices: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset({"readings", "alert"})

    def matches(self, kind: str, city: str, domain: str, device_id: str) -> bool:
        return ((self.scope is None or city in self.scope)
                and kind in self.types
                and (not self.cities or city in self.cities)
                and (not self.domains or domain in self.domains)
                and (not self.devices or device_id in self.devices))


@dataclass(eq=False)
class Subscriber:
    """One client's bounded mailbox. The writer takes everything waiting at once, so a busy feed
    costs one wake-up and one frame per batch, not per event."""

    filter: Filter
    capacity: int
    pending: deque[bytes] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: str | None = None

    def offer(self, message: bytes) -> None:
        if self.dropped:
            return
        if len(self.pending) >= self.capacity:
            self.dropped = SLOW_CLIENT.format(n=self.capacity)
            DROPPED.labels("slow").inc()
            self.pending.clear()  # free the memory now, not when the socket closes
        else:
            self.pending.append(message)
        self.ready.set()

    async def take(self) -> list[bytes] | None:
        """Everything waiting (at least one message), or None once dropped."""
        while not self.pending and not self.dropped:
            self.ready.clear()
            await self.ready.wait()
        if self.dropped:
            return None
        taken = list(self.pending)
        self.pending.clear()
        return taken


class LiveHub:
    def __init__(self, stack: StackSettings, *, queue_events: int, kafka_enabled: bool = True) -> None:
        self._stack = stack
        self._queue_events = queue_events
        self._kafka_enabled = kafka_enabled
        self._subscribers: set[Subscriber] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._reader: asyncio.Task[None] | None = None  # the Kafka reader, only while someone wants readings
        self.consumer: AIOKafkaConsumer | None = None

    # -- clients -------------------------------------------------------------------------------
    def subscribe(self, live_filter: Filter) -> Subscriber:
        subscriber = Subscriber(live_filter, self._queue_events)
        self._subscribers.add(subscriber)
        CLIENTS.set(len(self._subscribers))
        if "readings" in live_filter.types and self._kafka_enabled and self._reader is None:
            self._reader = asyncio.create_task(self._read_kafka(), name="live-readings")
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        CLIENTS.set(len(self._subscribers))
        if self._reader is not None and not any("readings" in s.filter.types for s in self._subscribers):
            # Nobody wants readings: stop reading the whole stream (it costs a core on a busy city).
            self._reader.cancel()
            self._reader = None

    @property
    def clients(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: str, city: str, domain: str, device_id: str, event: dict[str, Any]) -> None:
        EVENTS.labels(kind).inc()
        message: bytes | None = None
        for subscriber in self._subscribers:
            if subscriber.filter.matches(kind, city, domain, device_id):
                message = message or orjson.dumps(event)
                subscriber.offer(message)

    # -- sources -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._listen_alerts(), name="live-alerts"))

    async def stop(self) -> None:
        if self._reader is not None:
            self._tasks.append(self._reader)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _read_kafka(self) -> None:
        while True:
            consumer = AIOKafkaConsumer(READINGS_TOPIC, bootstrap_servers=self._stack.kafka_bootstrap, group_id=None,
                                        auto_offset_reset="latest", enable_auto_commit=False, fetch_max_wait_ms=50)
            try:
                await consumer.start()
                self.consumer = consumer
                while True:
                    batches = await consumer.getmany(timeout_ms=500, max_records=2000)
                    for records in batches.values():
                        self._publish_records(r.value for r in records)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the feed outlives a Kafka restart
                log.exception("live feed: Kafka reader failed; retrying in 2 s")
                await asyncio.sleep(2)
            finally:
                self.consumer = None
                with contextlib.suppress(Exception):
                    await consumer.stop()

    def _publish_records(self, values: Iterable[bytes | None]) -> None:
        for value in values:
            try:
                body = orjson.loads(value or b"")
                event = {"type": "readings", "city": body["city"], "domain": body["domain"],
                         "device_id": body["device"], "received_ms": body["recv"],
                         "readings": [{"ts": ts, "metric": m, "value": v, "unit": u} for ts, m, v, u in body["r"]]}
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # not the wire format: the processor counts these; the feed just skips them
            self.publish("readings", event["city"], event["domain"], event["device_id"], event)

    async def _listen_alerts(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._stack.postgres_dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {ALERT_CHANNEL}")
                    async for note in conn.notifies():
                        change = orjson.loads(note.payload)
                        self.publish("alert", change["city"], change["domain"], change["device_id"],
                                     {"type": "alert", **change})
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - reconnect after a database restart
                log.exception("live feed: LISTEN connection failed; retrying in 2 s")
                await asyncio.sleep(2)
