"""Live feed over WebSocket and Server-Sent Events: readings and alert changes, filtered.

WebSocket frames are JSON arrays of events (everything waiting is sent at once). Close codes:
4401 no or bad token (also when the token is revoked or expires, or the user is disabled, while the
stream is open), 4403 the user's role or cities changed (reconnect: the new stream has the new
scope), 4404 a city or device outside the caller's scope, 4408 dropped as too slow (the reason says
how far behind). SSE sends one `event:` per event, and `event: dropped` with the code and reason
before it ends a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated

import orjson
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from ops_api import queries
from ops_api.api.errors import READ
from ops_api.auth import BAD_TOKEN, Principal, TokenCache, authenticate, bearer_token, verify_now
from ops_api.live import Filter, LiveHub, Subscriber, frame_events, frame_text

router = APIRouter(prefix="/api/v1/live", tags=["live"])
KINDS = ("readings", "alert")
HEARTBEAT_S = 15.0
ACCESS_CHANGED = "access changed: role or cities; reconnect"
log = logging.getLogger("kota.api.live")

Cities = Annotated[list[str] | None, Query(description="only these cities (default: all of the caller's)")]
Domains = Annotated[list[str] | None, Query(description="only these domains")]
Devices = Annotated[list[str] | None, Query(alias="device_id", description="only these devices")]
Types = Annotated[list[str] | None, Query(alias="type", description="readings and/or alert (default both)")]


async def _filter(
    app: object,
    caller: Principal,
    cities: list[str] | None,
    domains: list[str] | None,
    devices: list[str] | None,
    types: list[str] | None,
) -> Filter:
    for city in cities or ():
        if not caller.sees(city):
            raise HTTPException(404, "city not found")
    if devices:
        async with app.state.pool.connection() as conn:  # type: ignore[attr-defined]
            for device_id in devices:
                if await queries.device_city(conn, caller.city_filter(), device_id) is None:
                    raise HTTPException(404, "device not found")
    unknown = set(types or ()) - set(KINDS)
    if unknown:
        raise HTTPException(422, f"unknown event type {sorted(unknown)[0]!r}; use readings or alert")
    return Filter(
        caller.cities,
        frozenset(cities or ()),
        frozenset(domains or ()),
        frozenset(devices or ()),
        frozenset(types or KINDS),
    )


@router.websocket("")
async def live_websocket(
    websocket: WebSocket, city: Cities = None, domain: Domains = None, device: Devices = None, kind: Types = None
) -> None:
    app = websocket.app
    try:
        token = bearer_token(websocket, in_query=True)  # type: ignore[arg-type]
        caller = await authenticate(app.state.pool, app.state.tokens, token)
        live_filter = await _filter(app, caller, city, domain, device, kind)
    except HTTPException as exc:
        await websocket.accept()  # accepted, so the client gets the close code and reason
        await websocket.close(code=4000 + exc.status_code, reason=str(exc.detail))
        return
    hub: LiveHub = app.state.hub
    subscriber = hub.subscribe(live_filter, caller, token)
    try:
        await hub.live_for(live_filter)
        await websocket.accept()
        await _serve(websocket, subscriber)
    finally:
        hub.unsubscribe(subscriber)


async def _serve(websocket: WebSocket, subscriber: Subscriber) -> None:
    async def write() -> None:
        while (frames := await subscriber.take()) is not None:
            await websocket.send_text(frame_text(frames))
        await websocket.close(code=subscriber.close_code, reason=subscriber.dropped or "dropped")

    async def read_until_gone() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await websocket.receive_text()  # clients say nothing; this notices them leaving

    tasks = {asyncio.create_task(write()), asyncio.create_task(read_until_gone())}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@router.get(
    "/sse",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"example": 'event: alert\ndata: {"type": "alert", "alert_id": 17}\n\n'}},
            "description": "a stream of `readings` and `alert` events",
        },
        **READ,
    },
)
async def live_sse(
    request: Request, city: Cities = None, domain: Domains = None, device: Devices = None, kind: Types = None
) -> StreamingResponse:
    """The live feed as Server-Sent Events, for clients without WebSocket (token in the Authorization
    header, or `?token=` for EventSource)."""
    token = bearer_token(request, in_query=True)
    caller = await authenticate(request.app.state.pool, request.app.state.tokens, token)
    live_filter = await _filter(request.app, caller, city, domain, device, kind)
    hub: LiveHub = request.app.state.hub
    subscriber = hub.subscribe(live_filter, caller, token)
    try:
        await hub.live_for(live_filter)  # as for the WebSocket: the stream starts once it is live
    except BaseException:
        hub.unsubscribe(subscriber)  # the client left while waiting: stream() never runs
        raise

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield b": connected\n\n"
            while True:
                try:
                    frames = await asyncio.wait_for(subscriber.take(), HEARTBEAT_S)
                except TimeoutError:
                    yield b": heartbeat\n\n"
                    continue
                if frames is None:
                    yield (
                        b"event: dropped\ndata: "
                        + orjson.dumps({"code": subscriber.close_code, "reason": subscriber.dropped or ""})
                        + b"\n\n"
                    )
                    return
                yield b"".join(
                    b"event: "
                    + (b"alert" if m.startswith(b'{"type":"alert"') else b"readings")
                    + b"\ndata: "
                    + m
                    + b"\n\n"
                    for m in frame_events(frames)
                )
        finally:
            hub.unsubscribe(subscriber)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def watch_access(app: FastAPI) -> None:
    """Act on changes of access the hub hears: forget the user's cached tokens at once (so the next
    REST call asks the database), then check their open streams again against the database: a token
    that no longer works closes with 4401, a changed role or set of cities with 4403."""
    hub: LiveHub = app.state.hub
    tokens: TokenCache = app.state.tokens
    checks: set[asyncio.Task[None]] = set()

    def changed(user_id: str | None) -> None:
        tokens.forget_user(user_id)
        streams = hub.subscribers(user_id)
        if streams:
            task = asyncio.create_task(_check_streams(app, streams), name="live-access-check")
            checks.add(task)
            task.add_done_callback(checks.discard)

    hub.access_changed = changed
    hub.listening = tokens.trust


async def _check_streams(app: FastAPI, streams: list[Subscriber]) -> None:
    by_token: dict[str, list[Subscriber]] = {}
    for stream in streams:
        if stream.token is not None and stream.principal is not None:
            by_token.setdefault(stream.token, []).append(stream)
    for token, same_token in by_token.items():
        try:
            now = await verify_now(app.state.pool, token)
        except HTTPException:
            for stream in same_token:
                stream.close(4401, BAD_TOKEN)
            continue
        except Exception:  # noqa: BLE001 - the database is away: checked again when LISTEN reconnects
            log.warning("live feed: could not check a stream's access again", exc_info=True)
            continue
        for stream in same_token:
            if stream.principal is not None and not stream.principal.same_access(now):
                stream.close(4403, ACCESS_CHANGED)
