"""Assemble the ops API: routers, the database pool, the live feed, metrics, the command-centre page."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import Histogram, make_asgi_app
from psycopg_pool import AsyncConnectionPool

from kota.settings import StackSettings
from ops_api.api.routes import access, alerts, cities, devices, health, live
from ops_api.auth import TokenCache
from ops_api.live import LiveHub
from ops_api.settings import ApiSettings

STATIC_DIR = Path(__file__).parent / "static"
REQUEST_SECONDS = Histogram("kota_api_request_seconds", "API request latency", ["method", "route", "status"],
                            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

DESCRIPTION = """City operations for smart-city command centres.

Every `/api/v1` call needs `Authorization: Bearer <token>` (`kota users token NAME` makes one; the
live feed also takes `?token=`). Answers are scoped to the caller's cities: another city's device
or alert answers 404 as if it did not exist; a role that may not do something answers 403; no
token or a wrong one answers 401. Each error has a stable `detail`.

Roles: **operator** reads and acknowledges or clears alerts; **integrator** manages the devices of
their cities; **admin** does everything in every city.
"""


def create_app(stack: StackSettings | None = None, settings: ApiSettings | None = None) -> FastAPI:
    stack = stack or StackSettings()
    settings = settings or ApiSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # check: a pooled connection is tested as it is handed out, so the first requests after a
        # database restart get fresh connections instead of the dead ones (tests/test_faults.py).
        async with AsyncConnectionPool(stack.postgres_dsn, min_size=2, max_size=20, open=False,
                                       kwargs={"autocommit": True},
                                       check=AsyncConnectionPool.check_connection) as pool:
            app.state.pool = pool
            await app.state.hub.start()
            watcher = asyncio.create_task(app.state.watch.run())
            try:
                yield
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                await app.state.hub.stop()

    app = FastAPI(title="kotacerdas ops API", version="1", lifespan=lifespan, description=DESCRIPTION)
    app.state.stack = stack
    app.state.settings = settings
    app.state.tokens = TokenCache(settings.token_cache_s)
    app.state.snapshots = devices.SnapshotCache()
    app.state.hub = LiveHub(stack, queue_events=settings.live_queue_events, kafka_enabled=settings.live_kafka_enabled)
    app.state.watch = health.ProcessorWatch(stack)
    for router in (health.router, access.router, cities.router, devices.router, alerts.router, live.router):
        app.include_router(router)
    app.mount("/metrics", make_asgi_app())
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.middleware("http")
    async def time_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        REQUEST_SECONDS.labels(request.method, getattr(route, "path", "unmatched"),
                               str(response.status_code)).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(psycopg.DataError)
    async def value_postgres_cannot_hold(request: Request, error: psycopg.DataError) -> JSONResponse:
        # SQLSTATE class 22 is about the values a caller sent (a NUL byte in a city, a number out of
        # range): their mistake, answered like any other validation failure, not a 500.
        return JSONResponse({"detail": f"invalid value: {error}"}, status_code=422)

    @app.get("/", include_in_schema=False)
    async def page() -> RedirectResponse:
        return RedirectResponse("/static/index.html")

    return app
