"""GET /health: does each dependency really answer?"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Coroutine
from typing import Any

from aiokafka.client import AIOKafkaClient
from fastapi import APIRouter, Response
from pydantic import BaseModel

from kota.mqtt import HEALTH_CONNECT, is_connack
from ops_api import queries
from ops_api.api.deps import Connection, Stack

router = APIRouter(tags=["health"])



class DependencyHealth(BaseModel):
    ok: bool
    detail: str
    latency_ms: float


class Health(BaseModel):
    status: str
    dependencies: dict[str, DependencyHealth]
    last_reading_at: dt.datetime | None


async def _timed(check: Coroutine[Any, Any, str]) -> DependencyHealth:
    started = time.perf_counter()
    try:
        detail, ok = await asyncio.wait_for(check, timeout=3), True
    except Exception as exc:  # noqa: BLE001 - a health check reports every failure
        detail, ok = f"{type(exc).__name__}: {exc}", False
    return DependencyHealth(ok=ok, detail=detail, latency_ms=round((time.perf_counter() - started) * 1000, 1))


async def _mqtt(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
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


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(conn: Connection, stack: Stack, response: Response) -> Health:
    async def database() -> str:
        await conn.execute("SELECT 1")
        return "PostgreSQL answered"

    db, kafka, mqtt = await asyncio.gather(_timed(database()), _timed(_kafka(stack.kafka_bootstrap)),
                                           _timed(_mqtt(stack.mqtt_port)))
    last = await queries.last_reading_time(conn) if db.ok else None
    deps = {"postgres": db, "kafka": kafka, "mqtt": mqtt}
    ok = all(d.ok for d in deps.values())
    if not ok:
        response.status_code = 503
    return Health(status="ok" if ok else "degraded", dependencies=deps, last_reading_at=last)
