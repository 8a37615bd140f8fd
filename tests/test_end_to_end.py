"""A real MQTT client publishes; the readings come back through the API; bad input is dead-lettered."""

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer

from kota.contract import DEADLETTER_TOPIC, decode_dead_letter, device_telemetry_topic
from tests.helpers import mqtt_client, provision, publish, stored_readings, wait_for

pytestmark = pytest.mark.stack


def test_readings_published_over_mqtt_are_served_by_the_api(pipeline, api):
    air = provision(pipeline, "air_quality", district="coblong", lat=-6.89, lon=107.61)
    gate = provision(pipeline, "water_level")
    now = int(time.time() * 1000)
    client = mqtt_client(pipeline, air.device_id)
    client2 = mqtt_client(pipeline, gate.device_id)
    try:
        publish(client, air, {"ts": now - 2000, "values": {"pm25": 20.0, "pm10": 35.0}})
        publish(client, air, {"ts": now - 1000, "values": {"pm25": 42.5, "pm10": 61.0}})
        publish(client2, gate, {"currentLevel": 154.0})
    finally:
        client.disconnect()
        client2.disconnect()

    def newest_stored() -> list[dict] | None:  # both messages: they may be stored in separate batches
        if len(stored_readings(pipeline, air.device_id)) < 4:
            return None  # ask the API only once both are stored, or it may answer the older pair
        return api.get(f"/api/v1/devices/{air.device_id}/latest").json()["values"]

    latest = wait_for(newest_stored, what="latest values of the air-quality station")
    assert {v["metric"]: v["value"] for v in latest} == {"pm25": 42.5, "pm10": 61.0}
    assert all(v["unit"] == "ug/m3" for v in latest)

    gate_latest = wait_for(
        lambda: api.get(f"/api/v1/devices/{gate.device_id}/latest").json()["values"] or None, what="latest water level"
    )
    assert [(v["metric"], v["value"], v["unit"]) for v in gate_latest] == [("currentLevel", 154.0, "cm")]

    collection = api.get("/api/v1/devices", params={"city": "testkota"}).json()
    assert collection["type"] == "FeatureCollection"
    listed = {f["id"]: f["properties"] | {"geometry": f["geometry"]} for f in collection["features"]}
    assert listed[air.device_id]["geometry"] == {"type": "Point", "coordinates": [107.61, -6.89]}
    assert listed[air.device_id]["latest"]["pm25"]["value"] == 42.5
    assert listed[air.device_id]["district"] == "coblong"
    assert listed[air.device_id]["last_seen"] is not None
    assert stored_readings(pipeline, air.device_id) == [
        (now - 2000, "pm10", 35.0),
        (now - 2000, "pm25", 20.0),
        (now - 1000, "pm10", 61.0),
        (now - 1000, "pm25", 42.5),
    ]


def test_unknown_device_answers_404(api):
    response = api.get("/api/v1/devices/no-such-device/latest")
    assert response.status_code == 404
    assert response.json()["detail"] == "device not found"


def test_a_value_postgres_cannot_store_answers_422(api):
    response = api.get("/api/v1/devices", params={"city": "bandung\x00"})
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_value"  # and no database text (tests/test_api_security.py)


def test_health_reports_each_dependency(api):
    body = api.get("/health").json()
    assert body["status"] == "ok"
    assert set(body["dependencies"]) == {"postgres", "kafka", "mqtt"}
    assert all(dep["ok"] for dep in body["dependencies"].values())


async def _dead_letters_for(stack, topic: str, expected: int, since_ms: int = 0) -> list[dict]:
    consumer = AIOKafkaConsumer(
        DEADLETTER_TOPIC, **stack.kafka_client_options(), auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    found: list[dict] = []
    try:
        deadline = time.monotonic() + 30
        while len(found) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                found += [
                    body
                    for r in records
                    if (body := decode_dead_letter(r.value))["topic"] == topic and int(body["received_ms"]) >= since_ms
                ]
    finally:
        await consumer.stop()
    return found


def test_bad_input_goes_to_the_dead_letter_topic_with_reason_and_original_bytes(pipeline):
    device = provision(pipeline, "noise")
    topic = device_telemetry_topic(device.city, device.domain, device.device_id)
    client = mqtt_client(pipeline, device.device_id)
    try:
        publish(client, device, b"{broken")
        publish(client, device, {"LAeq": 400})
        publish(client, device, {"LAeq": 55.0})  # a good one after the bad ones still flows
    finally:
        client.disconnect()
    letters = asyncio.run(_dead_letters_for(pipeline, topic, expected=2))
    assert sorted(letter["reason"] for letter in letters) == ["malformed_json", "out_of_range"]
    assert b"{broken" in [letter["payload"] for letter in letters]
    wait_for(lambda: stored_readings(pipeline, device.device_id), what="the good reading after bad ones")
    assert [(m, v) for _, m, v in stored_readings(pipeline, device.device_id)] == [("LAeq", 55.0)]
