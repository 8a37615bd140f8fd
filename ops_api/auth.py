"""Who is calling, and what they may see: bearer tokens, roles and city scope.

Every route depends on `Caller`. Scope errors never reveal another city's data: a device, alert or
city outside the caller's cities answers 404 exactly as if it did not exist.

Verified tokens are kept a few seconds (TokenCache), but only while the database can tell the API
that access changed: triggers on users and api_tokens NOTIFY `kota_access_changed` (migration 0009),
the live feed's LISTEN connection hears it (ops_api/live.py), and the user's entries are forgotten
before the next request is served. While that connection is down nothing is kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from psycopg_pool import AsyncConnectionPool

from ops_api.accounts import LIVE_TOKEN, Role, secret_matches, split_token

NO_TOKEN = "missing bearer token"  # noqa: S105 - error texts
BAD_TOKEN = "invalid or revoked token"  # noqa: S105 - expired tokens too
QUERY_TOKEN = "a token in the URL is accepted only by the live feed; send Authorization: Bearer"  # noqa: S105
MAX_CACHED_TOKENS = 10_000
log = logging.getLogger("kota.api.auth")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the user, their role and the cities they may see, and their token's expiry."""

    user_id: str
    role: Role
    cities: frozenset[str] | None  # None: every city (admin)
    token_id: str | None = None
    expires_at: float | None = None  # the token's expiry, Unix seconds; None: never

    def same_access(self, other: Principal) -> bool:
        """The same user with the same role and cities (what a live stream was opened with)."""
        return (self.user_id, self.role, self.cities) == (other.user_id, other.role, other.cities)

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

    Correct at once after a change of access, not `ttl_s` later: `forget_user` (on the database's
    NOTIFY) drops the user's entries, and a verification that was running meanwhile may have read the
    old rows, so it is neither kept nor shared with requests that arrive after the change (each
    change starts a new generation). Untrusted (`trusted` False: the NOTIFY connection is down, or
    not up yet), nothing is kept and every request asks the database.
    """

    def __init__(self, ttl_s: float, *, trusted: bool = True, max_entries: int = MAX_CACHED_TOKENS) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._verifying: dict[str, tuple[int, asyncio.Future[Principal]]] = {}
        self._generation = 0
        self._trusted = trusted

    async def verify_once(self, token: str, verify: Callable[[], Awaitable[Principal]]) -> Principal:
        """`verify()`'s result for `token`, shared with any caller already waiting for it."""
        running = self._verifying.get(token)
        if running is not None and running[0] == self._generation:
            pending = running[1]
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.cancelled() and not (task and task.cancelling()):
                    return await self.verify_once(token, verify)  # the verifier's client left: ask again
                raise
        generation = self._generation
        entry = (generation, asyncio.get_running_loop().create_future())
        pending = entry[1]
        self._verifying[token] = entry
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
            if generation == self._generation:  # no change of access announced while it ran
                self.put(token, principal)
            return principal
        finally:
            if self._verifying.get(token) is entry:
                del self._verifying[token]

    def get(self, token: str) -> Principal | None:
        hit = self._entries.get(token)
        if hit is None:
            return None
        if hit[0] < time.monotonic() or (hit[1].expires_at is not None and hit[1].expires_at <= time.time()):
            del self._entries[token]
            return None
        return hit[1]

    def put(self, token: str, principal: Principal) -> None:
        if not self._trusted:
            return
        if len(self._entries) >= self._max_entries:  # bounded: forget everything rather than grow
            self._entries.clear()
        self._entries[token] = (time.monotonic() + self._ttl_s, principal)

    def __len__(self) -> int:
        return len(self._entries)

    def forget_user(self, user_id: str | None) -> None:
        """The user's access changed (None: anyone's may have): verify their tokens again."""
        self._generation += 1
        if user_id is None:
            self._entries.clear()
        else:
            for token in [t for t, (_, p) in self._entries.items() if p.user_id == user_id]:
                del self._entries[token]

    def trust(self, trusted: bool) -> None:
        """Whether changes of access are being heard; either way, what was kept is forgotten."""
        self._trusted = trusted
        self.forget_user(None)


def bearer_token(request: Request, *, in_query: bool = False) -> str | None:
    """The Authorization header's bearer token; with `in_query` (the live feed only: browsers cannot
    set headers on WebSocket or EventSource requests), else `?token=`. Elsewhere a token in the URL
    is refused, not ignored: URLs end up in logs, histories and Referer headers."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    query = request.query_params.get("token")
    if query and not in_query:
        raise HTTPException(401, QUERY_TOKEN, headers={"WWW-Authenticate": "Bearer"})
    return query or None


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
            "UPDATE api_tokens t SET last_used_at = now() FROM users u "  # noqa: S608 - LIVE_TOKEN is a constant
            f"WHERE t.token_id = %s AND {LIVE_TOKEN} AND u.user_id = t.user_id AND u.enabled "
            "RETURNING t.secret_hash, u.user_id, u.role, u.cities, extract(epoch FROM t.expires_at)::float8",
            (parts[0],),
        )
        row = await cur.fetchone()
    if row is None or not secret_matches(parts[1], row[0]):
        raise HTTPException(401, BAD_TOKEN, headers={"WWW-Authenticate": "Bearer"})
    return Principal(row[1], row[2], None if row[2] == "admin" else frozenset(row[3]), parts[0], row[4])


async def verify_now(pool: AsyncConnectionPool, token: str) -> Principal:
    """What the database says about `token` now, whatever is cached (re-checking open live streams)."""
    return await _verify(pool, token)


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
