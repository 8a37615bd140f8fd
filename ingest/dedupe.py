"""Remember recently accepted readings to flag duplicates, in bounded memory.

Two generations of hashed keys: when the young one fills, it becomes the old one and the old one
is dropped. So the memory holds between `capacity / 2` and `capacity` of the latest keys, with
O(1) work per reading. A duplicate older than that window still reaches Kafka, and the database
stores it once (its primary key); this check is for the integrator's feedback, not for safety.
"""

from __future__ import annotations

from kota.contract import Reading


class RecentReadings:
    """The readings accepted lately, to refuse one sent again (a device's retry after a lost PUBACK).

    Two generations of hashes: when the young one is full it becomes the old one, so memory is
    bounded by `capacity` and a reading is remembered for at least half of it."""

    def __init__(self, capacity: int = 400_000) -> None:
        if capacity < 2:
            raise ValueError("capacity must be at least 2")
        self._half = capacity // 2
        self._young: set[int] = set()
        self._old: set[int] = set()

    def seen_before(self, device_id: str, metric: str, ts_ms: int) -> bool:
        """True if this (device, metric, time) was seen recently; otherwise remember it."""
        key = hash((device_id, metric, ts_ms))
        if key in self._young or key in self._old:
            return True
        if len(self._young) >= self._half:
            self._old, self._young = self._young, set()
        self._young.add(key)
        return False

    def split_new(self, readings: list[Reading]) -> tuple[list[Reading], list[Reading]]:
        """(new readings, duplicates), remembering the new ones. One call per message: the hot path."""
        new: list[Reading] = []
        duplicates: list[Reading] = []
        young, old, half = self._young, self._old, self._half
        for reading in readings:
            key = hash((reading.device_id, reading.metric, reading.ts_ms))
            if key in young or key in old:
                duplicates.append(reading)
                continue
            if len(young) >= half:
                self._old, old = young, young
                self._young = young = set()
            young.add(key)
            new.append(reading)
        return new, duplicates
