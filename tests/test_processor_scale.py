"""The processor at scale, against the real stack: a million readings with repeated kill -9, and two
processors sharing the partitions. Readings go straight onto the Kafka topic, as gateways write them."""

import asyncio
import os
import signal
import time

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from deploy import components, procs
from kota.contract import READINGS_TOPIC, Reading, encode_device_batch
from kota.process import alive
from ops_api.metrics import scrape
from processing.kernels import REASONS
from processing.processor import new_detectors
from processing.settings import ProcessorSettings
from tests.helpers import query, start_second_processor, unique_id, wait_for

pytestmark = pytest.mark.stack

PER_RECORD = 500


def _series(device_index: int, n: int, start_ms: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(n)
    ts = start_ms + i * 5_000
    values = 100.0 + (i * 7 + device_index) % 13 + np.where(i % 997 == 500, 400.0, 0.0)
    return ts, values


async def _produce(stack, devices: list[str], per_device: int, start_ms: int) -> None:
    producer = AIOKafkaProducer(
        **stack.kafka_client_options(), acks="all", enable_idempotence=True, linger_ms=20, max_batch_size=1 << 20
    )
    await producer.start()
    try:
        now = int(time.time() * 1000)
        pending = []
        for offset in range(0, per_device, PER_RECORD):  # device by device within each slice of time: in order
            for d, device_id in enumerate(devices):
                ts, values = _series(d, per_device, start_ms)
                readings = [
                    Reading(int(t), "scalekota", "utilities", device_id, "pressure", float(v), "bar", now, "test")
                    for t, v in zip(ts[offset : offset + PER_RECORD], values[offset : offset + PER_RECORD], strict=True)
                ]
                pending.append(
                    await producer.send(READINGS_TOPIC, encode_device_batch(readings), key=device_id.encode())
                )
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def _stored_count(stack, prefix: str) -> int:
    """Readings stored so far, from the one-minute aggregates (written in the same transaction, from
    exactly the rows added; _check_exact counts the readings themselves at the end). Polled every
    0.2 s, a count(*) of up to a million readings took 0.3-0.8 s with two parallel workers: both of
    the machine's cores, taken from the processor under test."""
    [(n,)] = query(stack, "SELECT coalesce(sum(n), 0) FROM agg_1m WHERE device_id LIKE %s", (prefix + "%",))
    return int(n)


def _check_exact(stack, prefix: str, devices: list[str], per_device: int, start_ms: int) -> None:
    [(count, total)] = query(
        stack, "SELECT count(*), sum(value) FROM readings WHERE device_id LIKE %s", (prefix + "%",)
    )
    expected_total = sum(_series(d, per_device, start_ms)[1].sum() for d in range(len(devices)))
    assert (count, total) == (len(devices) * per_device, expected_total)
    # One-minute aggregates equal a clean aggregation of the stored readings, both ways round.
    differences = query(
        stack,
        """
        WITH clean AS (
            SELECT device_id, metric, date_bin('1 minute', ts, timestamptz 'epoch') AS bucket, count(*) AS n,
                   sum(value) AS sum, min(value) AS min, max(value) AS max, min(ts) AS first_ts, max(ts) AS last_ts
            FROM readings WHERE device_id LIKE %(p)s GROUP BY 1, 2, 3),
        kept AS (SELECT device_id, metric, bucket, n, sum, min, max, first_ts, last_ts FROM agg_1m
                 WHERE device_id LIKE %(p)s)
        SELECT count(*) FROM ((SELECT * FROM clean EXCEPT SELECT * FROM kept)
                              UNION ALL (SELECT * FROM kept EXCEPT SELECT * FROM clean)) d""",
        {"p": prefix + "%"},
    )
    assert differences == [(0,)]


def _stored_anomalies(stack, prefix: str) -> set[tuple[str, int, str]]:
    return {
        (d, int(ts), reason)
        for d, ts, reason in query(
            stack,
            "SELECT device_id, (extract(epoch FROM ts) * 1000)::bigint, reason FROM anomalies WHERE device_id LIKE %s",
            (prefix + "%",),
        )
    }


def _offline_anomalies(devices: list[str], per_device: int, start_ms: int) -> set[tuple[str, int, str]]:
    threshold = ProcessorSettings().anomaly_threshold
    found = set()
    for d, device_id in enumerate(devices):
        ts, values = _series(d, per_device, start_ms)
        detectors = new_detectors(ProcessorSettings())  # as the processor makes them
        ids = detectors.series_ids([(device_id, "pressure")] * per_device)
        scores, reasons = detectors.score(ids, ts.astype(np.float64), values)
        found |= {(device_id, int(ts[i]), REASONS[reasons[i]]) for i in np.flatnonzero(scores >= threshold)}
    return found


def test_a_million_readings_through_repeated_kill_minus_9_are_stored_exactly_once(pipeline):
    prefix = unique_id("million") + "-"
    devices = [f"{prefix}{d:03d}" for d in range(100)]
    per_device = 10_000
    start_ms = int(time.time() * 1000) - 20 * 3_600_000
    asyncio.run(_produce(pipeline, devices, per_device, start_ms))
    kills = 0
    for fraction in (0.2, 0.45, 0.7):
        wait_for(
            lambda f=fraction: _stored_count(pipeline, prefix) >= f * 1_000_000,
            timeout_s=180,
            what=f"{fraction:.0%} of the readings",
        )
        if _stored_count(pipeline, prefix) < 1_000_000:
            assert procs.stop(pipeline, "processor", hard=True)
            kills += 1
            components.start_component(pipeline, "processor")
    assert kills >= 2, "the processor finished before the kills could prove anything"
    wait_for(lambda: _stored_count(pipeline, prefix) == 1_000_000, timeout_s=240, what="all million readings")
    time.sleep(2.0)  # would a replay add anything?
    _check_exact(pipeline, prefix, devices, per_device, start_ms)
    # Detector state came back from checkpoints: the anomalies are those of one clean pass.
    expected = _offline_anomalies(devices, per_device, start_ms)
    assert expected and _stored_anomalies(pipeline, prefix) == expected


def test_two_processors_share_the_partitions_and_store_the_same_result(pipeline):
    prefix = unique_id("pair") + "-"
    devices = [f"{prefix}{d:03d}" for d in range(40)]
    per_device = 5_000
    start_ms = int(time.time() * 1000) - 10 * 3_600_000
    try:
        start_second_processor(pipeline, "processor-b", env={"KOTA_PROCESSOR_METRICS_ENABLED": "false"})
        asyncio.run(_produce(pipeline, devices, per_device, start_ms))
        wait_for(
            lambda: _stored_count(pipeline, prefix) == len(devices) * per_device, timeout_s=180, what="every reading"
        )
        time.sleep(1.0)
        _check_exact(pipeline, prefix, devices, per_device, start_ms)
        assert _stored_anomalies(pipeline, prefix) == _offline_anomalies(devices, per_device, start_ms)
    finally:
        procs.stop(pipeline, "processor-b")


def test_a_worker_killed_mid_stream_is_started_again_and_nothing_is_lost_or_doubled(pipeline):
    """`kota processor` runs its workers as one component: one killed is started again by the
    processor, its partitions go on from their checkpoints, and /metrics adds up every worker."""
    prefix = unique_id("worker") + "-"
    devices = [f"{prefix}{d:03d}" for d in range(40)]
    per_device = 5_000
    start_ms = int(time.time() * 1000) - 10 * 3_600_000
    parent = components.start_component(pipeline, "processor")
    workers = procs.children(parent)
    assert len(workers) == ProcessorSettings().workers == 2
    log = procs.log_file(pipeline, "processor")
    since = log.stat().st_size
    stored_before = scrape(pipeline.processor_metrics_port)["kota_processor_readings_stored_total"]
    asyncio.run(_produce(pipeline, devices, per_device, start_ms))
    wait_for(
        lambda: _stored_count(pipeline, prefix) >= 0.3 * len(devices) * per_device,
        timeout_s=120,
        what="a third of the readings",
    )
    os.kill(workers[0], signal.SIGKILL)
    wait_for(
        lambda: "ended with signal 9; starting it again" in log.read_bytes()[since:].decode(errors="replace"),
        what="the processor to start its worker again",
    )
    wait_for(lambda: _stored_count(pipeline, prefix) == len(devices) * per_device, timeout_s=180, what="every reading")
    time.sleep(1.0)  # would a replay add anything?
    _check_exact(pipeline, prefix, devices, per_device, start_ms)
    assert _stored_anomalies(pipeline, prefix) == _offline_anomalies(devices, per_device, start_ms)
    now_running = procs.children(parent)
    assert len(now_running) == 2 and workers[0] not in now_running
    # Each worker stored about half; only their sum comes near the whole (a kill between a batch's
    # commit and its count loses at most that batch from the count, never from the database).
    stored = scrape(pipeline.processor_metrics_port)["kota_processor_readings_stored_total"] - stored_before
    assert stored >= 0.8 * len(devices) * per_device


def test_workers_stop_when_the_processor_is_killed_alone(pipeline):
    """A kill -9 of the processor's own process, not its group: its workers must not go on consuming
    beside whatever starts in its place."""
    parent = components.start_component(pipeline, "processor")
    workers = procs.children(parent)
    assert workers
    try:
        os.kill(parent, signal.SIGKILL)
        wait_for(lambda: not any(alive(w) for w in workers), timeout_s=20, what="the workers to stop")
    finally:
        components.start_component(pipeline, "processor")
