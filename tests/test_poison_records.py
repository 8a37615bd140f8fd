"""One record never stops a partition: records the processor cannot decode or store become rows of
processor_dead_letters, with their offset, in the transaction that moves the partition past them."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import subprocess
import time

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from deploy import components, procs
from kota.contract import READINGS_TOPIC, WIRE_VERSION, Reading, encode_device_batch
from tests.helpers import kota_ok, provision, query, stored_readings, wait_for

pytestmark = pytest.mark.stack


def dead_letter_counts(stack) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{stack.processor_metrics_port}/metrics", timeout=5).text
    return {
        m[1]: float(m[2])
        for m in re.finditer(r'^kota_processor_dead_letters_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    }


def workers(stack) -> set[int]:
    parent = procs.running_pid(stack, "processor")
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True).stdout
    return {int(pid) for pid in out.split()}


def stored_offset(stack, partition: int) -> int:
    rows = query(
        stack,
        "SELECT next_offset FROM stream_offsets WHERE consumer_group = 'kota-processor' "
        "AND topic = %s AND partition = %s",
        (READINGS_TOPIC, partition),
    )
    return rows[0][0] if rows else -1


async def produce(stack, key: bytes, values: list[bytes]) -> list[int]:
    """As kota-admin, straight to Kafka (past every gateway check); the offsets, in order."""
    producer = AIOKafkaProducer(**stack.kafka_client_options(), acks="all")
    await producer.start()
    try:
        return [(await producer.send_and_wait(READINGS_TOPIC, value, key=key)).offset for value in values]
    finally:
        await producer.stop()


def test_bad_records_are_dead_lettered_and_the_partition_goes_on(pipeline):
    meter = provision(pipeline, "water_meter")
    now = int(time.time() * 1000)

    def good(i: int) -> bytes:
        return encode_device_batch(
            [
                Reading(
                    now - 60_000 + i * 1000,
                    meter.city,
                    meter.domain,
                    meter.device_id,
                    "pressure",
                    3.0 + i,
                    "bar",
                    now,
                    "test",
                )
            ]
        )

    def raw(ts: object, metric: str) -> bytes:
        return orjson.dumps(
            {
                "v": WIRE_VERSION,
                "city": meter.city,
                "domain": meter.domain,
                "device": meter.device_id,
                "recv": now,
                "src": "test",
                "r": [[ts, metric, 1.0, "bar"]],
            }
        )

    bad = {
        "undecodable": b"\xff not json at all",
        "time_out_of_range": raw(1e20, "pressure"),  # overflowed the day arithmetic of the readings' partitions
        # Decodes and passes every check, but too long for the readings' index: the database refuses it.
        "storage_error": raw(now, base64.b64encode(os.urandom(6000)).decode()),
    }
    values = [good(0), bad["undecodable"], good(1), bad["time_out_of_range"], good(2), bad["storage_error"], good(3)]
    partitions = list(range(pipeline.kafka_partitions))
    partition = DefaultPartitioner()(meter.device_id.encode(), partitions, partitions)
    before, pids = dead_letter_counts(pipeline), workers(pipeline)

    offsets = asyncio.run(produce(pipeline, meter.device_id.encode(), values))
    wait_for(
        lambda: stored_offset(pipeline, partition) > offsets[-1],
        timeout_s=60,
        what="the partition past the bad records",
    )

    expected = [(now - 60_000 + i * 1000, "pressure", 3.0 + i) for i in range(4)]
    assert stored_readings(pipeline, meter.device_id) == expected  # every good reading, once
    rows = query(
        pipeline,
        'SELECT "offset", reason, value_length, record_key FROM processor_dead_letters '
        'WHERE consumer_group = %s AND topic = %s AND partition = %s AND "offset" = ANY(%s) '
        'ORDER BY "offset"',
        ("kota-processor", READINGS_TOPIC, partition, offsets),
    )
    assert [(r[0], r[1]) for r in rows] == [
        (offsets[1], "undecodable"),
        (offsets[3], "time_out_of_range"),
        (offsets[5], "storage_error"),
    ]
    assert [r[2] for r in rows] == [len(values[1]), len(values[3]), len(values[5])]
    assert all(bytes(r[3]) == meter.device_id.encode() for r in rows)
    after = dead_letter_counts(pipeline)
    for reason in bad:
        assert after.get(reason, 0) - before.get(reason, 0) == 1, (reason, before, after)
    assert workers(pipeline) == pids, "a processor worker died on a bad record"

    # A restart reads the partition again from the detectors' checkpoint: nothing is written twice.
    procs.stop(pipeline, "processor")
    components.start_component(pipeline, "processor")
    later = asyncio.run(produce(pipeline, meter.device_id.encode(), [good(4)]))
    wait_for(lambda: len(stored_readings(pipeline, meter.device_id)) == 5, timeout_s=60, what="the reading after")
    assert stored_readings(pipeline, meter.device_id) == [*expected, (now - 60_000 + 4000, "pressure", 7.0)]
    assert (
        len(
            query(
                pipeline,
                'SELECT 1 FROM processor_dead_letters WHERE partition = %s AND "offset" = ANY(%s)',
                (partition, offsets),
            )
        )
        == 3
    )
    assert later[0] > offsets[-1]
    assert not any(dead_letter_counts(pipeline).values()), "the restarted processor wrote dead letters again"

    # An operator sees them with `kota deadletters --processor`.
    shown = kota_ok(pipeline, "deadletters", "--processor", "--since", "3600").splitlines()
    for offset, reason in (
        (offsets[1], "undecodable"),
        (offsets[3], "time_out_of_range"),
        (offsets[5], "storage_error"),
    ):
        assert any(f"{READINGS_TOPIC}[{partition}]@{offset}" in line and reason in line for line in shown), shown
