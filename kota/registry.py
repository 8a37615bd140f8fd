"""The device registry: which devices exist, where they are, and what they may send.

A device declares its metrics; each metric carries its canonical unit and valid range, taken
from the contract's catalogue unless the integrator narrows the range for that device.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
from dataclasses import asdict, dataclass, field

import psycopg
from psycopg import sql

from kota.contract import DOMAINS, METRICS, is_reserved_id, is_valid_id


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """What a device may send for one metric: the canonical unit and the valid range."""

    unit: str
    low: float
    high: float


# Device types and the metrics each declares by default.
DEVICE_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "air_quality": ("environment", ("pm25", "pm10", "no2", "o3", "co", "so2", "temperature", "relativeHumidity")),
    "noise": ("environment", ("LAeq", "LAmax")),
    "water_level": ("environment", ("currentLevel",)),
    "traffic_corridor": ("traffic", ("averageVehicleSpeed", "occupancy", "intensity")),
    "water_meter": ("utilities", ("waterConsumption", "pressure")),
    "electricity_meter": ("utilities", ("activePower", "activeEnergy")),
    "street_light": ("utilities", ("powerState", "powerConsumption")),
    "flood_siren": ("environment", ("sirenState",)),
}


def default_metrics(device_type: str) -> dict[str, MetricSpec]:
    _, names = DEVICE_TYPES[device_type]
    return {n: MetricSpec(METRICS[n].unit, METRICS[n].low, METRICS[n].high) for n in names}


@dataclass(frozen=True, slots=True)
class Device:
    """A registered device: where it is, what it measures, and who may publish for it."""

    device_id: str
    city: str
    domain: str
    device_type: str
    district: str | None = None
    lat: float | None = None
    lon: float | None = None
    metrics: dict[str, MetricSpec] = field(default_factory=dict)
    enabled: bool = True
    gateway_id: str | None = None  # the gateway device allowed to publish for it, if any

    def __post_init__(self) -> None:
        if not is_valid_id(self.device_id):
            raise ValueError(f"device id {self.device_id!r}: use 1-64 of a-z 0-9 - _ .")
        check_not_reserved(self.device_id)
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
    return Device(device_id, city, domain, device_type, metrics=default_metrics(device_type), **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Gateway:
    """One MQTT connection publishing for many devices of one city."""

    gateway_id: str
    city: str
    enabled: bool = True

    def __post_init__(self) -> None:
        if not is_valid_id(self.gateway_id) or not is_valid_id(self.city):
            raise ValueError("gateway id and city: use 1-64 of a-z 0-9 - _ .")
        check_not_reserved(self.gateway_id)


def check_not_reserved(identity: str) -> None:
    if is_reserved_id(identity):
        raise ValueError(
            f"id {identity!r} is reserved for the platform (kota-*, kota_*, postgres, admin, root, "
            "mosquitto): choose another"
        )


# -- MQTT credentials --------------------------------------------------------------------------
PASSWORD_ITERATIONS = 1000


def new_password() -> str:
    """A random device password, shown once to the integrator; only its hash is stored."""
    return secrets.token_urlsafe(18)


def hash_mqtt_password(password: str, *, salt: bytes | None = None) -> str:
    """Mosquitto's `$7$` format (salted PBKDF2-SHA512), so the broker checks it natively."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PASSWORD_ITERATIONS, 64)
    return f"$7${PASSWORD_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _metrics_json(device: Device) -> str:
    return json.dumps({name: asdict(spec) for name, spec in device.metrics.items()})


