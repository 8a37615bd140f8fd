"""Publish a simulated city over MQTT, QoS 1, paced in one of three ways.

- live (no start time): one tick every `interval_s` of wall-clock time, stamped with the clock;
- simulated time from a start (`start_ms`): ticks `interval_ms` apart in event time, sent as fast
  as the broker acknowledges them (each connection keeps at most `max_queued` unacknowledged);
- either, capped at `rate` readings per second.

It counts what the broker acknowledged (PUBACK), not what it handed to the socket, so a test or a
fault drill knows exactly how many readings the platform owes the database.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from kota.mqtt import MqttLogin, connect
from simulators.commands import DeviceCommands
from simulators.stream import CityStream

log = logging.getLogger("kota.simulator")


@dataclass
class Sent:
    ticks: int = 0
    messages: int = 0
    readings: int = 0  # handed to the client library
    acknowledged_messages: int = 0
    acknowledged_readings: int = 0  # the broker answered PUBACK: the gateway owes these to Kafka
    first_ts_ms: int | None = None
    last_ts_ms: int | None = None


class Connection:
    """One MQTT connection with a bounded queue: publishing waits while it is full."""

    def __init__(self, login: MqttLogin, client_id: str, sent: Sent, lock: threading.Lock, max_queued: int) -> None:
        self.client = connect(login, client_id, max_queued=max_queued)
        self._sent, self._lock = sent, lock
        self._readings_by_mid: dict[int, int] = {}
        self._early: set[int] = set()
        self.client.on_publish = self._on_publish

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, _rc: object, _p: object) -> None:
        with self._lock:
            if mid in self._readings_by_mid:
                self._acknowledge(self._readings_by_mid.pop(mid))
            else:
                self._early.add(mid)  # acknowledged before publish() returned its mid

    def _acknowledge(self, readings: int) -> None:
        self._sent.acknowledged_messages += 1
        self._sent.acknowledged_readings += readings

    def publish(self, topic: str, payload: bytes, readings: int, stop: threading.Event) -> bool:
        """Hand one message to paho (counted as sent), waiting while the queue is full; False if stopped."""
        while not stop.is_set():
            # not under self._lock: paho calls on_publish holding its own lock, which publish() takes too
            info = self.client.publish(topic, payload, qos=1)
            # "Not connected" (the broker is restarting): paho keeps the message in its bounded
            # queue and sends it after reconnecting; the PUBACK is what counts, as always.
            if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                with self._lock:
                    self._sent.messages += 1
                    self._sent.readings += readings
                    if info.mid in self._early:
                        self._early.discard(info.mid)
                        self._acknowledge(readings)
                    else:
                        self._readings_by_mid[info.mid] = readings
                return True
            if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:
                raise RuntimeError(f"MQTT publish failed: {mqtt.error_string(info.rc)}")
            time.sleep(0.002)  # the broker is behind: wait for acknowledgements
        return False

    def drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._readings_by_mid and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def listen_for_commands(client: mqtt.Client, commands: DeviceCommands) -> None:
    """Subscribe to the devices' command topics now and after every reconnection (clean sessions)."""
    topics = [(topic, 1) for topic in commands.topics()]
    login_callback: Any = client.on_connect  # kota.mqtt.connect's, which says it is logged in

    def on_connect(c: mqtt.Client, userdata: object, flags: object, reason: Any, properties: object) -> None:
        if login_callback is not None:
            login_callback(c, userdata, flags, reason, properties)
        if not reason.is_failure and topics:
            c.subscribe(topics)

    client.on_connect = on_connect
    client.on_message = lambda _c, _u, message: commands.receive(message.topic, bytes(message.payload))
    if topics:
        client.subscribe(topics)


def run(
    stream: CityStream,
    *,
    logins: dict[str, MqttLogin],
    stop: threading.Event,
    interval_ms: int,
    start_ms: int | None = None,
    max_ticks: int | None = None,
    rate: float | None = None,
    max_queued: int = 1000,
    count_log: Path | None = None,
) -> Sent:
    """Publish until `stop` (or `max_ticks`); `logins` holds one login per sender (gateway or device).
    With `stream.commands`, the devices obey commands taken through the gateway's connection, and
    their replies go out after each tick's readings (simulators/commands.py)."""
    sent, lock = Sent(), threading.Lock()
    connections = {
        sender: Connection(login, f"kota-sim-{sender}", sent, lock, max_queued) for sender, login in logins.items()
    }
    commands = stream.commands
    if commands is not None:
        listen_for_commands(connections[stream.city.gateway_id].client, commands)
    began = time.monotonic()
    tick = 0
    try:
        while not stop.is_set() and (max_ticks is None or tick < max_ticks):
            tick_started = time.monotonic()
            ts_ms = start_ms + tick * interval_ms if start_ms is not None else time.time_ns() // 1_000_000
            messages = stream.tick(tick, ts_ms)
            for message in messages:
                if not connections[message.sender].publish(message.topic, message.payload, message.readings, stop):
                    break
            if commands is not None:
                for topic, payload in commands.take_replies():
                    connections[stream.city.gateway_id].publish(topic, payload, 0, stop)
            sent.ticks = tick = tick + 1
            sent.first_ts_ms = sent.first_ts_ms or ts_ms
            sent.last_ts_ms = ts_ms
            if tick == 1 or tick % 600 == 0:
                log.info(
                    "tick %d (%s): %d readings sent, %d acknowledged, %.0f readings/s",
                    tick,
                    time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts_ms / 1000 + 7 * 3600)),
                    sent.readings,
                    sent.acknowledged_readings,
                    sent.readings / max(time.monotonic() - began, 1e-9),
                )
            if rate:  # hold the average at `rate` readings/s
                stop.wait(max(0.0, began + sent.readings / rate - time.monotonic()))
            elif start_ms is None:
                stop.wait(max(0.0, interval_ms / 1000 - (time.monotonic() - tick_started)))
    finally:
        for connection in connections.values():
            connection.drain(timeout_s=30)
            connection.close()
        if count_log is not None:
            count_log.write_text(json.dumps(asdict(sent)) + "\n")
        log.info(
            "stopped after %d ticks: %d readings sent, %d acknowledged by the broker",
            sent.ticks,
            sent.readings,
            sent.acknowledged_readings,
        )
    return sent
