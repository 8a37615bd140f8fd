"""The ingest gateway against the real stack: duplicates, metrics, and registry changes.

Faults (kill -9 of the gateway, restarts of Mosquitto and Kafka) are in tests/test_faults.py, checked
end to end against the database and a clean run. This file once had Kafka-level copies of them (every
acknowledged reading in Kafka, duplicates counted): about 130 s of the suite for less than test_faults
proves.
"""

import asyncio
import time

import httpx
import pytest

from kota.contract import gateway_telemetry_topic
from tests.helpers import mqtt_client, provision, provision_gateway, publish, stored_readings, wait_for
from tests.test_end_to_end import _dead_letters_for

pytestmark = pytest.mark.stack


def test_a_repeated_reading_is_dead_lettered_as_duplicate_and_stored_once(pipeline):
    device = provision(pipeline, "noise")
    payload = {"ts": int(time.time() * 1000) - 1000, "values": {"LAeq": 57.0}}
    client = mqtt_client(pipeline, device.device_id)
    try:
        publish(client, device, payload)
        publish(client, device, payload)
    finally:
        client.disconnect()
    topic = f"kota/{device.city}/{device.domain}/{device.device_id}/telemetry"
    letters = asyncio.run(_dead_letters_for(pipeline, topic, expected=1))
    assert [letter["reason"] for letter in letters] == ["duplicate"]
    assert [(m, v) for _, m, v in wait_for(lambda: stored_readings(pipeline, device.device_id))] == [("LAeq", 57.0)]


def test_gateway_metrics_count_messages_readings_and_rejections_by_reason(pipeline):
    device = provision(pipeline, "noise")
    client = mqtt_client(pipeline, device.device_id)
    try:
        publish(client, device, {"LAeq": 1000})
    finally:
        client.disconnect()
    url = f"http://127.0.0.1:{pipeline.gateway_metrics_port}/metrics"

    def metrics_with_the_rejection() -> str | None:
        text = httpx.get(url).text
        return text if 'kota_gateway_rejected_total{reason="out_of_range"}' in text else None

    text = wait_for(metrics_with_the_rejection, what="the out_of_range counter")
    for name in (
        "kota_gateway_messages_in_total",
        "kota_gateway_readings_out_total",
        "kota_gateway_queue_depth",
        "kota_gateway_kafka_send_seconds_count",
    ):
        assert name in text


def test_a_device_added_behind_a_known_gateway_is_accepted_at_once(pipeline):
    """The gateway's registry is read when a message names an unknown sender. A device added behind
    a gateway it already knows must not be refused as unknown in the moment before the next read."""
    gateway = provision_gateway(pipeline)
    first = provision(pipeline, "noise", gateway_id=gateway.gateway_id)
    client = mqtt_client(pipeline, gateway.gateway_id)
    topic = gateway_telemetry_topic(gateway.city, gateway.gateway_id)
    now = int(time.time() * 1000)
    try:
        publish(client, first, {first.device_id: [{"ts": now - 2000, "values": {"LAeq": 51.0}}]}, topic=topic)
        wait_for(lambda: stored_readings(pipeline, first.device_id), what="the known gateway's first reading")
        second = provision(pipeline, "noise", gateway_id=gateway.gateway_id)
        publish(client, second, {second.device_id: [{"ts": now - 1000, "values": {"LAeq": 52.0}}]}, topic=topic)
    finally:
        client.disconnect()
    assert [(m, v) for _, m, v in wait_for(lambda: stored_readings(pipeline, second.device_id))] == [("LAeq", 52.0)]
