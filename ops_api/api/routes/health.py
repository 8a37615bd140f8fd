"""GET /health: does each dependency really answer, how far behind is the processor, how fast is it.

Anyone gets the summary (`{"status": "ok"}` or `"degraded"` with 503): enough for probes and load
balancers. A signed-in caller (any role) gets the details. Neither ever gets an exception's text:
a failed check says only "timed out", "unreachable" or "failed", and the log has the rest.

Each API process asks its dependencies at most once per `KOTA_API_HEALTH_CACHE_S` (2 s), whoever
calls and however often, over connections it keeps: one Kafka consumer (metadata and end offsets),
the request pool for PostgreSQL, and one MQTT CONNECT per probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable

import httpx
import psycopg
import psycopg_pool
from aiokafka import AIOKafkaConsumer, TopicPartition
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from kota.contract import READINGS_TOPIC
from kota.mqtt import HEALTH_CONNECT, is_connack
from kota.settings import StackSettings
from ops_api import queries
from ops_api.auth import authenticate, bearer_token
from ops_api.live import LiveHub
from ops_api.metrics import samples

router = APIRouter(tags=["health"])
log = logging.getLogger("kota.api.health")
CHECK_TIMEOUT_S = 3.0


class DependencyHealth(BaseModel):
    ok: bool
    detail: str
    latency_ms: float


class ProcessorHealth(BaseModel):
    consumer_lag: int | None = Field(description="readings records in Kafka not yet stored (all partitions)")
    lag_by_partition: dict[str, int]
    readings_per_s: float | None = Field(description="readings newly stored per second, over the last sampling")
    last_batch_at: dt.datetime | None


class HealthSummary(BaseModel):
    status: str = Field(description="ok, or degraded (answered with 503) when a dependency does not answer")


class Health(HealthSummary):
    dependencies: dict[str, DependencyHealth]
    last_reading_at: dt.datetime | None
    processor: ProcessorHealth
    live_clients: int
    caches: dict[str, int] = Field(
        default_factory=dict,
        description="entries in this API process's caches "
        "(each is bounded): tokens, device_snapshots, device_snapshot_locks, series_pages",
    )


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


def _failure(exc: BaseException) -> str:
    """What a caller may know about a failed check: its kind, never its text."""
    if isinstance(exc, TimeoutError | psycopg_pool.PoolTimeout):
        return "timed out"
    if isinstance(exc, OSError | psycopg.OperationalError):
        return "unreachable"
    return "failed"


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


class HealthProbe:
    """The last report, asked for again at most every `cache_s`, by one probe at a time."""

    def __init__(self, stack: StackSettings, cache_s: float, processor_group: str) -> None:
        self._stack = stack
        self._processor_group = processor_group
        self._cache_s = cache_s
        self._report: Health | None = None
        self._at = 0.0
        self._probing: asyncio.Task[Health] | None = None
        self._consumer: AIOKafkaConsumer | None = None  # kept between probes; none per call
        self._failing: set[str] = set()  # checks failing at the last probe: logged when they start to

    async def report(self, pool: AsyncConnectionPool, hub: LiveHub) -> Health:
        if self._report is not None and time.monotonic() - self._at < self._cache_s:
            return self._report
        if self._probing is None:
            self._probing = asyncio.create_task(self._probe(pool, hub), name="health-probe")
            self._probing.add_done_callback(self._probed)
        return await asyncio.shield(self._probing)  # a caller that leaves does not cancel it for the others

    def _probed(self, task: asyncio.Task[Health]) -> None:
        self._probing = None
        if not task.cancelled() and task.exception() is None:
            self._report, self._at = task.result(), time.monotonic()

    async def close(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = None

    async def _check(self, name: str, check: Callable[[], Awaitable[str]]) -> DependencyHealth:
        started = time.perf_counter()
        try:
            detail, ok = await asyncio.wait_for(check(), CHECK_TIMEOUT_S), True
        except Exception as exc:  # noqa: BLE001 - a health check reports every failure
            detail, ok = _failure(exc), False
            if name not in self._failing:
                log.warning("health: %s check failed: %r", name, exc)
            self._failing.add(name)
        else:
            if name in self._failing:
                log.info("health: %s answers again", name)
            self._failing.discard(name)
        return DependencyHealth(ok=ok, detail=detail, latency_ms=round((time.perf_counter() - started) * 1000, 1))

    async def _kafka_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                **self._stack.kafka_client_options(), group_id=None, request_timeout_ms=int(CHECK_TIMEOUT_S * 1000)
            )
            try:
                await consumer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                raise
            self._consumer = consumer
        return self._consumer

    async def _kafka(self) -> str:
        try:
            consumer = await self._kafka_consumer()
            topics = await consumer.topics()  # asks the broker for metadata now
        except BaseException:
            await self.close_kafka()  # start afresh next time
            raise
        return f"{len(topics)} topic(s)"

    async def close_kafka(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _lag(self, pool: AsyncConnectionPool, hub: LiveHub) -> dict[str, int]:
        """End offset of each readings partition minus the offset the processor stored with its data
        (the processor keeps its offsets in PostgreSQL, not in Kafka)."""
        consumer = hub.consumer or await self._kafka_consumer()
        # The stack creates the topic with this many partitions (deploy/kafka.py create_topics).
        partitions = [TopicPartition(READINGS_TOPIC, p) for p in range(self._stack.kafka_partitions)]
        ends = await asyncio.wait_for(consumer.end_offsets(partitions), timeout=CHECK_TIMEOUT_S)
        async with pool.connection(timeout=CHECK_TIMEOUT_S) as conn:
            cur = await conn.execute(
                "SELECT partition, next_offset FROM stream_offsets WHERE consumer_group = %s AND topic = %s",
                (self._processor_group, READINGS_TOPIC),
            )
            stored: dict[int, int] = dict(await cur.fetchall())
        return {str(tp.partition): max(0, end - stored.get(tp.partition, 0)) for tp, end in ends.items()}

    async def _probe(self, pool: AsyncConnectionPool, hub: LiveHub) -> Health:
        last: dt.datetime | None = None

        async def database() -> str:
            nonlocal last
            async with pool.connection(timeout=CHECK_TIMEOUT_S) as conn:
                last = await queries.last_reading_time(conn)
            return "PostgreSQL answered"

        db, kafka, mqtt = await asyncio.gather(
            self._check("postgres", database),
            self._check("kafka", self._kafka),
            self._check("mqtt", lambda: _mqtt(self._stack.mqtt_host, self._stack.mqtt_port)),
        )
        lag: dict[str, int] = {}
        if db.ok and kafka.ok:
            try:
                lag = await asyncio.wait_for(self._lag(pool, hub), CHECK_TIMEOUT_S * 2)
            except Exception:  # noqa: BLE001 - lag unknown this time; the dependencies said why
                log.debug("health: processor lag not known", exc_info=True)
        deps = {"postgres": db, "kafka": kafka, "mqtt": mqtt}
        return Health(
            status="ok" if all(d.ok for d in deps.values()) else "degraded",
            dependencies=deps,
            last_reading_at=last,
            processor=ProcessorHealth(
                consumer_lag=sum(lag.values()) if lag else None,
                lag_by_partition=lag,
                readings_per_s=None,
                last_batch_at=None,
            ),
            live_clients=0,
        )


def _cache_sizes(request: Request) -> dict[str, int]:
    state = request.app.state
    snapshots, snapshot_locks = state.snapshots.sizes
    return {
        "tokens": len(state.tokens),
        "device_snapshots": snapshots,
        "device_snapshot_locks": snapshot_locks,
        "series_pages": len(state.series_cache),
    }


async def _signed_in(request: Request) -> bool:
    """Whether the caller sent a token that works now (for the details); no token, a bad one or a
    database that does not answer: the summary, never an error."""
    try:
        token = bearer_token(request)
        if token is None:
            return False
        await asyncio.wait_for(authenticate(request.app.state.pool, request.app.state.tokens, token), CHECK_TIMEOUT_S)
    except HTTPException:
        return False
    except Exception:  # noqa: BLE001 - the summary says the database is away
        return False
    return True


@router.get(
    "/health",
    response_model=None,
    responses={
        200: {
            "model": Health | HealthSummary,
            "description": "ok: the summary to anyone; with a token, each dependency, the processor's lag and "
            "throughput, the newest stored reading and live clients",
        },
        503: {"model": Health | HealthSummary, "description": "degraded: a dependency does not answer"},
    },
)
async def health(request: Request) -> JSONResponse:
    """Each dependency, the processor's Kafka lag and throughput, and the newest stored reading (signed
    in; anyone else gets only ok or degraded)."""
    probe: HealthProbe = request.app.state.health
    hub: LiveHub = request.app.state.hub
    report = await probe.report(request.app.state.pool, hub)
    status_code = 200 if report.status == "ok" else 503
    if not await _signed_in(request):
        return JSONResponse(HealthSummary(status=report.status).model_dump(), status_code=status_code)
    watch: ProcessorWatch = request.app.state.watch
    detailed = report.model_copy(
        update={
            "processor": report.processor.model_copy(
                update={"readings_per_s": watch.readings_per_s, "last_batch_at": watch.last_batch_at}
            ),
            "live_clients": hub.clients,
            "caches": _cache_sizes(request),
        }
    )
    return JSONResponse(detailed.model_dump(mode="json"), status_code=status_code)
