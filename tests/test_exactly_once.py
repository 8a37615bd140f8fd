"""Nothing lost, nothing doubled: kill -9 of the processor mid-stream, and duplicates on Kafka."""

import asyncio
import threading
import time

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from deploy import components, procs
from kota.contract import READINGS_TOPIC, Reading, encode_device_batch
from tests.helpers import (
    minute_aggregates_from_readings,
    mqtt_client,
    provision,
    publish,
    query,
    stored_minute_aggregates,
    stored_readings,
    wait_for,
)

pytestmark = pytest.mark.stack

MESSAGES = 400
PER_MESSAGE = 10


def test_processor_kill_minus_9_mid_stream_loses_and_doubles_nothing(pipeline):
    gate = provision(pipeline, "water_level")
    start = int(time.time() * 1000) - 3 * 3_600_000  # 4,000 one-second readings end well before now
    expected = [(start + i * 1000, "currentLevel", float(i % 500)) for i in range(MESSAGES * PER_MESSAGE)]
    done = threading.Event()
    killed = threading.Event()

    def stream() -> None:
        client = mqtt_client(pipeline, gate.device_id)
        try:
            for m in range(MESSAGES):
                if m == MESSAGES // 2:
                    # Half the stream comes after the kill, however fast the processor kept up with the first half.
                    killed.wait(timeout=120)
                chunk = expected[m * PER_MESSAGE : (m + 1) * PER_MESSAGE]
                publish(client, gate, [{"ts": ts, "values": {"currentLevel": v}} for ts, _, v in chunk])
                time.sleep(0.01)
        finally:
            client.disconnect()
            done.set()

    partitions = list(range(pipeline.kafka_partitions))
    partition = DefaultPartitioner()(gate.device_id.encode(), partitions, partitions)  # the gateway's choice
    publisher = threading.Thread(target=stream)
    publisher.start()
    try:
        wait_for(lambda: len(stored_readings(pipeline, gate.device_id)) > 200, what="the first readings")
        assert procs.stop(pipeline, "processor", hard=True), "processor was not running"
        killed.set()
        stored_at_kill = len(stored_readings(pipeline, gate.device_id))
        offset_at_kill = _stored_offset(pipeline, partition)
        time.sleep(1.0)  # the stream goes on while the processor is dead
        components.start_component(pipeline, "processor")
    finally:
        publisher.join(timeout=120)
    assert done.is_set()
    assert stored_at_kill < len(expected), "the kill came too late to prove anything"
    wait_for(
        lambda: len(stored_readings(pipeline, gate.device_id)) >= len(expected),
        timeout_s=60,
        what="every reading after the restart",
    )
    time.sleep(1.0)  # would a replay add doubles?
    assert stored_readings(pipeline, gate.device_id) == expected
    # The one-minute aggregates equal a clean aggregation of what is stored: nothing merged twice.
    aggregates = stored_minute_aggregates(pipeline, gate.device_id)
    assert aggregates == minute_aggregates_from_readings(pipeline, gate.device_id)
    assert sum(row[2] for row in aggregates) == len(expected)
    # The restarted processor re-read the gate's partition from its older detector checkpoint, and
    # checkpoints again as soon as it is past where it was killed, not a whole checkpoint interval
    # (30 s) later: restarted more often than that, it would re-read more on every start.
    wait_for(
        lambda: _checkpoint_offset(pipeline, partition) >= offset_at_kill,
        timeout_s=15,
        what="a detector checkpoint once caught up",
    )


def _stored_offset(stack, partition: int) -> int:
    return query(
        stack,
        "SELECT next_offset FROM stream_offsets WHERE consumer_group = 'kota-processor' AND partition = %s",
        (partition,),
    )[0][0]


def _checkpoint_offset(stack, partition: int) -> int:
    rows = query(
        stack,
        "SELECT next_offset FROM detector_checkpoints WHERE consumer_group = 'kota-processor' AND partition = %s",
        (partition,),
    )
    return rows[0][0] if rows else -1


async def _send_twice(stack, readings: list[Reading]) -> None:
    producer = AIOKafkaProducer(**stack.kafka_client_options(), acks="all")
    await producer.start()
    try:
        for _ in range(2):  # what a gateway retry after a lost acknowledgement looks like
            await producer.send_and_wait(
                READINGS_TOPIC, encode_device_batch(readings), key=readings[0].device_id.encode()
            )
    finally:
        await producer.stop()


def test_a_reading_twice_on_kafka_is_stored_once(pipeline):
    meter = provision(pipeline, "water_meter")
    now = int(time.time() * 1000)
    readings = [Reading(now, meter.city, meter.domain, meter.device_id, "pressure", 3.1, "bar", now, "test")]
    asyncio.run(_send_twice(pipeline, readings))
    wait_for(lambda: stored_readings(pipeline, meter.device_id), what="the reading")
    time.sleep(1.0)
    assert stored_readings(pipeline, meter.device_id) == [(now, "pressure", 3.1)]
    [aggregate] = stored_minute_aggregates(pipeline, meter.device_id)
    assert aggregate[2] == 1  # counted once


def test_minute_aggregates_merge_out_of_order_arrivals(pipeline):
    gate = provision(pipeline, "water_level")
    minute = (int(time.time() * 1000) // 60_000 - 5) * 60_000
    client = mqtt_client(pipeline, gate.device_id)
    try:  # one minute's readings, newest first, in three messages
        publish(client, gate, {"ts": minute + 50_000, "values": {"currentLevel": 70.0}})
        publish(client, gate, {"ts": minute + 10_000, "values": {"currentLevel": 40.0}})
        publish(
            client,
            gate,
            [
                {"ts": minute + 30_000, "values": {"currentLevel": 90.0}},
                {"ts": minute + 70_000, "values": {"currentLevel": 10.0}},
            ],
        )  # next minute
    finally:
        client.disconnect()
    wait_for(lambda: len(stored_readings(pipeline, gate.device_id)) == 4, what="four readings")
    first, second = stored_minute_aggregates(pipeline, gate.device_id)
    _, bucket, n, total, sum_sq, low, high, first_ts, first_value, last_ts, last_value = first
    assert (n, total, sum_sq, low, high, first_value, last_value) == (3, 200.0, 14600.0, 40.0, 90.0, 40.0, 70.0)
    assert int(bucket.timestamp() * 1000) == minute
    assert int(first_ts.timestamp() * 1000) == minute + 10_000 and int(last_ts.timestamp() * 1000) == minute + 50_000
    assert second[2:4] == (1, 10.0)
    assert stored_minute_aggregates(pipeline, gate.device_id) == minute_aggregates_from_readings(
        pipeline, gate.device_id
    )
