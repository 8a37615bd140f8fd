"""The device registry: which devices exist, where they are, and what they may send.

A device declares its metrics; each metric carries its canonical unit and valid range, taken
from the contract's catalogue unless the integrator narrows the range for that device.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import psycopg

from kota.contract import DOMAINS, METRICS, is_valid_id


@dataclass(frozen=True, slots=True)
class MetricSpec:
    unit: str
    low: float
    high: float


# Device types and the metrics each declares by default.
DEVICE_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "air_quality": ("environment", ("pm25", "pm10", "no2", "o3", "co", "so2", "temperature",
                                    "relativeHumidity")),
    "noise": ("environment", ("LAeq", "LAmax")),
    "water_level": ("environment", ("currentLevel",)),
    "traffic_corridor": ("traffic", ("averageVehicleSpeed", "occupancy", "intensity")),
    "water_meter": ("utilities", ("waterConsumption", "pressure")),
    "electricity_meter": ("utilities", ("activePower", "activeEnergy")),
    "street_light": ("utilities", ("powerState", "powerConsumption")),
}


def default_metrics(device_type: str) -> dict[str, MetricSpec]:
    _, names = DEVICE_TYPES[device_type]
    return {n: MetricSpec(METRICS[n].unit, METRICS[n].low, METRICS[n].high) for n in names}


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    city: str
    domain: str
    device_type: str
    district: str | None = None
    lat: float | None = None
    lon: float | None = None
    metrics: dict[str, MetricSpec] = field(default_factory=dict)
    enabled: bool = True

    def __post_init__(self) -> None:
        if not is_valid_id(self.device_id):
            raise ValueError(f"device id {self.device_id!r}: use 1-64 of a-z 0-9 - _ .")
        if not is_valid_id(self.city):
            raise ValueError(f"city {self.city!r}: use 1-64 of a-z 0-9 - _ .")
        if self.domain not in DOMAINS:
            raise ValueError(f"domain {self.domain!r}: one of {', '.join(DOMAINS)}")
        unknown = set(self.metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; known: {sorted(METRICS)}")


def new_device(device_id: str, city: str, device_type: str, **kwargs: object) -> Device:
    """A device of a known type, declaring that type's default metrics."""
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device type {device_type!r}: one of {', '.join(DEVICE_TYPES)}")
    domain, _ = DEVICE_TYPES[device_type]
    return Device(device_id, city, domain, device_type, metrics=default_metrics(device_type),
                  **kwargs)  # type: ignore[arg-type]


def _metrics_json(device: Device) -> str:
    return json.dumps({name: asdict(spec) for name, spec in device.metrics.items()})


def upsert_devices(conn: psycopg.Connection, devices: list[Device]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO devices (device_id, city, domain, device_type, district, lat, lon, metrics, enabled)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s)
               ON CONFLICT (device_id) DO UPDATE SET
                 city = EXCLUDED.city, domain = EXCLUDED.domain, device_type = EXCLUDED.device_type,
                 district = EXCLUDED.district, lat = EXCLUDED.lat, lon = EXCLUDED.lon,
                 metrics = EXCLUDED.metrics, enabled = EXCLUDED.enabled, updated_at = now()""",
            [(d.device_id, d.city, d.domain, d.device_type, d.district, d.lat, d.lon, _metrics_json(d),
              d.enabled) for d in devices],
        )


def set_enabled(conn: psycopg.Connection, device_id: str, enabled: bool) -> bool:
    cur = conn.execute("UPDATE devices SET enabled = %s, updated_at = now() WHERE device_id = %s",
                       (enabled, device_id))
    return cur.rowcount == 1


def load_devices(conn: psycopg.Connection, city: str | None = None) -> dict[str, Device]:
    query = ("SELECT device_id, city, domain, device_type, district, lat, lon, metrics, enabled "
             "FROM devices")
    rows = conn.execute(query + (" WHERE city = %s" if city else "") + " ORDER BY device_id",
                        (city,) if city else ()).fetchall()
    return {
        row[0]: Device(row[0], row[1], row[2], row[3], row[4], row[5], row[6],
                       {n: MetricSpec(**spec) for n, spec in row[7].items()}, row[8])
        for row in rows
    }
