"""Publish a simulated city over MQTT as its gateway would: one connection, batches of devices, QoS 1."""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from dataclasses import dataclass

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from kota.contract import gateway_telemetry_topic
from simulators.city import SimulatedCity, values_at

log = logging.getLogger("kota.simulator")


@dataclass(frozen=True)
class MqttLogin:
    port: int
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None  # TLS when set
    cert_file: str | None = None  # client certificate (mutual TLS)
    key_file: str | None = None


def connect(login: MqttLogin, client_id: str, *, timeout_s: float = 15.0, clean_session: bool = True) -> mqtt.Client:
    """Connect and wait for the broker's yes, retrying a refusal (a registry reload may be under way)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                         clean_session=clean_session)
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(200)
    client.reconnect_delay_set(1, 2)
    if login.username:
        client.username_pw_set(login.username, login.password)
    if login.ca_file:
        client.tls_set(ca_certs=login.ca_file, certfile=login.cert_file, keyfile=login.key_file,
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
    accepted = threading.Event()
    refusals: list[str] = []

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: mqtt.ReasonCode, _p: object) -> None:
        if reason.is_failure:
            refusals.append(str(reason))
        else:
            accepted.set()

    client.on_connect = on_connect
    client.connect_async("127.0.0.1", login.port, keepalive=30)
    client.loop_start()
    if not accepted.wait(timeout_s):
        client.loop_stop()
        raise ConnectionError(f"MQTT broker on port {login.port} did not accept {login.username or 'the client'}: "
                              f"{refusals[-1] if refusals else 'no answer'}")
    return client


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
