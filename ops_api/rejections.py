"""A device's recent rejections, from the dead-letter topic: "why was my message refused?" over the API.

Every API process reads `kota.deadletter` without a group, as the live feed reads the readings:
from `window_s` back at start (at most `replay_records` records a partition, since devices set the
topic's volume), then as the gateway writes. Each dead letter is kept under the city and the
device or gateway that published it (its topic's; the broker lets an account publish only on its
own topics), the newest `per_sender` of each, for at most `senders` senders in all. Over that, the
city holding the most senders forgets its least recently rejected one: a city whose devices flood
pushes out its own letters, and other cities' only down to its own count, so a city below an
even share keeps all of its own. Each letter is cut to what a person reads: its reasons counted,
the first few messages, shortened, and the payload's first bytes. So memory is bounded whatever
devices send, and an id moved to another city does not take its old city's letters along.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import time
from collections import OrderedDict, deque
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from kota.contract import DEADLETTER_TOPIC, parse_telemetry_topic, upgraded_dead_letter
from kota.settings import StackSettings
from ops_api.topic_reader import Batches, TopicReader

log = logging.getLogger("kota.api.rejections")

KEPT_MESSAGES = 5  # of a dead letter's rejections, with their messages (all are counted)
KEPT_MESSAGE_CHARS = 300  # of each message (escaped device text can make one 1,300 characters)
KEPT_PAYLOAD_BYTES = 512  # the payload's first bytes (the dead letter keeps 16 KiB)
_KEPT_PAYLOAD_B64 = 4 * ((KEPT_PAYLOAD_BYTES + 2) // 3)  # base64 characters that hold them, decoded alone


def summary(letter: dict[str, Any]) -> dict[str, Any]:
    """A dead-letter record's JSON as the API shows it: small, and all of it text or numbers. Only
    the payload's first bytes are decoded (a record may carry 16 KiB of them)."""
    letter = upgraded_dead_letter(letter)
    reasons = letter.get("reasons")
    rejections = letter.get("rejections")
    if not isinstance(reasons, dict):  # no record the gateway writes: shown as saying nothing
        reasons = {}
    if not isinstance(rejections, list):
        rejections = []
    start = str(letter.get("payload_b64", ""))[:_KEPT_PAYLOAD_B64]
    return {
        "received_at": dt.datetime.fromtimestamp(int(letter.get("received_ms", 0)) / 1000, dt.UTC),
        "topic": str(letter.get("topic", "")),
        "reasons": {str(k): int(v) for k, v in reasons.items()},
        "rejections": [
            {"reason": str(r.get("reason", "")), "message": str(r.get("message", ""))[:KEPT_MESSAGE_CHARS]}
            for r in rejections[:KEPT_MESSAGES]
            if isinstance(r, dict)
        ],
        "rejections_total": int(letter.get("rejections_total", 1)),
        "payload_bytes": int(letter.get("payload_bytes", 0)),
        "payload_sha256": str(letter.get("payload_sha256", "")),
        "payload_start_b64": base64.b64encode(base64.b64decode(start)[:KEPT_PAYLOAD_BYTES]).decode(),
    }


class RecentRejections:
    """The newest `per_sender` dead letters of each of at most `senders` senders, shared fairly
    between cities."""

    def __init__(self, per_sender: int = 10, senders: int = 1000) -> None:
        self.per_sender = per_sender
        self.senders = senders
        # city → sender → its letters, the most recently rejected sender last
        self._kept: dict[str, OrderedDict[str, deque[dict[str, Any]]]] = {}
        self._count = 0

    def add(self, letter: dict[str, Any]) -> bool:
        """Keep a dead letter (its record's JSON) under its city and sender; False if its topic names none."""
        where = parse_telemetry_topic(str(letter.get("topic", "")))
        if where is None:
            return False
        shown = summary(letter)
        city = self._kept.setdefault(where.city, OrderedDict())
        kept = city.pop(where.sender_id, None)
        if kept is None:
            kept = deque(maxlen=self.per_sender)
            self._count += 1
        kept.append(shown)
        city[where.sender_id] = kept
        while self._count > self.senders:
            self._forget_one()
        return True

    def _forget_one(self) -> None:
        """The least recently rejected sender of the city with the most (ties: the first city seen)."""
        name, fullest = max(self._kept.items(), key=lambda item: len(item[1]))
        fullest.popitem(last=False)
        self._count -= 1
        if not fullest:
            del self._kept[name]

    def of(self, city: str, sender_id: str, since: dt.datetime | None = None) -> list[dict[str, Any]]:
        """The sender's kept dead letters in `city`, received at or after `since`, newest first."""
        in_city = self._kept.get(city)
        kept = in_city.get(sender_id) if in_city is not None else None
        return [s for s in reversed(kept or ()) if since is None or s["received_at"] >= since]

    def senders_of(self, city: str) -> int:
        return len(self._kept.get(city, ()))

    def __len__(self) -> int:
        return self._count


class RejectionReader:
    """Feeds a RecentRejections from the dead-letter topic for as long as the API runs. `state`:
    "starting", "catching up" (reading the window back, the answers still incomplete), "live", or
    "unavailable" (Kafka not answering: the answers are what was kept so far)."""

    def __init__(
        self, stack: StackSettings, recent: RecentRejections, *, window_s: float, replay_records: int = 100_000
    ) -> None:
        self._stack = stack
        self.recent = recent
        self.window_s = window_s
        self._replay_records = replay_records
        self._task: asyncio.Task[None] | None = None
        self._next: dict[TopicPartition, int] = {}  # the next offset to read: a reconnect resumes there
        self._ends: dict[TopicPartition, int] = {}  # where each partition ended when reading began
        self.state = "starting"
        self._reader = TopicReader(
            stack, DEADLETTER_TOPIC, place=self._position, take=self._take_batches, lost=self._lost
        )

    async def start(self) -> None:
        self._task = asyncio.create_task(self._reader.run(), name="rejections")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _position(self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> None:
        """Seek each partition where reading resumes (a reconnect), or `window_s` back but at most
        `replay_records` before its end; note the ends, which mark being caught up."""
        self._ends = await consumer.end_offsets(list(partitions))
        since_ms = int((time.time() - self.window_s) * 1000)
        found = await consumer.offsets_for_times(dict.fromkeys(partitions, since_ms))
        for partition in partitions:
            at = found.get(partition)
            end = self._ends[partition]
            start = end if at is None else max(at.offset, end - self._replay_records)
            # Noted now, so a partition with nothing in the window counts as caught up at once.
            consumer.seek(partition, self._next.setdefault(partition, start))
        if self.state != "live":
            self.state = "catching up"

    def _take_batches(self, batches: Batches) -> None:
        for partition, records in batches.items():
            for record in records:
                self._take(record.value)
            self._next[partition] = records[-1].offset + 1
        if self.state != "live" and all(self._next.get(p, 0) >= end for p, end in self._ends.items()):
            self.state = "live"

    def _lost(self) -> None:
        self.state = "unavailable"

    def _take(self, value: bytes | None) -> None:
        try:
            letter = orjson.loads(value or b"")
            if isinstance(letter, dict):
                self.recent.add(letter)
        except Exception:  # noqa: BLE001 - only the gateway writes here, but one bad record must not stop the rest
            log.warning("rejections: skipped a dead letter that does not decode")
