"""Dependencies shared by the routers, as Annotated aliases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import Depends, Request
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from kota.settings import StackSettings
from ops_api.live import LiveHub
from ops_api.settings import ApiSettings


async def _connection(request: Request) -> AsyncIterator[AsyncConnection]:
    """A pooled connection in autocommit: reads cost no BEGIN/COMMIT; writes open a transaction."""
    pool: AsyncConnectionPool = request.app.state.pool
    async with pool.connection() as conn:
        yield conn


def _stack(request: Request) -> StackSettings:
    stack: StackSettings = request.app.state.stack
    return stack


def _settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


def _registry_changed(request: Request) -> Callable[[], None]:
    hook: Callable[[], None] = request.app.state.on_registry_change
    return hook


def _hub(request: Request) -> LiveHub:
    hub: LiveHub = request.app.state.hub
    return hub


Connection = Annotated[AsyncConnection, Depends(_connection)]
Stack = Annotated[StackSettings, Depends(_stack)]
Settings = Annotated[ApiSettings, Depends(_settings)]
Hub = Annotated[LiveHub, Depends(_hub)]
# Call after a change of who may connect to the broker (create_app's on_registry_change).
RegistryChanged = Annotated[Callable[[], None], Depends(_registry_changed)]
