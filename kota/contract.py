"""The wire contract: the canonical reading, topic names and rejection reasons.

Defined once here and imported by every stage (simulators, ingest, processing, ops_api), so a
change to the shape of a reading is a change in one file.

MQTT (device side; docs/integrators.md is the integrators' version)
    kota/{city}/{domain}/{device_id}/telemetry     a device publishes its own readings (JSON)
    kota/{city}/{domain}/{device_id}/senml         the same, as SenML (RFC 8428)
    kota/{city}/gateway/{gateway_id}/telemetry     a gateway publishes for its bound devices
    kota/{city}/gateway/{gateway_id}/senml         the same, as SenML with names "{device}/{metric}"

Kafka (inside the platform)
    READINGS_TOPIC     one record per (MQTT message, device): key = device id (keeps each
                       device in order), value = `encode_device_batch(...)`
    DEADLETTER_TOPIC   one record per rejected message: original bytes, topic, reason, message
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, NamedTuple, get_args

import orjson

# -- topics ------------------------------------------------------------------------------------
READINGS_TOPIC = "kota.readings"
DEADLETTER_TOPIC = "kota.deadletter"
KAFKA_TOPICS = (READINGS_TOPIC, DEADLETTER_TOPIC)

MQTT_TOPIC_ROOT = "kota"
MQTT_INGEST_FILTER = f"{MQTT_TOPIC_ROOT}/+/+/+/+"
MQTT_SHARED_GROUP = "kota-ingest"
GATEWAY_SEGMENT = "gateway"
FORMATS = ("telemetry", "senml")
# The platform asks "is an ingest gateway subscribed?" by publishing here (MQTT 5: the broker's
# PUBACK says whether any subscriber matched). Gateways acknowledge it and forward nothing.
INGEST_PROBE_TOPIC = f"{MQTT_TOPIC_ROOT}/_platform/probe/ingest/telemetry"

Domain = Literal["environment", "traffic", "utilities"]
DOMAINS: tuple[str, ...] = get_args(Domain)

# Identifiers travel in topics and keys: keep them to a safe, lower-case alphabet.
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
MAX_ID_LENGTH = 64


def is_valid_id(value: str) -> bool:
    return 0 < len(value) <= MAX_ID_LENGTH and set(value) <= _ID_CHARS


def device_telemetry_topic(city: str, domain: str, device_id: str, fmt: str = "telemetry") -> str:
    return f"{MQTT_TOPIC_ROOT}/{city}/{domain}/{device_id}/{fmt}"


def gateway_telemetry_topic(city: str, gateway_id: str, fmt: str = "telemetry") -> str:
    return f"{MQTT_TOPIC_ROOT}/{city}/{GATEWAY_SEGMENT}/{gateway_id}/{fmt}"


def device_topics(city: str, domain: str, device_id: str) -> tuple[str, ...]:
    return tuple(device_telemetry_topic(city, domain, device_id, fmt) for fmt in FORMATS)


def gateway_topics(city: str, gateway_id: str) -> tuple[str, ...]:
    return tuple(gateway_telemetry_topic(city, gateway_id, fmt) for fmt in FORMATS)


@dataclass(frozen=True, slots=True)
class TelemetryTopic:
    city: str
    domain: str | None  # None on a gateway topic: its devices say their own
    sender_id: str  # the device, or the gateway, that published
    is_gateway: bool
    is_senml: bool


def parse_telemetry_topic(topic: str) -> TelemetryTopic | None:
    """A telemetry topic → its parts, or None if it is not one of the four forms above."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != MQTT_TOPIC_ROOT or parts[4] not in FORMATS:
        return None
    _, city, domain, sender_id, fmt = parts
    is_gateway = domain == GATEWAY_SEGMENT
    if not (is_gateway or domain in DOMAINS) or not is_valid_id(city) or not is_valid_id(sender_id):
        return None
    return TelemetryTopic(city, None if is_gateway else domain, sender_id, is_gateway, fmt == "senml")


