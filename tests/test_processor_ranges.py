"""The processor loads declared ranges for the devices it has not seen, not the whole registry."""

import asyncio
import dataclasses
import time

import psycopg
import pytest

from kota.contract import Reading
from kota.registry import MetricSpec, upsert_devices
from processing.processor import Processor
from processing.settings import ProcessorSettings
from processing.store import PartitionSlice
from tests.helpers import provision, unique_id

pytestmark = pytest.mark.stack


def _slice(*pairs: tuple[str, str]) -> PartitionSlice:
    now = int(time.time() * 1000)
    readings = [
        Reading(now, "testkota", "environment", device_id, metric, 1.0, "", now, "test") for device_id, metric in pairs
    ]
    return PartitionSlice(0, 0, len(readings), [(i, [r]) for i, r in enumerate(readings)])


def test_ranges_are_loaded_for_new_devices_and_new_metrics_only(stack):
    gate = provision(stack, "water_level")
    meter = provision(stack, "water_meter")
    missing = unique_id("not-registered")
    processor = Processor(stack=stack, settings=ProcessorSettings())

    asyncio.run(processor._refresh_ranges([_slice((gate.device_id, "currentLevel"), (missing, "x"))]))
    assert set(processor._ranges) == {gate.device_id}, "only the devices in the batch; one is not registered"
    spec = gate.metrics["currentLevel"]
    assert processor._ranges[gate.device_id]["currentLevel"] == (spec.low, spec.high)

    # The gate declares a new metric; readings of it bring its range, and a new device brings its own.
    declared = {**gate.metrics, "flow": MetricSpec("m3/s", 0.0, 500.0)}
    with psycopg.connect(stack.postgres_dsn) as conn:
        upsert_devices(conn, [dataclasses.replace(gate, metrics=declared)])
    asyncio.run(
        processor._refresh_ranges([_slice((gate.device_id, "flow"), (meter.device_id, "pressure"), (missing, "x"))])
    )
    assert processor._ranges[gate.device_id]["flow"] == (0.0, 500.0)
    assert set(processor._ranges) == {gate.device_id, meter.device_id}
    assert missing in processor._absent, "asked once; not again on every batch"
