from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from ops_api import queries
from ops_api.api.deps import Connection

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])


class LatestValue(BaseModel):
    metric: str
    value: float
    unit: str
    ts: dt.datetime


class DeviceSummary(BaseModel):
    device_id: str
    city: str
    domain: str
    device_type: str
    district: str | None
    lat: float | None
    lon: float | None
    enabled: bool
    last_seen: dt.datetime | None = Field(description="time of the newest stored reading")
    latest: dict[str, dict[str, object]] = Field(description="metric → {value, unit, ts}")


class DeviceLatest(BaseModel):
    device_id: str
    values: list[LatestValue]


@router.get("", response_model=list[DeviceSummary])
async def list_devices(conn: Connection, city: str | None = None) -> list[dict[str, object]]:
    """Registered devices with their newest value per metric."""
    return await queries.list_devices(conn, city)


@router.get("/{device_id}/latest", response_model=DeviceLatest,
            responses={404: {"description": "device not registered"}})
async def device_latest(device_id: str, conn: Connection) -> DeviceLatest:
    """The newest stored value of each metric of one device."""
    if not await queries.device_exists(conn, device_id):
        raise HTTPException(status_code=404, detail="device not found")
    rows = await queries.latest_values(conn, device_id)
    return DeviceLatest(device_id=device_id, values=[LatestValue(**r) for r in rows])
