"""Devices: the city map as GeoJSON, detail, latest values, time series, and device management."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Annotated, Any, Literal

import orjson
import psycopg
from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from kota.contract import Domain
from kota.registry import DEVICE_TYPES, new_device, new_password, upsert_devices
from ops_api import accounts, queries
from ops_api.api.deps import Connection, RegistryChanged, Settings, Stack
from ops_api.api.errors import READ, responses
from ops_api.auth import Caller, Principal, require, require_city
from ops_api.series import Point, Resolution
from ops_api.series_cache import SeriesCache

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])
Status = Literal["online", "stale", "offline"]


class LatestValue(BaseModel):
    metric: str
    value: float
    unit: str
    ts: dt.datetime


class FeatureProperties(BaseModel):
    device_id: str
    city: str
    domain: str
    device_type: str
    district: str | None
    enabled: bool
    status: Status = Field(description="online, stale or offline, from the newest stored reading")
    last_seen: dt.datetime | None
    latest: dict[str, dict[str, Any]] = Field(description="metric → {value, unit, ts}")
    ispu: dict[str, Any] | None = Field(None, description="air-quality stations: ISPU with category and colour")


class Feature(BaseModel):
    type: Literal["Feature"] = "Feature"
    id: str
    geometry: dict[str, Any] | None = Field(description="GeoJSON Point [lon, lat], or null without a location")
    properties: FeatureProperties


class FeatureCollection(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "FeatureCollection",
                    "generated_at": "2026-11-22T08:00:00Z",
                    "features": [
                        {
                            "type": "Feature",
                            "id": "bandung-air-quality-001",
                            "geometry": {"type": "Point", "coordinates": [107.613, -6.887]},
                            "properties": {
                                "device_id": "bandung-air-quality-001",
                                "city": "bandung",
                                "domain": "environment",
                                "device_type": "air_quality",
                                "district": "coblong",
                                "enabled": True,
                                "status": "online",
                                "last_seen": "2026-11-22T07:59:58Z",
                                "latest": {"pm25": {"value": 41.2, "unit": "ug/m3", "ts": "2026-11-22T07:59:58Z"}},
                                "ispu": {
                                    "value": 96,
                                    "display": "96",
                                    "category": "Sedang",
                                    "category_en": "Moderate",
                                    "colour": "biru",
                                    "hex": "#1f6fd1",
                                },
                            },
                        }
                    ],
                }
            ]
        }
    )
    type: Literal["FeatureCollection"] = "FeatureCollection"
    generated_at: dt.datetime
    features: list[Feature]


class MetricDeclaration(BaseModel):
    unit: str
    low: float
    high: float


class DeviceDetail(BaseModel):
    device_id: str
    city: str
    domain: str
    device_type: str
    district: str | None
    lat: float | None
    lon: float | None
    enabled: bool
    gateway_id: str | None
    status: Status
    last_seen: dt.datetime | None
    open_alerts: int
    metrics: dict[str, MetricDeclaration] = Field(description="declared metrics: canonical unit and valid range")
    latest: list[LatestValue]
    created_at: dt.datetime
    updated_at: dt.datetime


class DeviceLatest(BaseModel):
    device_id: str
    values: list[LatestValue]


class Rejection(BaseModel):
    reason: str = Field(description="a stable reason code (docs/integrators.md, section 7)")
    message: str = Field(description="what was wrong, for a person")


class DeadLetter(BaseModel):
    received_at: dt.datetime = Field(description="when the gateway received the message")
    topic: str
    reasons: dict[str, int] = Field(description="every rejection of the message, counted by reason")
    rejections: list[Rejection] = Field(description="the first few, with what to fix")
    rejections_total: int
    payload_bytes: int
    payload_sha256: str
    payload_start_b64: str = Field(description="the payload's first 512 bytes, base64")


class DeviceRejections(BaseModel):
    device_id: str
    reader: Literal["starting", "catching up", "live", "unavailable"] = Field(
        description="this API process's reader of the dead-letter topic: the list is complete only when live"
    )
    dead_letters: list[DeadLetter] = Field(description="newest first: the last few the platform rejected")


class Series(BaseModel):
    device_id: str
    metric: str
    resolution: Resolution
    start: dt.datetime
    end: dt.datetime
    points: list[Point] = Field(description="ts is the reading's time, or the window's start")
    next_start: dt.datetime | None = Field(description="pass as `start` for the next page; null on the last page")


class NewDevice(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "device_id": "bandung-noise-042",
                    "city": "bandung",
                    "device_type": "noise",
                    "district": "coblong",
                    "lat": -6.887,
                    "lon": 107.613,
                }
            ]
        }
    )
    device_id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    city: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    device_type: str = Field(description=f"one of {', '.join(DEVICE_TYPES)}")
    district: str | None = Field(None, max_length=64)
    lat: float | None = Field(None, ge=-90, le=90)
    lon: float | None = Field(None, ge=-180, le=180)


class CreatedDevice(BaseModel):
    device: DeviceDetail
    mqtt_username: str
    mqtt_password: str = Field(description="shown once; only its hash is kept")


class DeviceChange(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"enabled": False}]})
    enabled: bool | None = None
    district: str | None = Field(None, max_length=64)
    lat: float | None = Field(None, ge=-90, le=90)
    lon: float | None = Field(None, ge=-180, le=180)


class SnapshotCache:
    """The city map for concurrent callers: one query per key per `ttl_s`, serialised once.

    Bounded whatever callers ask for (the key holds their `district` and `city` strings): at most
    `max_entries` answers, and a lock only while some request for its key is running.
    """

    def __init__(self, max_entries: int = 1000) -> None:
        self._max_entries = max_entries
        self._entries: dict[tuple[Any, ...], tuple[float, bytes]] = {}
        self._locks: dict[tuple[Any, ...], tuple[asyncio.Lock, list[int]]] = {}  # lock, [requests using it]

    @property
    def sizes(self) -> tuple[int, int]:
        """(answers kept, locks held): for tests."""
        return len(self._entries), len(self._locks)

    async def get(self, key: tuple[Any, ...], ttl_s: float, build: Any) -> bytes:
        hit = self._entries.get(key)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                hit = self._entries.get(key)
                if hit and hit[0] > time.monotonic():
                    return hit[1]
                body: bytes = await build()
                if len(self._entries) >= self._max_entries:
                    self._entries.clear()
                self._entries[key] = (time.monotonic() + ttl_s, body)
                return body
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]


def _feature(row: dict[str, Any]) -> dict[str, Any]:
    has_point = row["lat"] is not None and row["lon"] is not None
    return {
        "type": "Feature",
        "id": row["device_id"],
        "geometry": {"type": "Point", "coordinates": [row["lon"], row["lat"]]} if has_point else None,
        "properties": {
            "device_id": row["device_id"],
            "city": row["city"],
            "domain": row["domain"],
            "device_type": row["device_type"],
            "district": row["district"],
            "enabled": row["enabled"],
            "status": row["status"],
            "last_seen": row["last_seen"],
            "latest": row["latest"],
            "ispu": queries.ispu_view(row["ispu"], row["category"]) if row["category"] else None,
        },
    }


@router.get(
    "",
    response_class=Response,
    responses={200: {"model": FeatureCollection, "content": {"application/geo+json": {}}}, **READ},
)
async def list_devices(
    request: Request,
    caller: Caller,
    conn: Connection,
    settings: Settings,
    city: str | None = None,
    domain: Domain | None = None,
    district: str | None = None,
) -> Response:
    """Devices of the caller's cities as a GeoJSON FeatureCollection: status, latest values, district,
    and ISPU for air-quality stations. Shared by concurrent callers for `KOTA_API_SNAPSHOT_CACHE_S`."""
    if city is not None:
        require_city(caller, city)

    async def build() -> bytes:
        rows = await queries.devices(conn, caller.city_filter(), settings, city=city, domain=domain, district=district)
        return orjson.dumps(
            {
                "type": "FeatureCollection",
                "generated_at": dt.datetime.now(dt.UTC),
                "features": [_feature(r) for r in rows],
            }
        )

    cache: SnapshotCache = request.app.state.snapshots
    body = await cache.get((caller.cities, city, domain, district), settings.snapshot_cache_s, build)
    return Response(body, media_type="application/geo+json")


async def _detail(conn: Any, caller: Principal, settings: Any, device_id: str) -> DeviceDetail:
    row = await queries.device(conn, caller.city_filter(), settings, device_id)
    if row is None:
        raise HTTPException(404, "device not found")
    latest = [LatestValue(**r) for r in await queries.latest_values(conn, device_id)]
    return DeviceDetail(**row, latest=latest)


@router.get("/{device_id}", response_model=DeviceDetail, responses=READ)
async def device_detail(device_id: str, caller: Caller, conn: Connection, settings: Settings) -> DeviceDetail:
    """One device: where it is, what it declares (units and valid ranges), its status and latest values."""
    return await _detail(conn, caller, settings, device_id)


def _json(content: Any) -> Response:
    """JSON straight from rows, for the hot read endpoints: the route's response_model still
    documents the shape, but validating and serialising through pydantic cost more than the query
    (bench/api.py). Times come out as pydantic writes them (UTC as `Z`)."""
    return Response(orjson.dumps(content, option=orjson.OPT_UTC_Z), media_type="application/json")


@router.get("/{device_id}/latest", response_model=DeviceLatest, responses=READ)
async def device_latest(device_id: str, caller: Caller, conn: Connection) -> Response:
    """The newest stored value of each metric of one device."""
    rows = await queries.latest_values_in_scope(conn, caller.city_filter(), device_id)
    if rows is None:
        raise HTTPException(404, "device not found")
    return _json({"device_id": device_id, "values": rows})


@router.get("/{device_id}/rejections", response_model=DeviceRejections, responses=READ)
async def device_rejections(request: Request, device_id: str, caller: Caller, conn: Connection) -> Response:
    """What the platform refused of this device's messages lately, newest first: each message's
    reasons, counted, what to fix, and the payload's first bytes (`kota deadletters --device`, for
    whoever holds an API token). Kept per API process from the dead-letter topic: the last day when
    it started, then as the gateway writes; the newest few per device, of its present city. A
    gateway's messages, its devices' values in them included, are under the gateway's id, which
    this route takes too."""
    city = await queries.sender_city(conn, caller.city_filter(), device_id)
    if city is None:
        raise HTTPException(404, "device not found")
    reader = request.app.state.rejection_reader
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=reader.window_s)
    letters = reader.recent.of(city, device_id, since)
    return _json({"device_id": device_id, "reader": reader.state, "dead_letters": letters})


@router.get("/{device_id}/series", response_model=Series, responses=READ)
async def device_series(
    request: Request,
    device_id: str,
    caller: Caller,
    metric: Annotated[str, Query(min_length=1, max_length=64, examples=["pm25"])],
    resolution: Resolution = "1m",
    start: Annotated[dt.datetime | None, Query(description="inclusive; default: end minus one day")] = None,
    end: Annotated[dt.datetime | None, Query(description="exclusive; default: now")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1440,
) -> Response:
    """A device's metric at raw, 1-minute, hourly or daily resolution, oldest first. Every page is an
    index range scan of its table, so it stays fast on months of data; follow `next_start` to page on.
    A page asked for again reuses its settled points' JSON while the data under them is unchanged, and
    within `KOTA_API_SERIES_FRESH_S` of the last check is answered as checked then."""
    start_given, end_given = start is not None, end is not None
    end = _aware(end) if end else dt.datetime.now(dt.UTC)
    start = _aware(start) if start else end - dt.timedelta(days=1)
    if start >= end:
        raise HTTPException(422, "start must be before end")

    def render(count: int, last: dt.datetime | None) -> tuple[bytes, bytes]:
        """The body around its points."""
        next_start = last + dt.timedelta(microseconds=1) if count == limit and last else None
        head = orjson.dumps(
            {
                "device_id": device_id,
                "metric": metric,
                "resolution": resolution,
                "start": start,
                "end": end,
                "next_start": next_start,
            },
            option=orjson.OPT_UTC_Z,
        )
        return head[:-1] + b',"points":[', b"]}"

    cache: SeriesCache = request.app.state.series_cache
    body = await cache.page(
        request.app.state.pool.connection,
        caller.city_filter(),
        device_id,
        metric,
        resolution,
        start,
        end,
        limit=limit,
        start_given=start_given,
        end_given=end_given,
        render=render,
    )
    if body is None:
        raise HTTPException(404, "device not found")
    return Response(body, media_type="application/json")


def _aware(ts: dt.datetime) -> dt.datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)


@router.post("", response_model=CreatedDevice, status_code=201, responses=responses(401, 403, 404, 409))
async def create_device(
    body: NewDevice,
    caller: Caller,
    conn: Connection,
    stack: Stack,
    settings: Settings,
    registry_changed: RegistryChanged,
) -> CreatedDevice:
    """Register a device of a known type in one of the caller's cities (integrators and admins). The
    answer holds its MQTT password, once; the broker accepts the device within a second."""
    require(caller, "integrator", doing="manage devices")
    require_city(caller, body.city)
    if body.device_type not in DEVICE_TYPES:
        raise HTTPException(422, f"unknown device type {body.device_type!r}; one of {', '.join(DEVICE_TYPES)}")
    try:
        device = new_device(
            body.device_id, body.city, body.device_type, district=body.district, lat=body.lat, lon=body.lon
        )
    except ValueError as exc:  # a reserved id (kota.contract.is_reserved_id)
        raise HTTPException(422, str(exc)) from None
    password = new_password()

    def register() -> None:
        with psycopg.connect(stack.postgres_dsn) as sync_conn:
            if sync_conn.execute("SELECT 1 FROM devices WHERE device_id = %s", (device.device_id,)).fetchone():
                raise HTTPException(409, "device id already registered")
            try:
                upsert_devices(sync_conn, [device], {device.device_id: password})
            except psycopg.errors.UniqueViolation:  # a gateway holds the id (migration 0010)
                raise HTTPException(409, "id already taken by a gateway") from None
            accounts.record(
                sync_conn,
                caller.user_id,
                "device.created",
                "device",
                device.device_id,
                device.city,
                {"device_type": device.device_type, "district": device.district},
            )
        registry_changed()

    await asyncio.to_thread(register)
    return CreatedDevice(
        device=await _detail(conn, caller, settings, device.device_id),
        mqtt_username=device.device_id,
        mqtt_password=password,
    )


@router.patch("/{device_id}", response_model=DeviceDetail, responses=responses(401, 403, 404))
async def change_device(
    device_id: str,
    body: DeviceChange,
    caller: Caller,
    conn: Connection,
    settings: Settings,
    registry_changed: RegistryChanged,
) -> DeviceDetail:
    """Enable or disable a device, or move it (integrators and admins). Disabling closes its MQTT access."""
    require(caller, "integrator", doing="manage devices")
    city = await queries.device_city(conn, caller.city_filter(), device_id)
    if city is None:
        raise HTTPException(404, "device not found")
    changes = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None or k != "enabled"}
    if changes:
        async with conn.transaction():
            columns = ", ".join(f"{name} = %({name})s" for name in changes)  # names from the model, not the caller
            await conn.execute(
                f"UPDATE devices SET {columns}, updated_at = now() WHERE device_id = %(device_id)s",  # noqa: S608
                {**changes, "device_id": device_id},
            )
            await accounts.record_async(conn, caller.user_id, "device.changed", "device", device_id, city, changes)
        if "enabled" in changes:
            await asyncio.to_thread(registry_changed)
    return await _detail(conn, caller, settings, device_id)
