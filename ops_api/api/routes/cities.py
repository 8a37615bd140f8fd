"""Cities, the Smart Environment and Smart Living views of one city, and the province summary."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from ops_api import queries
from ops_api.api.deps import Connection, Settings
from ops_api.api.errors import READ
from ops_api.api.routes import rules
from ops_api.auth import Caller, require_city

router = APIRouter(prefix="/api/v1", tags=["cities"])


class City(BaseModel):
    city: str
    devices: int
    online: int
    stale: int
    offline: int
    districts: list[str] | None


class PlacedDevice(BaseModel):
    """What every device row of a view starts with: which device, and where it is on the map."""

    device_id: str
    district: str | None
    lat: float | None
    lon: float | None


class AirQualityStation(PlacedDevice):
    ts: dt.datetime | None = Field(description="time of the newest reading in the averaging window")
    ispu: dict[str, Any] = Field(description="value (null above 500: see display), display, category, colour, hex")
    critical: str | None = Field(description="the pollutant with the highest sub-index")
    sub_indices: dict[str, float | None]
    window_minutes: int | None


class NoiseSensor(PlacedDevice):
    ts: dt.datetime | None
    laeq: float | None = Field(description="newest LAeq, dB(A)")
    lamax: float | None
    laeq_1h: float | None = Field(description="energy mean of the last hour's minute LAeq, dB(A)")
    zone: str
    limit_dba: float
    exceeds_limit: bool
    excess_db: float


class WaterGate(PlacedDevice):
    ts: dt.datetime | None
    level_cm: float | None
    siaga: int | None = Field(description="4 normal … 1 most severe")
    siaga_label: str | None
    rise_cm_per_h: float | None
    rising_fast: bool
    siaga3_cm: float
    siaga2_cm: float
    siaga1_cm: float
    rise_limit_cm_per_h: float


class Environment(BaseModel):
    city: str
    district: str | None
    air_quality: list[AirQualityStation]
    noise: list[NoiseSensor]
    water_levels: list[WaterGate]


class Corridor(PlacedDevice):
    ts: dt.datetime | None
    speed_kmh: float | None
    occupancy: float | None
    intensity: float | None
    free_flow_kmh: float
    congestion_index: float | None = Field(description="1 − speed / free-flow speed, 0 (free) … 1 (standstill)")
    congested: bool
    usual_speed_kmh: float | None = Field(description="mean for this local hour and weekday over recent weeks")
    usual_occupancy: float | None
    usual_hours: int
    speed_vs_usual_pct: float | None


class Meter(PlacedDevice):
    device_type: str
    metric: str
    latest: float | None
    unit: str | None
    ts: dt.datetime | None
    last_hour_mean: float | None
    baseline_mean: float | None = Field(description="mean of this local hour over the previous week")
    vs_baseline_pct: float | None
    suspected_leak: bool = Field(
        description=(
            "over the leak window (the last KOTA_API_LEAK_WINDOW_H hours) the flow never fell to within "
            "KOTA_API_LEAK_MIN_FLOW_M3H of the lowest it usually reaches in those hours of the day "
            "(median of the earlier days): water running that usually stops, the minimum-night-flow rule. "
            "False without an earlier day to compare with."
        )
    )
    leak_window_minutes: int = Field(description="minutes of the leak window with data (80% needed)")
    leak_window_min_flow: float | None = Field(description="lowest flow over the leak window")
    leak_usual_min_flow: float | None = Field(
        None,
        description="median, over up to KOTA_API_LEAK_HISTORY_DAYS earlier days, of the lowest flow in "
        "the same hours of the day",
    )
    leak_history_days: int = Field(0, description="earlier days with data in those hours")


class LightingDistrict(BaseModel):
    district: str
    total: int
    on: int
    off: int
    fault: int
    offline: int


class Living(BaseModel):
    city: str
    district: str | None
    traffic: list[Corridor]
    utilities: list[Meter]
    street_lighting: list[LightingDistrict]


class ProvinceCity(BaseModel):
    city: str
    devices: int
    devices_offline: int
    worst_ispu: dict[str, Any]
    gates_at_siaga: int
    worst_siaga: int | None
    open_alerts: dict[str, int] = Field(description="open (active or acknowledged) alerts by severity")


class Province(BaseModel):
    cities: list[ProvinceCity]


async def _visible_city(conn: Connection, caller: Caller, city: str) -> None:
    require_city(caller, city)
    if not await queries.city_exists(conn, city):
        raise HTTPException(404, "city not found")


@router.get("/cities", response_model=list[City], responses=READ)
async def list_cities(caller: Caller, conn: Connection, settings: Settings) -> list[dict[str, Any]]:
    """The caller's cities with device counts by status and their districts."""
    return await queries.cities(conn, caller.city_filter(), settings)


@router.get("/cities/{city}/environment", response_model=Environment, responses=READ)
async def environment(
    city: str, caller: Caller, conn: Connection, settings: Settings, district: str | None = None
) -> Environment:
    """Smart Environment: ISPU per station from real concentrations, noise against limits, and water
    levels with Siaga status and rate of rise per gate."""
    await _visible_city(conn, caller, city)
    noise, water = await queries.noise(conn, city, district, settings), await queries.water_levels(conn, city, district)
    await rules.apply_to_environment(conn, city, noise, water)  # limits and thresholds as the city's rules set them
    return Environment.model_validate(
        {
            "city": city,
            "district": district,
            "air_quality": await queries.air_quality(conn, city, district),
            "noise": noise,
            "water_levels": water,
        }
    )


@router.get("/cities/{city}/living", response_model=Living, responses=READ)
async def living(
    city: str, caller: Caller, conn: Connection, settings: Settings, district: str | None = None
) -> Living:
    """Smart Living: traffic per corridor against the usual, utilities against baseline with suspected
    leaks, and street lighting on/off/fault counts by district."""
    await _visible_city(conn, caller, city)
    return Living.model_validate(
        {
            "city": city,
            "district": district,
            "traffic": await queries.traffic(conn, city, district, settings),
            "utilities": await queries.utilities(conn, city, district, settings),
            "street_lighting": await queries.street_lights(conn, city, district, settings),
        }
    )


@router.get("/province", response_model=Province, responses=READ)
async def province(caller: Caller, conn: Connection, settings: Settings) -> Province:
    """Side by side, for each of the caller's cities: worst ISPU, gates at Siaga, open alerts by
    severity, devices offline."""
    return Province.model_validate({"cities": await queries.province(conn, caller.city_filter(), settings)})
