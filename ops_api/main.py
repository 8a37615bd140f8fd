"""Assemble the ops API: routers, the database pool, the command-centre page."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from psycopg_pool import AsyncConnectionPool

from kota.settings import StackSettings
from ops_api.api.routes import devices, health

STATIC_DIR = Path(__file__).parent / "static"


def create_app(stack: StackSettings | None = None) -> FastAPI:
    stack = stack or StackSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncConnectionPool(stack.postgres_dsn, min_size=1, max_size=10, open=False) as pool:
            app.state.pool = pool
            yield

    app = FastAPI(title="kotacerdas ops API", version="1", lifespan=lifespan,
                  description="City operations: devices, latest values and health of the data path.")
    app.state.stack = stack
    app.include_router(health.router)
    app.include_router(devices.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> RedirectResponse:
        return RedirectResponse("/static/index.html")

    return app