# -- canonical measurements --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Metric:
    """A canonical measurement: FIWARE Smart Data Models name, canonical unit, physical range.

    `state`: the value is a code (0 off, 1 on, 2 fault), not a quantity; the anomaly detectors judge
    it only against its range (a lamp switching on is not a spike).
    `switched`: a switched load, such as a street light's power draw: at the bottom of its range it
    is off, not low. The detectors judge it only while it is on, against what it draws when on, so
    a lamp switching on at dusk or off at dawn is not a spike, a dip or a level shift.
    """

    name: str
    unit: str
    low: float
    high: float
    description: str
    state: bool = False
    switched: bool = False


def _m(name: str, unit: str, low: float, high: float, description: str, *, state: bool = False,
       switched: bool = False) -> Metric:
    return Metric(name, unit, low, high, description, state, switched)


# Units are SenML / UCUM symbols. relativeHumidity is in percent, currentLevel in centimetres.
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        _m("pm1", "ug/m3", 0, 2000, "PM1 concentration"),
        _m("pm25", "ug/m3", 0, 2000, "PM2.5 concentration"),
        _m("pm10", "ug/m3", 0, 3000, "PM10 concentration"),
        _m("no2", "ug/m3", 0, 5000, "nitrogen dioxide"),
        _m("o3", "ug/m3", 0, 3000, "ozone"),
        _m("co", "ug/m3", 0, 100000, "carbon monoxide"),
        _m("so2", "ug/m3", 0, 5000, "sulphur dioxide"),
        _m("hc", "ug/m3", 0, 5000, "hydrocarbons"),
        # ISPU as an agency publishes it (the day's index and each pollutant's sub-index), for
        # stations that report indices rather than concentrations. Stored as sent: the platform's own
        # ISPU is computed from concentrations.
        _m("ispu", "1", 0, 1000, "published ISPU, the day's index"),
        *(_m(f"ispu{p}", "1", 0, 1000, f"published ISPU sub-index for {p.upper()}")
          for p in ("Pm25", "Pm10", "So2", "Co", "O3", "No2")),
        _m("temperature", "Cel", -40, 70, "air temperature"),
        _m("relativeHumidity", "%RH", 0, 100, "relative humidity, percent"),
        _m("windSpeed", "m/s", 0, 100, "wind speed"),
        _m("windDirection", "deg", 0, 360, "wind direction"),
        _m("precipitation", "mm", 0, 500, "rain in the reporting period"),
        _m("LAeq", "dB", 0, 160, "equivalent continuous sound level, A-weighted"),
        _m("LAmax", "dB", 0, 180, "maximum sound level, A-weighted"),
        _m("currentLevel", "cm", -500, 5000, "water level at a gate, centimetres"),
        _m("flow", "m3/s", 0, 10000, "water flow"),
        _m("intensity", "veh/min", 0, 1000, "vehicles counted per minute"),
        _m("occupancy", "/", 0, 1, "lane occupancy, fraction 0-1"),
        _m("averageVehicleSpeed", "km/h", 0, 250, "mean vehicle speed"),
        _m("travelTime", "s", 0, 86400, "time to travel the corridor"),
        _m("waterConsumption", "m3/h", 0, 100000, "water consumption rate"),
        _m("pressure", "bar", 0, 50, "water network pressure"),
        _m("activePower", "kW", 0, 100000, "electric active power"),
        _m("activeEnergy", "kWh", 0, 1e12, "electric energy meter reading"),
        _m("powerState", "/", 0, 2, "street light state: 0 off, 1 on, 2 fault", state=True),
        _m("illuminanceLevel", "lx", 0, 200000, "illuminance"),
        _m("powerConsumption", "W", 0, 10000, "street light power draw", switched=True),
    )
}


# A value in a known convertible unit is converted to the canonical one: value * scale + offset.
UNIT_CONVERSIONS: dict[tuple[str, str], tuple[float, float]] = {
    ("K", "Cel"): (1.0, -273.15),
    ("m", "cm"): (100.0, 0.0),
    ("mm", "cm"): (0.1, 0.0),
    ("mg/m3", "ug/m3"): (1000.0, 0.0),
    ("m/s", "km/h"): (3.6, 0.0),
    ("km/h", "m/s"): (1 / 3.6, 0.0),
    ("W", "kW"): (0.001, 0.0),
    ("kW", "W"): (1000.0, 0.0),
    ("Wh", "kWh"): (0.001, 0.0),
    ("J", "kWh"): (1 / 3.6e6, 0.0),
    ("Pa", "bar"): (1e-5, 0.0),
    ("kPa", "bar"): (0.01, 0.0),
    ("%", "/"): (0.01, 0.0),
    ("/", "%RH"): (100.0, 0.0),
    ("%", "%RH"): (1.0, 0.0),
    ("m3/s", "m3/h"): (3600.0, 0.0),
    ("l/s", "m3/h"): (3.6, 0.0),
}


