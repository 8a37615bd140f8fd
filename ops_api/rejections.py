"""A device's recent rejections, from the dead-letter topic: "why was my message refused?" over the API.

Every API process reads `kota.deadletter` without a group, as the live feed reads the readings:
from `window_s` back at start, then as the gateway writes. Each dead letter is kept under the
device or gateway that published it (its topic's sender; the broker lets an account publish only
on its own topics), the newest `per_sender` of each, for at most `senders` senders (the least
recently rejected forgotten first), each cut to what a person reads: its reasons counted, the
first few messages, and the payload's first bytes. So memory is bounded whatever devices send.
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

from aiokafka import AIOKafkaConsumer

from kota.contract import DEADLETTER_TOPIC, decode_dead_letter, parse_telemetry_topic
from kota.settings import StackSettings

log = logging.getLogger("kota.api.rejections")

KEPT_MESSAGES = 5  # of a dead letter's rejections, with their messages (all are counted)
KEPT_PAYLOAD_BYTES = 512  # the payload's first bytes, base64 (the dead letter keeps 16 KiB)


def summary(letter: dict[str, Any]) -> dict[str, Any]:
    """A decoded dead letter as the API shows it: small, and all of it text or numbers."""
    payload: bytes = letter.get("payload") or b""
    reasons = letter.get("reasons")
    return {
        "received_at": dt.datetime.fromtimestamp(int(letter.get("received_ms", 0)) / 1000, dt.UTC),
        "topic": str(letter.get("topic", "")),
        "reasons": {str(k): int(v) for k, v in reasons.items()} if isinstance(reasons, dict) else {},
        "rejections": [
            {"reason": str(r.get("reason", "")), "message": str(r.get("message", ""))}
            for r in list(letter.get("rejections") or [])[:KEPT_MESSAGES]
            if isinstance(r, dict)
        ],
        "rejections_total": int(letter.get("rejections_total", 0)),
        "payload_bytes": int(letter.get("payload_bytes", len(payload))),
        "payload_sha256": str(letter.get("payload_sha256", "")),
        "payload_start_b64": base64.b64encode(payload[:KEPT_PAYLOAD_BYTES]).decode(),
    }


class RecentRejections:
    """The newest `per_sender` dead letters of each of at most `senders` senders."""

    def __init__(self, per_sender: int = 10, senders: int = 1000) -> None:
        self.per_sender = per_sender
        self.senders = senders
        self._kept: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()

    def add(self, letter: dict[str, Any]) -> bool:
        """Keep a decoded dead letter under its sender; False if its topic names none."""
        where = parse_telemetry_topic(str(letter.get("topic", "")))
        if where is None:
            return False
        kept = self._kept.pop(where.sender_id, None) or deque(maxlen=self.per_sender)
        kept.append(summary(letter))
        self._kept[where.sender_id] = kept  # the most recently rejected last
        while len(self._kept) > self.senders:
            self._kept.popitem(last=False)
        return True

    def of(self, sender_id: str) -> list[dict[str, Any]]:
        """The sender's kept dead letters, newest first."""
        return list(reversed(self._kept.get(sender_id, ())))

    def __len__(self) -> int:
        return len(self._kept)


class RejectionReader:
    """Feeds a RecentRejections from the dead-letter topic for as long as the API runs."""

    def __init__(self, stack: StackSettings, recent: RecentRejections, *, window_s: float) -> None:
        self._stack = stack
        self.recent = recent
        self._window_s = window_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._read(), name="rejections")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _read(self) -> None:
        while True:
            consumer = AIOKafkaConsumer(
                DEADLETTER_TOPIC,
                **self._stack.kafka_client_options(),
                group_id=None,
                auto_offset_reset="latest",
                enable_auto_commit=False,
            )
            try:
                await consumer.start()
                while not consumer.assignment():  # without a group: every partition, once metadata is in
                    await asyncio.sleep(0.05)
                partitions = consumer.assignment()
                since_ms = int((time.time() - self._window_s) * 1000)
                found = await consumer.offsets_for_times(dict.fromkeys(partitions, since_ms))
                for partition in partitions:
                    at = found.get(partition)
                    if at is None:
                        await consumer.seek_to_end(partition)
                    else:
                        consumer.seek(partition, at.offset)
                while True:
                    batches = await consumer.getmany(timeout_ms=500, max_records=1000)
                    for records in batches.values():
                        for record in records:
                            self._take(record.value)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the API outlives a Kafka restart
                log.exception("rejections: Kafka reader failed; retrying in 2 s")
                await asyncio.sleep(2)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()

    def _take(self, value: bytes | None) -> None:
        try:
            self.recent.add(decode_dead_letter(value or b""))
        except Exception:  # noqa: BLE001 - only the gateway writes here, but one bad record must not stop the rest
            log.warning("rejections: skipped a dead letter that does not decode")
