"""The ingest gateway against the real stack: duplicates, metrics, and no loss through faults.

The fault test streams 100,000 readings (1,000 gateway messages of 100 readings) and kills the
gateway with -9 in the middle. Every reading must reach Kafka; duplicates are allowed there (the
processor stores each once) and reported. Restarts of Mosquitto and Kafka, and kill -9 of each
component, are in tests/test_faults.py, checked end to end against the database (these tests once
had Kafka-level copies of the broker restarts too: 90 s of the suite for what test_faults proves).
"""

import asyncio
import json
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from deploy import procs
from deploy import stack as local
from kota.contract import gateway_telemetry_topic
from tests.helpers import mqtt_client, provision, provision_gateway, publish, stored_readings, unique_id, wait_for
from tests.kafka_counts import end_offsets, readings_in_kafka
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
    for name in ("kota_gateway_messages_in_total", "kota_gateway_readings_out_total", "kota_gateway_queue_depth",
                 "kota_gateway_kafka_send_seconds_count"):
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


# -- faults ------------------------------------------------------------------------------------
DEVICES = 10
MESSAGES = 1000
STEPS_PER_MESSAGE = 10  # 10 devices x 10 timestamps = 100 readings per message


def stream_with_fault(stack, fault: Callable[[], None]) -> None:
    gateway = provision_gateway(stack)
    devices = [provision(stack, "water_level", gateway_id=gateway.gateway_id) for _ in range(DEVICES)]
    start = int(time.time() * 1000) - 6 * 3_600_000
    topic_ends = end_offsets(stack)  # the topic outlives test runs: count only what this one adds
    expected = {(d.device_id, "currentLevel", start + step * 1000)
                for d in devices for step in range(MESSAGES * STEPS_PER_MESSAGE)}
    # A persistent session: paho re-sends what the broker had not acknowledged when it went away.
    client = mqtt_client(stack, gateway.gateway_id, client_id=unique_id("stream"), clean_session=False)
    topic = gateway_telemetry_topic(gateway.city, gateway.gateway_id)
    mids: list[int] = []
    acknowledged: set[int] = set()
    half_way = threading.Event()
    # A publish made while the broker is away returns "not connected" but stays queued in paho
    # and goes out on reconnect; the broker's acknowledgement is what counts.
    client.on_publish = lambda _c, _u, mid, _rc, _p: acknowledged.add(mid)

    def stream() -> None:
        for m in range(MESSAGES):
            steps = range(m * STEPS_PER_MESSAGE, (m + 1) * STEPS_PER_MESSAGE)
            body = {d.device_id: [{"ts": start + s * 1000, "values": {"currentLevel": float(s % 700)}} for s in steps]
                    for d in devices}
            mids.append(client.publish(topic, json.dumps(body), qos=1).mid)
            if m == MESSAGES // 3:
                half_way.set()
            time.sleep(0.004)

    publisher = threading.Thread(target=stream)
    publisher.start()
    assert half_way.wait(60)
    fault()
    publisher.join()
    wait_for(lambda: acknowledged >= set(mids), timeout_s=120, what="the broker to acknowledge every message")
    client.disconnect()

    ids = {d.device_id for d in devices}
    def all_in_kafka():
        counts = readings_in_kafka(stack, ids, since=topic_ends)
        return counts if set(counts) >= expected else None

    try:
        counts = wait_for(all_in_kafka, timeout_s=120, what="every reading in Kafka")
    except AssertionError:
        missing = expected - set(readings_in_kafka(stack, ids, since=topic_ends))
        ts_missing = sorted({ts for _, _, ts in missing})
        raise AssertionError(f"{len(missing)} of {len(expected)} acknowledged readings never reached Kafka; "
                             f"their times span {ts_missing[0]}..{ts_missing[-1]} ms "
                             f"(stream start {start})") from None
    assert set(counts) == expected
    duplicates = sum(counts.values()) - len(counts)
    print(f"{len(expected)} readings in Kafka, {duplicates} duplicates there (the processor stores each once)")


def test_kill_minus_9_of_the_gateway_mid_stream_loses_nothing(pipeline):
    def kill_and_restart() -> None:
        assert procs.stop(pipeline, "gateway", hard=True)
        time.sleep(1.0)
        local.start_component(pipeline, "gateway")

    stream_with_fault(pipeline, kill_and_restart)
