"""Publish a simulated city over MQTT as its gateway would: one connection, batches of devices, QoS 1."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np

from kota.contract import gateway_telemetry_topic
from kota.mqtt import MqttLogin, connect
from simulators.city import SimulatedCity, values_at

log = logging.getLogger("kota.simulator")


def run(city: SimulatedCity, *, login: MqttLogin, gateway_id: str, interval_s: float, stop: threading.Event,
        max_ticks: int | None = None, devices_per_message: int = 100) -> int:
    """Publish every device's values each tick until `stop` is set (or `max_ticks`); return messages sent."""
    rng = np.random.default_rng(city.seed)
    client = connect(login, f"kota-simulator-{city.city}")
    topic = gateway_telemetry_topic(city.city, gateway_id)
    sent = 0
    tick = 0
    try:
        while not stop.is_set() and (max_ticks is None or tick < max_ticks):
            started = time.monotonic()
            ts_ms = time.time_ns() // 1_000_000
            for first in range(0, len(city.devices), devices_per_message):
                chunk = city.devices[first:first + devices_per_message]
                body = {d.device_id: {"ts": ts_ms, "values": {k: round(v, 3) for k, v in
                                                             values_at(d, ts_ms, rng).items()}} for d in chunk}
                client.publish(topic, json.dumps(body), qos=1)
                sent += 1
            tick += 1
            if tick == 1 or tick % 60 == 0:
                log.info("tick %d: %d devices published (%d messages so far)", tick, len(city.devices), sent)
            stop.wait(max(0.0, interval_s - (time.monotonic() - started)))
    finally:
        client.loop_stop()
        client.disconnect()
    return sent
