"""Injected anomalies and their ground truth.

A plan is drawn from the seed for a span of simulated time: point anomalies on single sensors
(spike, level shift, stuck, drift, dropout) and three city events that touch several devices (a
flood wave rising across the gates upstream to downstream, a pollution episode across a district,
a water leak showing as night-time flow). `apply` bends a device's clean values by the plan; the
plan itself, written as JSON, is the labels file `kota score` compares detections with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kota.registry import Device
from simulators.city import SIAGA3_CM, SimulatedCity, rain_over_siaga

HOUR_MS = 3_600_000

# The metric each device type's single-sensor anomalies bend, and how far (in its unit): about
# ten times its noise and more than its daily swing, so a fair detector can see it.
TARGET: dict[str, tuple[str, float]] = {
    "air_quality": ("pm25", 90.0),
    "noise": ("LAeq", 25.0),
    "water_level": ("currentLevel", 45.0),
    "traffic_corridor": ("averageVehicleSpeed", -35.0),
    "water_meter": ("pressure", -1.5),
    "electricity_meter": ("activePower", 150.0),
    "street_light": ("powerConsumption", 200.0),
}
POINT_KINDS = ("spike", "level_shift", "stuck", "drift", "dropout")
# How long each point anomaly lasts (a spike is one reading: its window is the reading's tick).
DURATION_MS = {"level_shift": 3 * HOUR_MS, "stuck": 2 * HOUR_MS, "drift": 6 * HOUR_MS, "dropout": HOUR_MS}
LEAK_MS = 30 * HOUR_MS
DAY_MS = 24 * HOUR_MS
FLOOD_LAG_MS = 20 * 60_000  # the wave reaches each next gate downstream this much later


@dataclass(frozen=True)
class Anomaly:
    """One injected anomaly: what, where and when (event time, epoch ms, end exclusive)."""

    kind: str
    devices: tuple[str, ...]
    metric: str | None  # None: every metric of the devices (a dropout)
    start_ms: int
    end_ms: int
    magnitude: float = 0.0
    # per-device start offsets, for events that travel (the flood wave)
    offsets_ms: dict[str, int] = field(default_factory=dict)

    def window(self, device_id: str) -> tuple[int, int]:
        offset = self.offsets_ms.get(device_id, 0)
        return self.start_ms + offset, self.end_ms + offset


def plan(
    city: SimulatedCity, start_ms: int, end_ms: int, interval_ms: int, per_day: int | None = None
) -> list[Anomaly]:
    """Anomalies for [start_ms, end_ms): none in the first two hours (detectors learn a baseline
    first), none overlapping on one device, and the city events once a day each where the city has
    the devices for them."""
    rng = np.random.default_rng([city.seed, 0x414E4F4D])  # "ANOM"
    span = end_ms - start_ms
    days = max(1.0, span / (24 * HOUR_MS))
    quiet_until = start_ms + 2 * HOUR_MS
    busy: dict[str, list[tuple[int, int]]] = {}
    planned: list[Anomaly] = []

    def free(device_id: str, first: int, last: int, gap_ms: int = HOUR_MS) -> bool:
        # a gap of an hour each side keeps one anomaly from hiding in another's recovery
        return all(last + gap_ms <= a or first >= b + gap_ms for a, b in busy.get(device_id, []))

    def book(anomaly: Anomaly) -> None:
        for device_id in anomaly.devices:
            busy.setdefault(device_id, []).append(anomaly.window(device_id))
        planned.append(anomaly)

    def tick_at(ms: float) -> int:  # anomalies start on the simulator's ticks
        return start_ms + int((ms - start_ms) // interval_ms) * interval_ms

    by_type: dict[str, list[Device]] = {}
    for device in city.devices:
        by_type.setdefault(device.device_type, []).append(device)

    def start_between(earliest: float, latest: float) -> int | None:
        earliest = max(earliest, quiet_until)
        return tick_at(rng.uniform(earliest, latest)) if latest >= earliest else None

    # City events first: they need several devices free at once. Each fits inside the span.
    for day in range(int(days)):
        day_start = start_ms + day * 24 * HOUR_MS
        day_end = min(end_ms, day_start + 24 * HOUR_MS)
        gates = sorted(by_type.get("water_level", []), key=lambda d: -(d.lat or 0))  # upstream is north
        travel = (len(gates) - 1) * FLOOD_LAG_MS
        first = start_between(day_start + 3 * HOUR_MS, day_end - 5 * HOUR_MS - travel)
        if len(gates) >= 2 and first is not None:
            offsets = {g.device_id: i * FLOOD_LAG_MS for i, g in enumerate(gates)}
            book(Anomaly("flood_wave", tuple(offsets), "currentLevel", first, first + 5 * HOUR_MS, 170.0, offsets))
        stations = by_type.get("air_quality", [])
        first = start_between(day_start + 3 * HOUR_MS, day_end - 3 * HOUR_MS)
        if stations and first is not None:
            district = stations[int(rng.integers(len(stations)))].district
            in_district = tuple(d.device_id for d in stations if d.district == district)
            if all(free(d, first, first + 3 * HOUR_MS) for d in in_district):
                book(Anomaly("pollution_episode", in_district, "pm25", first, first + 3 * HOUR_MS, 140.0))
        # A leak runs until it is repaired: here LEAK_MS, so every one spans a whole night (01-04
        # local), the hours the minimum-night-flow rule judges. That rule compares a night with a
        # meter's earlier nights and wants two of them, so leaks begin from the third day.
        meters = by_type.get("water_meter", [])
        first = start_between(max(day_start, start_ms + 2 * DAY_MS) + 2 * HOUR_MS, day_end)
        if meters and first is not None and first + LEAK_MS <= end_ms:
            meter = meters[int(rng.integers(len(meters)))]
            last = first + LEAK_MS
            # A day each side: a repair shows in the flow only as a night back to its usual minimum,
            # so a meter's next leak must leave it one (two leaks with no night between are one leak
            # to the meter, and to any method that reads it).
            if free(meter.device_id, first, last, DAY_MS):
                book(Anomaly("leak", (meter.device_id,), "waterConsumption", first, last, 1.5))

    count = per_day if per_day is not None else max(6, len(city.devices) // 6)
    for _ in range(int(count * days)):
        device = city.devices[int(rng.integers(len(city.devices)))]
        kind = POINT_KINDS[int(rng.integers(len(POINT_KINDS)))]
        metric, size = TARGET[device.device_type]
        first = tick_at(rng.uniform(quiet_until, end_ms))
        last = first + DURATION_MS.get(kind, interval_ms)
        if last > end_ms or not free(device.device_id, first, last):
            continue  # a crowded plan gets fewer anomalies, never overlapping ones
        book(Anomaly(kind, (device.device_id,), None if kind == "dropout" else metric, first, last, size))
    return sorted(planned, key=lambda a: (a.start_ms, a.kind, a.devices))


class Injector:
    """Bends clean values by a plan, tick by tick. Remembers what a stuck sensor froze at."""

    def __init__(self, anomalies: list[Anomaly]) -> None:
        self._by_device: dict[str, list[Anomaly]] = {}
        for anomaly in anomalies:
            for device_id in anomaly.devices:
                self._by_device.setdefault(device_id, []).append(anomaly)
        self._frozen: dict[tuple[int, str], float] = {}

    def apply(self, device: Device, ts_ms: int, values: dict[str, float]) -> dict[str, float] | None:
        """The values the device reports at this time, or None when it is silent."""
        for anomaly in self._by_device.get(device.device_id, ()):
            first, last = anomaly.window(device.device_id)
            if not first <= ts_ms < last:
                continue
            if anomaly.kind == "dropout":
                return None
            metric = anomaly.metric
            assert metric is not None
            value = values[metric]
            progress = (ts_ms - first) / max(last - first, 1)
            if anomaly.kind in ("spike", "level_shift"):
                value += anomaly.magnitude
            elif anomaly.kind == "stuck":
                value = self._frozen.setdefault((id(anomaly), device.device_id), value)
            elif anomaly.kind == "drift":
                value += anomaly.magnitude * progress
            elif anomaly.kind in ("flood_wave", "pollution_episode"):
                # up over the first third, down over the rest: a wave, not a step
                shape = progress * 3 if progress < 1 / 3 else 1.5 * (1 - progress)
                value += anomaly.magnitude * shape
                if anomaly.kind == "pollution_episode" and "pm10" in values:
                    values = {**values, "pm10": values["pm10"] + 1.6 * anomaly.magnitude * shape}
            elif anomaly.kind == "leak":
                value += anomaly.magnitude  # a steady flow that never stops, night included
            values = {**values, metric: max(value, 0.0)}
        return values


def weather_labels(city: SimulatedCity, start_ms: int, end_ms: int, interval_ms: int) -> list[dict[str, object]]:
    """Conditions of the simulated weather an operator must be told about, labelled like anomalies:
    each gate while a shower holds its water over Siaga 3 (`rain_over_siaga`). Without them a
    scorecard would count the Siaga alerts that rain raises, which are right, as false alarms."""
    gates = [d.device_id for d in city.devices if d.device_type == "water_level"]
    return [
        {
            "kind": "rain_over_siaga",
            "device_id": gate,
            "metric": "currentLevel",
            "start_ms": first,
            "end_ms": last,
            "magnitude": SIAGA3_CM,
        }
        for first, last in rain_over_siaga(city.seed, start_ms, end_ms, interval_ms)
        for gate in gates
    ]


def label_entries(anomalies: list[Anomaly]) -> list[dict[str, object]]:
    """The ground truth: one entry per anomaly per device, with its event-time window."""
    labels: list[dict[str, object]] = []
    for anomaly in anomalies:
        for device_id in anomaly.devices:
            first, last = anomaly.window(device_id)
            labels.append(
                {
                    "kind": anomaly.kind,
                    "device_id": device_id,
                    "metric": anomaly.metric,
                    "start_ms": first,
                    "end_ms": last,
                    "magnitude": anomaly.magnitude,
                }
            )
    return labels


def write_labels(
    path: Path,
    *,
    city: str,
    seed: int | None,
    start_ms: int,
    end_ms: int,
    interval_ms: int | None,
    labels: list[dict[str, object]],
) -> None:
    """A labels file, as `kota score` reads it: the simulator's, or a NAB replay's windows."""
    document = {
        "city": city,
        "seed": seed,
        "start_ms": start_ms,
        "end_ms": end_ms,
        "interval_ms": interval_ms,
        "labels": labels,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")


def read_labels(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document
