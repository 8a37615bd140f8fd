"""Read the dead-letter topic, for integrators asking "why was my message rejected?".

A record is one rejected message (kota.contract.encode_dead_letter): every reason it was given,
counted, the first few with a message for a person, and its payload, capped."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer

from kota.contract import DEADLETTER_TOPIC, decode_dead_letter


def _matches(letter: dict[str, Any], device: str | None, since_ms: int) -> bool:
    if int(str(letter.get("received_ms", 0))) < since_ms:
        return False
    if device is None or device in str(letter["topic"]).split("/"):
        return True
    return any(device in str(r["message"]) for r in letter["rejections"])


async def read_dead_letters(
    kafka_options: dict[str, Any],
    *,
    device: str | None,
    since_ms: int,
    wait_for: str | None,
    follow: bool,
    timeout_s: float,
    show: Callable[[dict[str, Any]], None],
) -> bool:
    """Show matching dead letters; with `wait_for`, return whether one with that reason was seen in time."""
    consumer = AIOKafkaConsumer(
        DEADLETTER_TOPIC, **kafka_options, auto_offset_reset="earliest", enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    found = False
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    letter = decode_dead_letter(record.value)
                    if _matches(letter, device, since_ms):
                        show(letter)
                        found = found or wait_for in letter["reasons"]
            if wait_for and found:
                return True
            caught_up = not batch
            if not follow and caught_up and (not wait_for or time.monotonic() > deadline):
                return found if wait_for else True
    finally:
        await consumer.stop()