def upsert_devices(conn: psycopg.Connection, devices: list[Device], passwords: dict[str, str] | None = None) -> None:
    """Register or update devices. A device's password changes only when one is given for it."""
    passwords = passwords or {}
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO devices (device_id, city, domain, device_type, district, lat, lon, metrics, enabled,
                                    gateway_id, mqtt_password_hash)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s)
               ON CONFLICT (device_id) DO UPDATE SET
                 city = EXCLUDED.city, domain = EXCLUDED.domain, device_type = EXCLUDED.device_type,
                 district = EXCLUDED.district, lat = EXCLUDED.lat, lon = EXCLUDED.lon,
                 metrics = EXCLUDED.metrics, enabled = EXCLUDED.enabled, gateway_id = EXCLUDED.gateway_id,
                 mqtt_password_hash = coalesce(EXCLUDED.mqtt_password_hash, devices.mqtt_password_hash),
                 updated_at = now()""",
            [
                (
                    d.device_id,
                    d.city,
                    d.domain,
                    d.device_type,
                    d.district,
                    d.lat,
                    d.lon,
                    _metrics_json(d),
                    d.enabled,
                    d.gateway_id,
                    hash_mqtt_password(passwords[d.device_id]) if d.device_id in passwords else None,
                )
                for d in devices
            ],
        )


def upsert_gateway(conn: psycopg.Connection, gateway: Gateway, password: str | None = None) -> None:
    conn.execute(
        """INSERT INTO gateways (gateway_id, city, enabled, mqtt_password_hash) VALUES (%s, %s, %s, %s)
           ON CONFLICT (gateway_id) DO UPDATE SET city = EXCLUDED.city, enabled = EXCLUDED.enabled,
             mqtt_password_hash = coalesce(EXCLUDED.mqtt_password_hash, gateways.mqtt_password_hash),
             updated_at = now()""",
        (gateway.gateway_id, gateway.city, gateway.enabled, hash_mqtt_password(password) if password else None),
    )


def load_gateways(conn: psycopg.Connection) -> dict[str, Gateway]:
    rows = conn.execute("SELECT gateway_id, city, enabled FROM gateways ORDER BY gateway_id").fetchall()
    return {r[0]: Gateway(r[0], r[1], r[2]) for r in rows}


@dataclass(frozen=True, slots=True)
class MqttAccount:
    """What the broker needs to know about one sender: who, its password hash, where it may write,
    and what it may read (its commands: kota.commands)."""

    username: str
    password_hash: str | None
    write_topics: tuple[str, ...]
    read_topics: tuple[str, ...] = ()


def mqtt_accounts(conn: psycopg.Connection) -> list[MqttAccount]:
    """Every enabled device and gateway, with the topics it may publish to (its own only) and read.

    A device reads its own command topic and writes its own reply topic; a gateway does both for
    each enabled device bound to it, which may have no connection of its own."""
    from kota.contract import device_command_topic, device_reply_topic, device_topics, gateway_topics

    accounts = [
        MqttAccount(
            r[0],
            r[3],
            (*device_topics(r[1], r[2], r[0]), device_reply_topic(r[1], r[2], r[0])),
            (device_command_topic(r[1], r[2], r[0]),),
        )
        for r in conn.execute(
            "SELECT device_id, city, domain, mqtt_password_hash FROM devices WHERE enabled ORDER BY device_id"
        )
    ]
    bound: dict[str, list[tuple[str, str, str]]] = {}
    for device_id, city, domain, gateway_id in conn.execute(
        "SELECT device_id, city, domain, gateway_id FROM devices WHERE enabled AND gateway_id IS NOT NULL "
        "ORDER BY device_id"
    ):
        bound.setdefault(gateway_id, []).append((city, domain, device_id))
    accounts += [
        MqttAccount(
            r[0],
            r[2],
            (*gateway_topics(r[1], r[0]), *(device_reply_topic(*d) for d in bound.get(r[0], []))),
            tuple(device_command_topic(*d) for d in bound.get(r[0], [])),
        )
        for r in conn.execute(
            "SELECT gateway_id, city, mqtt_password_hash FROM gateways WHERE enabled ORDER BY gateway_id"
        )
    ]
    # Migration 0010 refuses reserved ids; this keeps a row that got in some other way out of the broker.
    return [a for a in accounts if not is_reserved_id(a.username)]


def enabled_identity(conn: psycopg.Connection, identity: str) -> bool:
    """A registered, enabled device or gateway of that id (what a client certificate may name)."""
    return (
        conn.execute(
            "SELECT 1 FROM devices WHERE device_id = %s AND enabled "
            "UNION ALL SELECT 1 FROM gateways WHERE gateway_id = %s AND enabled",
            (identity, identity),
        ).fetchone()
        is not None
    )


def _set_on_account(conn: psycopg.Connection, identity: str, column: str, value: object) -> bool:
    """Set one column of the device, or else the gateway, of that id; False when there is neither.
    Devices and gateways share one id namespace (migration 0010), so at most one row matches."""
    for table, key in (("devices", "device_id"), ("gateways", "gateway_id")):
        statement = sql.SQL("UPDATE {} SET {} = %s, updated_at = now() WHERE {} = %s").format(
            sql.Identifier(table), sql.Identifier(column), sql.Identifier(key)
        )
        if conn.execute(statement, (value, identity)).rowcount == 1:
            return True
    return False


def set_enabled(conn: psycopg.Connection, device_id: str, enabled: bool) -> bool:
    """Enable or disable a device (or a gateway) by id."""
    return _set_on_account(conn, device_id, "enabled", enabled)


def load_devices(conn: psycopg.Connection, city: str | None = None) -> dict[str, Device]:
    query = "SELECT device_id, city, domain, device_type, district, lat, lon, metrics, enabled, gateway_id FROM devices"
    rows = conn.execute(
        query + (" WHERE city = %s" if city else "") + " ORDER BY device_id", (city,) if city else ()
    ).fetchall()
    return {
        row[0]: Device(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            {n: MetricSpec(**spec) for n, spec in row[7].items()},
            row[8],
            row[9],
        )
        for row in rows
    }


def device_ranges(conn: psycopg.Connection, device_ids: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """Each listed device's declared metric ranges, (low, high) by metric; devices not in the registry are left out."""
    rows = conn.execute("SELECT device_id, metrics FROM devices WHERE device_id = ANY(%s)", (device_ids,)).fetchall()
    return {
        device_id: {name: ((spec := MetricSpec(**raw)).low, spec.high) for name, raw in metrics.items()}
        for device_id, metrics in rows
    }


