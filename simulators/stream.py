"""The simulated city's MQTT messages, tick by tick, in the three forms integrators use.

Each device speaks one form, fixed by its place in the city: a gateway batch (JSON keyed by device
id), gateway SenML (names `{device}/{metric}`), or single messages on the device's own topic with
its own credentials. A tick's randomness comes from (seed, tick number) alone, so the same seed
and start time give the same messages byte for byte, however the run is paced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from kota.contract import device_telemetry_topic, gateway_telemetry_topic
from kota.registry import Device
from simulators.anomalies import Injector
from simulators.city import SimulatedCity, values_at
from simulators.commands import DeviceCommands

FORMS = ("batch", "senml", "single")
MISSING_SHARE = 0.005  # a reading now and then simply does not arrive


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    sender: str  # the MQTT account that publishes it: the gateway or the device itself
    readings: int  # values carried, for the run's log and the exact counts tests check


def device_forms(city: SimulatedCity, forms: tuple[str, ...], single_devices: int) -> dict[str, str]:
    """Which form each device speaks: round-robin over `forms`, with at most `single_devices`
    speaking for themselves (each is an MQTT connection of its own)."""
    assigned: dict[str, str] = {}
    singles = 0
    for i, device in enumerate(city.devices):
        form = forms[i % len(forms)]
        if form == "single":
            if singles >= single_devices:
                form = next((f for f in forms if f != "single"), "batch")
            else:
                singles += 1
        assigned[device.device_id] = form
    return assigned


def _round(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in values.items()}


class CityStream:
    """The city's MQTT messages tick by tick, with the injected anomalies, in each device's form."""

    def __init__(
        self,
        city: SimulatedCity,
        injector: Injector,
        forms: dict[str, str],
        devices_per_message: int = 100,
        commands: DeviceCommands | None = None,
    ) -> None:
        self.city, self._injector, self._forms = city, injector, forms
        self._per_message = devices_per_message
        self.commands = commands  # what the devices were told to do (simulators/commands.py)

    def tick(self, tick: int, ts_ms: int) -> list[Message]:
        rng = np.random.default_rng([self.city.seed, tick])
        batch: list[tuple[Device, dict[str, float]]] = []
        senml: list[tuple[Device, dict[str, float]]] = []
        messages: list[Message] = []
        for device in self.city.devices:
            clean = values_at(device, ts_ms, rng, self.city.seed)
            missing = rng.random() < MISSING_SHARE
            values = self._injector.apply(device, ts_ms, clean)
            if values is not None and self.commands is not None:
                values = self.commands.adjust(device, ts_ms, values)
            if values is None or missing:
                continue
            values = _round(values)
            form = self._forms[device.device_id]
            if form == "single":
                body = json.dumps({"ts": ts_ms, "values": values}, separators=(",", ":")).encode()
                messages.append(
                    Message(
                        device_telemetry_topic(self.city.city, device.domain, device.device_id),
                        body,
                        device.device_id,
                        len(values),
                    )
                )
            else:
                (senml if form == "senml" else batch).append((device, values))
        gateway = self.city.gateway_id
        for first in range(0, len(batch), self._per_message):
            chunk = batch[first : first + self._per_message]
            batch_body = json.dumps({d.device_id: {"ts": ts_ms, "values": v} for d, v in chunk}, separators=(",", ":"))
            messages.append(
                Message(
                    gateway_telemetry_topic(self.city.city, gateway),
                    batch_body.encode(),
                    gateway,
                    sum(len(v) for _, v in chunk),
                )
            )
        for first in range(0, len(senml), self._per_message):
            chunk = senml[first : first + self._per_message]
            records: list[dict[str, object]] = []
            for device, values in chunk:
                spec = device.metrics
                records += [{"n": f"{device.device_id}/{m}", "u": spec[m].unit, "v": v} for m, v in values.items()]
            records[0] = {"bt": ts_ms / 1000, **records[0]}  # base time on the first record, as RFC 8428 does
            messages.append(
                Message(
                    gateway_telemetry_topic(self.city.city, gateway, "senml"),
                    json.dumps(records, separators=(",", ":")).encode(),
                    gateway,
                    sum(len(v) for _, v in chunk),
                )
            )
        return messages
