"""Assemble the ops API: routers, the database pool, the live feed, metrics, the command-centre page."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import select
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Histogram, generate_latest, multiprocess
from psycopg_pool import AsyncConnectionPool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kota.logs import setup_logging
from kota.settings import StackSettings
from ops_api.api.routes import access, alerts, cities, commands, devices, health, live, notifications, rules
from ops_api.auth import Caller, TokenCache, require
from ops_api.live import LiveHub
from ops_api.rejections import RecentRejections, RejectionReader
from ops_api.series_cache import BACKGROUND_CHECKS, SeriesCache
from ops_api.settings import ApiSettings

STATIC_DIR = Path(__file__).parent / "static"
log = logging.getLogger("kota.api")
INVALID_VALUE = {
    "detail": "invalid value: a parameter holds something the database cannot store or compare",
    "code": "invalid_value",
}
# The page loads only its own scripts, styles and data (no inline script, no other origin, no
# frames); its canvas map needs no tiles. `connect-src 'self'` covers its WebSocket (same host).
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# FastAPI's /docs and /redoc load Swagger UI and ReDoc from a CDN and start them with an inline
# script; they hold no data of their own, and still may not be framed.
DOCS_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "font-src https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com "
    "https://cdn.redoc.ly; connect-src 'self'; worker-src blob:; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
DOCS_PATHS = ("/docs", "/redoc")
REQUEST_SECONDS = Histogram(
    "kota_api_request_seconds",
    "API request latency",
    ["method", "route", "status"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)

DESCRIPTION = """City operations for smart-city command centres.

Every `/api/v1` call needs `Authorization: Bearer <token>` (`kota users token NAME` makes one; the
live feed also takes `?token=`). Answers are scoped to the caller's cities: another city's device
or alert answers 404 as if it did not exist; a role that may not do something answers 403; no
token or a wrong one answers 401. Each error has a stable `detail`.