def registry_version(conn: psycopg.Connection) -> tuple[int, ...]:
    """Changes whenever a transaction that wrote devices or gateways commits (migration 0006)."""
    row = conn.execute("SELECT version FROM registry_version").fetchone()
    assert row is not None  # the migration inserts the one row
    return tuple(row)


# -- rate limits -------------------------------------------------------------------------------
def set_rate_limit(conn: psycopg.Connection, identity: str, per_s: float | None) -> bool:
    """Give a device or gateway a message rate of its own (None: the default; 0: no limit)."""
    if per_s is not None and not (math.isfinite(per_s) and per_s >= 0):
        raise ValueError("a rate limit is a finite number of messages per second, 0 or more")
    return _set_on_account(conn, identity, "rate_limit_per_s", per_s)


def load_rate_limits(conn: psycopg.Connection) -> dict[str, float]:
    """The accounts with a rate of their own: id → messages per second (0: no limit)."""
    rows = conn.execute(
        "SELECT device_id, rate_limit_per_s FROM devices WHERE rate_limit_per_s IS NOT NULL "
        "UNION ALL SELECT gateway_id, rate_limit_per_s FROM gateways "
        "WHERE rate_limit_per_s IS NOT NULL"
    ).fetchall()
    return {r[0]: float(r[1]) for r in rows}


def set_mqtt_password(conn: psycopg.Connection, identity: str, password: str) -> bool:
    """A new MQTT password for a device or gateway (only its hash is kept); False when there is none."""
    return _set_on_account(conn, identity, "mqtt_password_hash", hash_mqtt_password(password))
