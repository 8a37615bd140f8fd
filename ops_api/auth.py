"""Who is calling, and what they may see: bearer tokens, roles and city scope.

Every route depends on `Caller`. Scope errors never reveal another city's data: a device, alert or
city outside the caller's cities answers 404 exactly as if it did not exist.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from psycopg_pool import AsyncConnectionPool

from kota.accounts import Role, secret_matches, split_token

NO_TOKEN = "missing bearer token"  # noqa: S105 - error texts
BAD_TOKEN = "invalid or revoked token"  # noqa: S105


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    role: Role
    cities: frozenset[str] | None  # None: every city (admin)

    def sees(self, city: str) -> bool:
        return self.cities is None or city in self.cities

    def city_filter(self) -> list[str] | None:
        """For SQL `city = ANY(%s)`; None means no filter."""
        return None if self.cities is None else sorted(self.cities)


class TokenCache:
    """Verified tokens for a few seconds, so a request costs no database round trip for auth.

    One lookup per token at a time: when an entry expires under load, the concurrent requests
    carrying that token share one verification. Without that, 50 clients on one token sent 50
    UPDATEs of the same api_tokens row every `ttl_s`, queued on its row lock, and that queue was
    bench.api's p99 (about 300 ms against a 25 ms median).
    """

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._verifying: dict[str, asyncio.Future[Principal]] = {}

    async def verify_once(self, token: str, verify: Callable[[], Awaitable[Principal]]) -> Principal:
        """`verify()`'s result for `token`, shared with any caller already waiting for it."""
        pending = self._verifying.get(token)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.cancelled() and not (task and task.cancelling()):
                    return await self.verify_once(token, verify)  # the verifier's client left: ask again
                raise
        pending = self._verifying[token] = asyncio.get_running_loop().create_future()
        try:
            principal = await verify()
        except asyncio.CancelledError:
            pending.cancel()
            raise
        except BaseException as error:
            pending.set_exception(error)
            pending.exception()  # marked retrieved: nobody else may be waiting
            raise
        else:
            pending.set_result(principal)
            self.put(token, principal)
            return principal
        finally:
            del self._verifying[token]

    def get(self, token: str) -> Principal | None:
        hit = self._entries.get(token)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, token: str, principal: Principal) -> None:
        if len(self._entries) > 10_000:  # bounded: forget everything rather than grow
            self._entries.clear()
        self._entries[token] = (time.monotonic() + self._ttl_s, principal)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    # Browsers cannot set headers on WebSocket or EventSource requests.
    return request.query_params.get("token") or None


async def authenticate(pool: AsyncConnectionPool, cache: TokenCache, token: str | None) -> Principal:
    if not token:
        raise HTTPException(401, NO_TOKEN, headers={"WWW-Authenticate": "Bearer"})
    if (known := cache.get(token)) is not None:
        return known
    return await cache.verify_once(token, lambda: _verify(pool, token))


async def _verify(pool: AsyncConnectionPool, token: str) -> Principal:
    parts = split_token(token)
    if parts is None:
        raise HTTPException(401, BAD_TOKEN, headers={"WWW-Authenticate": "Bearer"})
    async with pool.connection() as conn:
        cur = await conn.execute(
            "UPDATE api_tokens t SET last_used_at = now() FROM users u "
            "WHERE t.token_id = %s AND t.revoked_at IS NULL AND u.user_id = t.user_id AND u.enabled "
            "RETURNING t.secret_hash, u.user_id, u.role, u.cities", (parts[0],))
        row = await cur.fetchone()
    if row is None or not secret_matches(parts[1], row[0]):
        raise HTTPException(401, BAD_TOKEN, headers={"WWW-Authenticate": "Bearer"})
    return Principal(row[1], row[2], None if row[2] == "admin" else frozenset(row[3]))


async def _caller(request: Request) -> Principal:
    return await authenticate(request.app.state.pool, request.app.state.tokens, bearer_token(request))


Caller = Annotated[Principal, Depends(_caller)]


def require(principal: Principal, *roles: Role, doing: str) -> None:
    """403 unless the caller has one of `roles` (admins may do everything)."""
    if principal.role != "admin" and principal.role not in roles:
        raise HTTPException(403, f"role {principal.role} may not {doing}")


def require_city(principal: Principal, city: str) -> None:
    if not principal.sees(city):
        raise HTTPException(404, "city not found")