Roles: **operator** reads and acknowledges or clears alerts; **integrator** manages the devices of
their cities; **admin** does everything in every city.
"""


class RequestTimer:
    """Observes each HTTP request's latency in REQUEST_SECONDS, by route template and status.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware (`@app.middleware("http")`) runs every
    request in an extra task with memory streams, which cost about a third of the API's CPU on a
    cheap endpoint (py-spy under bench.api's load).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees if the app raises before starting a response

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            route = scope.get("route")
            REQUEST_SECONDS.labels(scope["method"], getattr(route, "path", "unmatched"), str(status)).observe(
                time.perf_counter() - started
            )


class SecurityHeaders:
    """CSP, no framing, no MIME sniffing and no Referer on every HTTP answer: routes, errors, static
    files, metrics. The page takes its token from the URL fragment, so no Referer may carry the URL.

    Outermost but for Starlette's ServerErrorMiddleware, which answers an unhandled exception; so an
    exception before the answer has started is answered here (500, with these headers) and raised
    on, for the server to log: ServerErrorMiddleware then sends nothing more.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        csp = DOCS_CSP if path in DOCS_PATHS or path.startswith("/docs/") else PAGE_CSP
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = csp
                headers["X-Frame-Options"] = "DENY"
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "no-referrer"
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            if not started:
                response = JSONResponse({"detail": "internal error"}, status_code=500)
                await response(scope, receive, send_with_headers)
            raise


class IdleCheck:
    """The pool's `check`: test a connection before handing it out only when it may be dead, so the
    first requests after a database restart get fresh connections (tests/test_faults.py) without
    every request paying a round trip for the test.

    May be dead: its socket has something to read (an idle connection is sent nothing, unless the
    server is saying goodbye, as a restart does), or it sat unused longer than `after_s` (a server
    gone without a word, as behind a broken network).
    """

    def __init__(self, after_s: float) -> None:
        self._after_s = after_s
        self._returned: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = weakref.WeakKeyDictionary()

    async def note_returned(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._returned[conn] = time.monotonic()

    async def check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        returned = self._returned.get(conn)
        if returned is None or time.monotonic() - returned > self._after_s or _has_input(conn):
            await AsyncConnectionPool.check_connection(conn)


def _has_input(conn: psycopg.AsyncConnection[Any]) -> bool:
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as strings, anywhere inside (so it can be written as JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _metrics_registry() -> CollectorRegistry:
    """The process's own metrics, or, under `kota api` with several workers, all workers' added up."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def create_app(
    stack: StackSettings | None = None,
    settings: ApiSettings | None = None,
    *,
    on_registry_change: Callable[[], None] | None = None,
) -> FastAPI:
    """The ops API. `on_registry_change` runs (in a thread) after the API changed who may connect to the
    broker: the local stack's command makes it regenerate the broker's access files (deploy/mqtt_access.py)."""
    stack = stack or StackSettings()
    settings = settings or ApiSettings()
    setup_logging()  # in a worker process uvicorn started, nothing else has (a no-op when `kota api` has)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        idle_check = IdleCheck(after_s=10.0)
        # A small pool per worker: on two cores, four connections per worker kept the database as
        # busy as it can be; twenty queued the same work in more processes (bench/api.py, latest
        # values at 50 clients: p99 216 ms with 20, 142-157 ms with 4). A second, as small, is the
        # series cache's for pages it checks ahead of their callers (ops_api/series_cache.py).
        async with (
            AsyncConnectionPool(
                stack.postgres_dsn,
                min_size=2,
                max_size=4,
                open=False,
                kwargs={"autocommit": True},
                check=idle_check.check,
                reset=idle_check.note_returned,
            ) as pool,
            AsyncConnectionPool(
                stack.postgres_dsn,
                min_size=1,
                max_size=BACKGROUND_CHECKS,
                open=False,
                kwargs={"autocommit": True},
                check=idle_check.check,
                reset=idle_check.note_returned,
            ) as checks,
        ):
            app.state.pool = pool
            app.state.series_cache.background = checks.connection
            await app.state.hub.start()
            if settings.live_kafka_enabled:
                await app.state.rejection_reader.start()
            watcher = asyncio.create_task(app.state.watch.run())
            try:
                yield
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                await app.state.health.close()
                await app.state.hub.stop()
                await app.state.rejection_reader.stop()

    app = FastAPI(title="kotacerdas ops API", version="1", lifespan=lifespan, description=DESCRIPTION)
    app.state.stack = stack
    app.state.settings = settings
    app.state.on_registry_change = on_registry_change or (lambda: None)
    # Trusted (cached) only once the LISTEN connection hears changes of access (live.watch_access).
    app.state.tokens = TokenCache(settings.token_cache_s, trusted=False)
    app.state.snapshots = devices.SnapshotCache()
    app.state.series_cache = SeriesCache(
        int(settings.series_cache_mib * 2**20), settings.series_fresh_s, settings.series_stale_s
    )
    app.state.hub = LiveHub(stack, queue_events=settings.live_queue_events, kafka_enabled=settings.live_kafka_enabled)
    app.state.rejection_reader = RejectionReader(
        stack,
        RecentRejections(settings.rejections_per_sender, settings.rejections_senders),
        window_s=settings.rejections_window_s,
    )
    app.state.watch = health.ProcessorWatch(stack)
    app.state.health = health.HealthProbe(stack, settings.health_cache_s, settings.processor_group_id)
    live.watch_access(app)
    for router in (
        health.router,
        access.router,
        cities.router,
        devices.router,
        alerts.router,
        live.router,
        notifications.router,
    ):
        app.include_router(router)
    app.include_router(commands.router)
    app.include_router(rules.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    registry = _metrics_registry()

    @app.get("/metrics", include_in_schema=False)
    async def metrics(caller: Caller) -> Response:
        """Prometheus metrics, for admins only (a scraper gets an admin token: docs/ops_api.md)."""
        require(caller, doing="read metrics")
        return Response(await asyncio.to_thread(generate_latest, registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RequestTimer)
    app.add_middleware(SecurityHeaders)  # added last: outermost, so it sees every answer

    @app.exception_handler(psycopg.DataError)
    async def value_postgres_cannot_hold(request: Request, error: psycopg.DataError) -> JSONResponse:
        # SQLSTATE class 22 is about the values a caller sent (a NUL byte in a city, a number out of
        # range): their mistake, answered like any other validation failure, not a 500. The
        # database's own words stay in the log: they may quote schema, SQL or other rows.
        log.info("422 for %s %s: %r", request.method, request.url.path, str(error).splitlines()[0][:300])
        return JSONResponse(INVALID_VALUE, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer quotes the input, and Python's JSON parser takes NaN and Infinity: a
        # body with a NaN where a finite number belongs was refused, then the refusal itself could
        # not be written as JSON (a 500). The same answer, with such numbers quoted as text.
        return JSONResponse({"detail": _finite(jsonable_encoder(error.errors()))}, status_code=422)

    @app.get("/", include_in_schema=False)
    async def page() -> RedirectResponse:
        return RedirectResponse("/static/index.html")

    return app
