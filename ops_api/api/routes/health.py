"""GET /health: does each dependency really answer, how far behind is the processor, how fast is it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Coroutine
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.client import AIOKafkaClient
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from kota.contract import READINGS_TOPIC
from kota.metrics import samples
from kota.mqtt import HEALTH_CONNECT, is_connack
from kota.settings import StackSettings
from ops_api import queries
from ops_api.api.deps import Connection, Hub, Stack
from processing.processor import ProcessorSettings

router = APIRouter(tags=["health"])


class DependencyHealth(BaseModel):
    ok: bool
    detail: str
    latency_ms: float


class ProcessorHealth(BaseModel):
    consumer_lag: int | None = Field(description="readings records in Kafka not yet stored (all partitions)")
    lag_by_partition: dict[str, int]
    readings_per_s: float | None = Field(description="readings newly stored per second, over the last sampling")
    last_batch_at: dt.datetime | None


class Health(BaseModel):
    status: str
    dependencies: dict[str, DependencyHealth]
    last_reading_at: dt.datetime | None
    processor: ProcessorHealth
    live_clients: int


class ProcessorWatch:
    """Samples the processor's Prometheus counters every few seconds, for its throughput."""

    def __init__(self, stack: StackSettings, every_s: float = 5.0) -> None:
        self._url = f"http://{stack.processor_host}:{stack.processor_metrics_port}/metrics"
        self._every_s = every_s
        self._last: tuple[float, float] | None = None
        self.readings_per_s: float | None = None
        self.last_batch_at: dt.datetime | None = None

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    self._sample((await client.get(self._url)).text)
                await asyncio.sleep(self._every_s)

    def _sample(self, text: str) -> None:
        values = samples(text)
        stored = values.get("kota_processor_readings_stored_total", float("nan"))
        batch = values.get("kota_processor_last_batch_unixtime", 0.0)
        now = time.monotonic()
        if self._last is not None and stored >= self._last[1]:
            self.readings_per_s = round((stored - self._last[1]) / (now - self._last[0]), 1)
        self._last = (now, stored)
        self.last_batch_at = dt.datetime.fromtimestamp(batch, dt.UTC) if batch > 0 else None


async def _timed(check: Coroutine[Any, Any, str]) -> DependencyHealth:
    started = time.perf_counter()
    try:
        detail, ok = await asyncio.wait_for(check, timeout=3), True
    except Exception as exc:  # noqa: BLE001 - a health check reports every failure
        detail, ok = f"{type(exc).__name__}: {exc}", False
    return DependencyHealth(ok=ok, detail=detail, latency_ms=round((time.perf_counter() - started) * 1000, 1))


async def _mqtt(host: str, port: int) -> str:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(HEALTH_CONNECT)
        await writer.drain()
        connack = await reader.readexactly(4)
        if not is_connack(connack):
            raise ConnectionError(f"unexpected reply {connack!r}")
        return f"broker answered CONNACK (code {connack[3]})"
    finally:
        writer.close()


async def _kafka(bootstrap: str) -> str:
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=2500)
    try:
        await client.bootstrap()
        cluster = await client.fetch_all_metadata()
        return f"{len(cluster.brokers())} broker(s), {len(cluster.topics())} topic(s)"
    finally:
        await client.close()


async def _lag(conn: Connection, hub: Hub, stack: StackSettings) -> dict[str, int]:
    """End offset of each readings partition minus the offset the processor stored with its data
    (the processor keeps its offsets in PostgreSQL, not in Kafka)."""
    consumer, own = hub.consumer, hub.consumer is None
    if consumer is None:  # the live feed is not reading Kafka now: ask with a short-lived consumer
        consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap, group_id=None, request_timeout_ms=3000)
        await asyncio.wait_for(consumer.start(), timeout=3)
    try:
        # The stack creates the topic with this many partitions (deploy/stack.py create_topics).
        partitions = [TopicPartition(READINGS_TOPIC, p) for p in range(stack.kafka_partitions)]
        ends = await asyncio.wait_for(consumer.end_offsets(partitions), timeout=3)
    finally:
        if own:
            await consumer.stop()
    cur = await conn.execute("SELECT partition, next_offset FROM stream_offsets WHERE consumer_group = %s "
                             "AND topic = %s", (ProcessorSettings().group_id, READINGS_TOPIC))
    stored: dict[int, int] = dict(await cur.fetchall())
    return {str(tp.partition): max(0, end - stored.get(tp.partition, 0)) for tp, end in ends.items()}


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(request: Request, conn: Connection, stack: Stack, hub: Hub, response: Response) -> Health:
    """Each dependency, the processor's Kafka lag and throughput, and the newest stored reading."""
    async def database() -> str:
        await conn.execute("SELECT 1")
        return "PostgreSQL answered"

    db, kafka, mqtt = await asyncio.gather(_timed(database()), _timed(_kafka(stack.kafka_bootstrap)),
                                           _timed(_mqtt(stack.mqtt_host, stack.mqtt_port)))
    last = await queries.last_reading_time(conn) if db.ok else None
    lag: dict[str, int] = {}
    if db.ok and kafka.ok:
        with contextlib.suppress(Exception):
            lag = await _lag(conn, hub, stack)
    deps = {"postgres": db, "kafka": kafka, "mqtt": mqtt}
    ok = all(d.ok for d in deps.values())
    if not ok:
        response.status_code = 503
    watch: ProcessorWatch = request.app.state.watch
    return Health(status="ok" if ok else "degraded", dependencies=deps, last_reading_at=last,
                  processor=ProcessorHealth(consumer_lag=sum(lag.values()) if lag else None, lag_by_partition=lag,
                                            readings_per_s=watch.readings_per_s, last_batch_at=watch.last_batch_at),
                  live_clients=hub.clients)