def convert_unit(value: float, from_unit: str, to_unit: str) -> float | None:
    """`value` in `to_unit`, or None when there is no known conversion."""
    if from_unit == to_unit:
        return value
    factor = UNIT_CONVERSIONS.get((from_unit, to_unit))
    if factor is None:
        return None
    scale, offset = factor
    return value * scale + offset


# -- the canonical reading ---------------------------------------------------------------------
class Reading(NamedTuple):
    """One measurement, as every stage after the gateway sees it (a NamedTuple: cheap to make)."""

    ts_ms: int  # event time, UTC epoch milliseconds
    city: str
    domain: str
    device_id: str
    metric: str
    value: float
    unit: str
    received_ms: int  # when the gateway received it, UTC epoch milliseconds
    source: str  # how it arrived, e.g. "mqtt-json"


WIRE_VERSION = 1


def encode_device_batch(readings: list[Reading]) -> bytes:
    """Readings of one device from one MQTT message → one Kafka record value.

    All readings must share city, domain, device, receive time and source; only
    (time, metric, value, unit) are repeated, which keeps records small.
    """
    first = readings[0]
    body = {
        "v": WIRE_VERSION,
        "city": first.city,
        "domain": first.domain,
        "device": first.device_id,
        "recv": first.received_ms,
        "src": first.source,
        "r": [[r.ts_ms, r.metric, r.value, r.unit] for r in readings],
    }
    return orjson.dumps(body)  # NaN never gets here: the gateway rejects it


def decode_device_batch(value: bytes) -> list[Reading]:
    body = orjson.loads(value)
    if body.get("v") != WIRE_VERSION:
        raise ValueError(f"unsupported wire version {body.get('v')!r}")
    city, domain, device, recv, src = body["city"], body["domain"], body["device"], body["recv"], body["src"]
    # tuple.__new__ skips the NamedTuple's generated __new__, a Python function call per reading:
    # 0.66 against 0.89 µs a reading for records of 50 (timeit), in the processor's hottest loop.
    return [_new_tuple(Reading, (int(ts), city, domain, device, metric, float(val), unit, recv, src))
            for ts, metric, val, unit in body["r"]]


_new_tuple = tuple.__new__


# -- rejections --------------------------------------------------------------------------------
class Reason(StrEnum):
    """Stable reason codes for rejected input. Integrators and dashboards key on these."""

    MALFORMED_JSON = "malformed_json"
    NOT_UTF8 = "not_utf8"
    OVERSIZED = "oversized"
    BAD_TOPIC = "bad_topic"
    BAD_SHAPE = "bad_shape"
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_DISABLED = "device_disabled"
    WRONG_CITY_OR_DOMAIN = "wrong_city_or_domain"
    NOT_BOUND = "device_not_bound"  # a gateway published for a device that is not bound to it
    UNKNOWN_METRIC = "unknown_metric"
    WRONG_UNIT = "wrong_unit"  # a unit that is neither the declared one nor convertible to it
    WRONG_TYPE = "wrong_type"
    NOT_FINITE = "not_finite"
    OUT_OF_RANGE = "out_of_range"
    TIME_IN_FUTURE = "time_in_future"
    TIME_TOO_OLD = "time_too_old"
    DUPLICATE = "duplicate"  # same device, metric and time as a reading accepted moments ago


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    message: str  # for a person: what was wrong and how to fix it


def encode_dead_letter(*, topic: str, payload: bytes, rejection: Rejection, received_ms: int) -> bytes:
    body = {
        "v": WIRE_VERSION,
        "reason": rejection.reason.value,
        "message": rejection.message,
        "topic": topic,
        "received_ms": received_ms,
        "payload_b64": base64.b64encode(payload).decode(),
    }
    return orjson.dumps(body)


def decode_dead_letter(value: bytes) -> dict[str, object]:
    body: dict[str, object] = orjson.loads(value)
    body["payload"] = base64.b64decode(str(body.pop("payload_b64")))
    return body


def is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
