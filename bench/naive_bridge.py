"""The baseline for bench/ingest.py: an MQTT → Kafka bridge as one would first write it.

Same parsing as the real gateway, but each message is produced and awaited on its own before it
is acknowledged: one Kafka round trip per message.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import time
from collections import defaultdict

import paho.mqtt.client as mqtt
import psycopg
from aiokafka import AIOKafkaProducer
from paho.mqtt.enums import CallbackAPIVersion

from ingest.parse import ParseLimits, parse_message
from kota.contract import MQTT_INGEST_FILTER, READINGS_TOPIC, encode_device_batch
from kota.registry import load_devices, load_gateways
from kota.settings import StackSettings

CLIENT_ID = "kota-naive-bridge"


async def main() -> None:
    stack = StackSettings()
    with psycopg.connect(stack.postgres_dsn) as conn:
        devices, gateways = load_devices(conn), load_gateways(conn)
    inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=CLIENT_ID, clean_session=False, manual_ack=True)
    client.username_pw_set("kota-ingest", os.environ["KOTA_GATEWAY_MQTT_PASSWORD"])
    client.on_connect = lambda c, *_: c.subscribe(MQTT_INGEST_FILTER, qos=1)
    client.on_message = lambda _c, _u, m: inbox.put(m)
    producer = AIOKafkaProducer(**stack.kafka_client_options(), acks="all", enable_idempotence=True)
    await producer.start()
    client.connect("127.0.0.1", stack.mqtt_ingest_port)
    client.loop_start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        try:
            msg = await asyncio.to_thread(inbox.get, True, 0.2)
        except queue.Empty:
            continue
        result = parse_message(
            msg.topic,
            msg.payload,
            devices=devices,
            gateways=gateways,
            received_ms=time.time_ns() // 1_000_000,
            limits=ParseLimits(),
        )
        by_device = defaultdict(list)
        for reading in result.readings:
            by_device[reading.device_id].append(reading)
        for device_id, readings in by_device.items():
            await producer.send_and_wait(READINGS_TOPIC, encode_device_batch(readings), key=device_id.encode())
        client.ack(msg.mid, msg.qos)
    client.loop_stop()
    await producer.stop()


if __name__ == "__main__":
    asyncio.run(main())
