"""The live feed: readings from Kafka and alert changes from PostgreSQL, fanned out to clients.

One Kafka consumer (no group, all partitions, from the end; running only while some client wants
readings) and one LISTEN connection per API process, however many clients are connected. Clients
with the same filter form a group: each event is matched once per group and serialised once, and
each fetch from Kafka becomes one frame per group, shared by every client in it. Each client has a
bounded queue (in events): a client that lets it fill is dropped with a reason, so one slow reader
never slows the others, and memory stays flat because the frames waiting are shared.

Readings come from the stream the gateway writes, so the feed shows a reading as soon as it is
accepted (before the processor has stored it); alert changes are announced by the database on commit.

The same LISTEN connection hears changes of access (`kota_access_changed`: a token revoked or
re-dated, a user's role, cities or enabled changed): the hub hands them to `access_changed`, which
forgets cached tokens and closes the streams that no longer hold (ops_api/api/routes/live.py). A
stream also closes when its token expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import Counter, Gauge

from kota.contract import READINGS_TOPIC
from kota.settings import StackSettings
from ops_api.auth import BAD_TOKEN, Principal
from ops_api.topic_reader import Batches, TopicReader

log = logging.getLogger("kota.api.live")

CLIENTS = Gauge("kota_api_live_clients", "connected live-feed clients", multiprocess_mode="livesum")
DROPPED = Counter("kota_api_live_dropped_clients", "live-feed clients dropped", ["reason"])
EVENTS = Counter("kota_api_live_events", "events received for the live feed", ["type"])
ALERT_CHANNEL = "kota_alert_events"
ACCESS_CHANNEL = "kota_access_changed"
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
        return (
            (self.scope is None or city in self.scope)
            and kind in self.types
            and (not self.cities or city in self.cities)
            and (not self.domains or domain in self.domains)
            and (not self.devices or device_id in self.devices)
        )


@dataclass(eq=False, slots=True)
class Frame:
    """The events one filter group got in one flush, serialised once and shared by all its clients."""

    events: list[bytes]
    _text: str | None = None

    @property
    def text(self) -> str:
        """As a WebSocket frame: a JSON array, built once however many clients send it."""
        if self._text is None:
            self._text = (b"[" + b",".join(self.events) + b"]").decode()
        return self._text


def frame_text(frames: list[Frame]) -> str:
    """One JSON array of everything a client had waiting (usually one frame: no copy)."""
    if len(frames) == 1:
        return frames[0].text
    return "[" + ",".join(f.text[1:-1] for f in frames if f.events) + "]"


def frame_events(frames: list[Frame]) -> list[bytes]:
    return [event for frame in frames for event in frame.events]


@dataclass(eq=False)
class Subscriber:
    """One client's bounded mailbox of shared frames. The writer takes everything waiting at once,
    so a busy feed costs one wake-up and one send per flush, not per event."""

    filter: Filter
    capacity: int  # events
    pending: deque[Frame] = field(default_factory=deque)
    waiting_events: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: str | None = None
    close_code: int = 4408  # why the stream ends, once `dropped`: 4408 too slow, 4401 / 4403 access
    # Who opened it, to check again when their access changes (None: tests of the fan-out).
    principal: Principal | None = None
    token: str | None = None
    expiry: asyncio.TimerHandle | None = None

    def offer(self, frame: Frame) -> None:
        if self.dropped:
            return
        if self.waiting_events + len(frame.events) > self.capacity:
            DROPPED.labels("slow").inc()
            self.close(4408, SLOW_CLIENT.format(n=self.capacity))
        else:
            self.pending.append(frame)
            self.waiting_events += len(frame.events)
            self.ready.set()

    def close(self, code: int, reason: str) -> None:
        """End the stream with `code` and `reason`: the writer sends what it must and closes."""
        if self.dropped:
            return
        self.dropped, self.close_code = reason, code
        self.pending.clear()  # let go of the frames now, not when the socket closes
        self.waiting_events = 0
        self.ready.set()

    async def take(self) -> list[Frame] | None:
        """Every frame waiting (at least one), or None once dropped."""
        while not self.pending and not self.dropped:
            self.ready.clear()
            await self.ready.wait()
        if self.dropped:
            return None
        taken = list(self.pending)
        self.pending.clear()
        self.waiting_events = 0
        return taken


@dataclass(eq=False)
class _Group:
    """Clients with the same filter: an event is matched and queued once for all of them."""

    subscribers: set[Subscriber] = field(default_factory=set)
    collected: list[bytes] = field(default_factory=list)


class LiveHub:
    """The live feed's fan-out: one Kafka reader and one LISTEN connection per API process, and the
    WebSocket and SSE clients grouped by what they follow, each with a bounded queue."""

    def __init__(self, stack: StackSettings, *, queue_events: int, kafka_enabled: bool = True) -> None:
        self._stack = stack
        self._queue_events = queue_events
        self._kafka_enabled = kafka_enabled
        # By filter: 200 operators watching the same city cost one match per event, not 200.
        self._groups: dict[Filter, _Group] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._reader: asyncio.Task[None] | None = None  # the Kafka reader, only while someone wants readings
        self._positioned = asyncio.Event()
        self._readings: TopicReader | None = None  # the reader of the running task
        # Changes of access heard on the LISTEN connection (the user, or None: anyone's, after a
        # reconnect that may have missed some), and whether they are being heard at all.
        self.access_changed: Callable[[str | None], None] | None = None
        self.listening: Callable[[bool], None] | None = None

    # -- clients -------------------------------------------------------------------------------
    def subscribe(
        self, live_filter: Filter, principal: Principal | None = None, token: str | None = None
    ) -> Subscriber:
        subscriber = Subscriber(live_filter, self._queue_events, principal=principal, token=token)
        if principal is not None and principal.expires_at is not None:
            subscriber.expiry = asyncio.get_running_loop().call_later(
                max(0.0, principal.expires_at - time.time()), subscriber.close, 4401, BAD_TOKEN
            )
        self._groups.setdefault(live_filter, _Group()).subscribers.add(subscriber)
        CLIENTS.set(self.clients)
        if "readings" in live_filter.types and self._kafka_enabled and self._reader is None:
            self._reader = asyncio.create_task(self._new_reader().run(), name="live-readings")
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber.expiry is not None:
            subscriber.expiry.cancel()
        group = self._groups.get(subscriber.filter)
        if group is not None:
            group.subscribers.discard(subscriber)
            if not group.subscribers:
                del self._groups[subscriber.filter]
        CLIENTS.set(self.clients)
        if self._reader is not None and not any("readings" in f.types for f in self._groups):
            # Nobody wants readings: stop reading the whole stream (it costs a core on a busy city).
            self._reader.cancel()
            self._reader = None
            self._readings = None  # its last words (lost) no longer speak for the feed
            self._positioned.clear()

    @property
    def clients(self) -> int:
        return sum(len(group.subscribers) for group in self._groups.values())

    def subscribers(self, user_id: str | None = None) -> list[Subscriber]:
        """The open streams of `user_id` (None: all of them)."""
        return [
            s
            for group in self._groups.values()
            for s in group.subscribers
            if user_id is None or (s.principal is not None and s.principal.user_id == user_id)
        ]

    def publish(self, kind: str, city: str, domain: str, device_id: str, event: dict[str, Any]) -> None:
        """Send one event to every client whose filter matches, now."""
        self._collect(kind, city, domain, device_id, event)
        self.flush()

    def _collect(self, kind: str, city: str, domain: str, device_id: str, event: dict[str, Any]) -> None:
        EVENTS.labels(kind).inc()
        message: bytes | None = None
        for live_filter, group in self._groups.items():
            if live_filter.matches(kind, city, domain, device_id):
                message = message or orjson.dumps(event)
                group.collected.append(message)

    def flush(self) -> None:
        """Hand each group's collected events to its clients as one shared frame."""
        for group in self._groups.values():
            if group.collected:
                frame = Frame(group.collected)
                group.collected = []
                for subscriber in group.subscribers:
                    subscriber.offer(frame)

    # -- sources -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._listen(), name="live-alerts-access"))

    async def stop(self) -> None:
        if self._reader is not None:
            self._tasks.append(self._reader)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The live feed's Kafka consumer while it reads (the health check asks it for end offsets)."""
        return self._readings.consumer if self._readings is not None else None

    async def live_for(self, live_filter: Filter, timeout_s: float = 5.0) -> bool:
        """Wait, for a client that wants readings, until the Kafka reader has fixed its place at the
        end of the stream: from then on no accepted reading can pass it by. A client (the page)
        takes an open socket to mean exactly that. False if Kafka did not answer in time."""
        if "readings" not in live_filter.types:
            return True
        if self._reader is None:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._positioned.wait(), timeout_s)
        return self._positioned.is_set()

    def _new_reader(self) -> TopicReader:
        """A reader for one reading task. A task cancelled when the last client left may still be
        letting go while the next one starts: only the newest reader's place or loss counts."""

        async def place(consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> None:
            await consumer.seek_to_end(*partitions)
            for partition in partitions:
                await consumer.position(partition)  # asks the broker now, not at the first fetch
            if self._readings is reader:
                self._positioned.set()

        def lost() -> None:
            if self._readings is reader:
                self._positioned.clear()

        reader = TopicReader(
            self._stack,
            READINGS_TOPIC,
            place=place,
            take=self._take_readings,
            lost=lost,
            max_records=2000,
            consumer_options={"fetch_max_wait_ms": 50},
        )
        self._readings = reader
        return reader

    def _take_readings(self, batches: Batches) -> None:
        for records in batches.values():
            self._collect_records(r.value for r in records)
        self.flush()

    def _collect_records(self, values: Iterable[bytes | None]) -> None:
        # A record's event is built and serialised only when some group wants it: every API process
        # reads the whole stream, and building every record's event cost the API 0.12 cores at
        # 50,000 readings/s (bench.e2e) with one client following a dozen devices.
        received = 0
        for value in values:
            try:
                body = orjson.loads(value or b"")
                city, domain, device_id = body["city"], body["domain"], body["device"]
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # not the wire format: the processor counts these; the feed just skips them
            received += 1
            wanting = [
                group
                for live_filter, group in self._groups.items()
                if live_filter.matches("readings", city, domain, device_id)
            ]
            if not wanting:
                continue
            try:
                message = orjson.dumps(
                    {
                        "type": "readings",
                        "city": city,
                        "domain": domain,
                        "device_id": device_id,
                        "received_ms": body["recv"],
                        "readings": [{"ts": ts, "metric": m, "value": v, "unit": u} for ts, m, v, u in body["r"]],
                    }
                )
            except (KeyError, TypeError, ValueError):
                continue
            for group in wanting:
                group.collected.append(message)
        if received:
            EVENTS.labels("readings").inc(received)

    async def _listen(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._stack.postgres_dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {ALERT_CHANNEL}")
                    await conn.execute(f"LISTEN {ACCESS_CHANNEL}")
                    self._set_listening(True)
                    async for note in conn.notifies():
                        self._notified(note.channel, note.payload)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - reconnect after a database restart
                log.exception("live feed: LISTEN connection failed; retrying in 2 s")
            finally:
                self._set_listening(False)
            await asyncio.sleep(2)

    def _set_listening(self, listening: bool) -> None:
        if self.listening is not None:
            self.listening(listening)
        if listening and self.access_changed is not None:
            self.access_changed(None)  # changes made while nobody listened were not heard: check every stream

    def _notified(self, channel: str, payload: str) -> None:
        """One notification; one that does not parse is skipped (anyone connected may NOTIFY)."""
        try:
            change = orjson.loads(payload)
            if channel == ACCESS_CHANNEL:
                if self.access_changed is not None:
                    self.access_changed(str(change["user_id"]))
            else:
                self.publish(
                    "alert", change["city"], change["domain"], change["device_id"], {"type": "alert", **change}
                )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("live feed: skipped a malformed notification on %s", channel)
