"""Publish a simulated city over MQTT, one message per device per tick, QoS 1."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from kota.contract import device_telemetry_topic
from simulators.city import SimulatedCity, values_at

log = logging.getLogger("kota.simulator")


def connect(port: int, client_id: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(200)
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    return client


def run(city: SimulatedCity, *, port: int, interval_s: float, stop: threading.Event,
        max_ticks: int | None = None) -> int:
    """Publish until `stop` is set (or `max_ticks` ticks); return the number of messages sent."""
    rng = np.random.default_rng(city.seed)
    client = connect(port, f"kota-simulator-{city.city}")
    sent = 0
    tick = 0
    try:
        while not stop.is_set() and (max_ticks is None or tick < max_ticks):
            started = time.monotonic()
            ts_ms = time.time_ns() // 1_000_000
            for device in city.devices:
                body = {"ts": ts_ms, "values": {k: round(v, 3) for k, v in values_at(device, ts_ms, rng).items()}}
                topic = device_telemetry_topic(device.city, device.domain, device.device_id)
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
