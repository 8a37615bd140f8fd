"""Dependencies shared by the routers, as Annotated aliases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from kota.settings import StackSettings


async def _connection(request: Request) -> AsyncIterator[AsyncConnection]:
    pool: AsyncConnectionPool = request.app.state.pool
    async with pool.connection() as conn:
        yield conn


def _stack(request: Request) -> StackSettings:
    stack: StackSettings = request.app.state.stack
    return stack


Connection = Annotated[AsyncConnection, Depends(_connection)]
Stack = Annotated[StackSettings, Depends(_stack)]
