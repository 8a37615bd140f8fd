"""The wire contract: the canonical reading, topic names and rejection reasons.

Defined once here and imported by every stage (simulators, ingest, processing, ops_api), so a
change to the shape of a reading is a change in one file.

MQTT (device side; docs/integrators.md is the integrators' version)
    kota/{city}/{domain}/{device_id}/telemetry     a device publishes its own readings (JSON)
    kota/{city}/{domain}/{device_id}/senml         the same, as SenML (RFC 8428)
    kota/{city}/gateway/{gateway_id}/telemetry     a gateway publishes for its bound devices
    kota/{city}/gateway/{gateway_id}/senml         the same, as SenML with names "{device}/{metric}"
    kota/{city}/{domain}/{device_id}/command       the platform's commands to one device (kota.commands)
    kota/{city}/{domain}/{device_id}/command/reply the device's acknowledgement and result

Kafka (inside the platform)
    READINGS_TOPIC     one record per (MQTT message, device): key = device id (keeps each
                       device in order), value = `encode_device_batch(...)`
    DEADLETTER_TOPIC   one record per rejected message: original bytes, topic, reason, message
"""

from __future__ import annotations

import base64
import hashlib
import math
import sys
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, NamedTuple, get_args

import orjson

# -- topics ------------------------------------------------------------------------------------
READINGS_TOPIC = "kota.readings"
DEADLETTER_TOPIC = "kota.deadletter"
KAFKA_TOPICS = (READINGS_TOPIC, DEADLETTER_TOPIC)
# The processor's consumer group (KOTA_PROCESSOR_GROUP_ID); its offsets live in PostgreSQL.
PROCESSOR_GROUP = "kota-processor"

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


# Devices, gateways and the platform's own accounts share one broker user namespace: a device named
# like a system account would share (and, on Mosquitto 2.0.11, replace) its password. Migration 0010
# refuses the same ids in the database.
RESERVED_ID_PREFIXES = ("kota-", "kota_")
RESERVED_IDS = frozenset({"postgres", "admin", "root", "mosquitto"})


def is_reserved_id(value: str) -> bool:
    """An id kept for the platform's own accounts: no device or gateway may take it."""
    lowered = value.lower()
    return lowered.startswith(RESERVED_ID_PREFIXES) or lowered in RESERVED_IDS


def device_telemetry_topic(city: str, domain: str, device_id: str, fmt: str = "telemetry") -> str:
    return f"{MQTT_TOPIC_ROOT}/{city}/{domain}/{device_id}/{fmt}"


def gateway_telemetry_topic(city: str, gateway_id: str, fmt: str = "telemetry") -> str:
    return f"{MQTT_TOPIC_ROOT}/{city}/{GATEWAY_SEGMENT}/{gateway_id}/{fmt}"


def device_topics(city: str, domain: str, device_id: str) -> tuple[str, ...]:
    return tuple(device_telemetry_topic(city, domain, device_id, fmt) for fmt in FORMATS)


def gateway_topics(city: str, gateway_id: str) -> tuple[str, ...]:
    return tuple(gateway_telemetry_topic(city, gateway_id, fmt) for fmt in FORMATS)


COMMAND_SEGMENT = "command"
REPLY_SEGMENT = "reply"
# What the commander subscribes to and publishes on (its ACL, deploy/mqtt_access.py). The ingest
# account is denied both: a command is not a reading, and would otherwise reach its 5-level filter.
COMMAND_TOPICS = f"{MQTT_TOPIC_ROOT}/+/+/+/{COMMAND_SEGMENT}"
REPLY_TOPICS = f"{MQTT_TOPIC_ROOT}/+/+/+/{COMMAND_SEGMENT}/{REPLY_SEGMENT}"
COMMAND_TREE = f"{MQTT_TOPIC_ROOT}/+/+/+/{COMMAND_SEGMENT}/#"  # both of the above


def device_command_topic(city: str, domain: str, device_id: str) -> str:
    """Where the platform publishes commands for one device (only that device may read it)."""
    return f"{MQTT_TOPIC_ROOT}/{city}/{domain}/{device_id}/{COMMAND_SEGMENT}"


def device_reply_topic(city: str, domain: str, device_id: str) -> str:
    """Where one device acknowledges and answers its commands (only it, or its gateway, may write)."""
    return f"{device_command_topic(city, domain, device_id)}/{REPLY_SEGMENT}"


def parse_reply_topic(topic: str) -> tuple[str, str, str] | None:
    """A reply topic → (city, domain, device id), or None if it is not one."""
    parts = topic.split("/")
    if len(parts) != 6 or parts[0] != MQTT_TOPIC_ROOT or parts[4:] != [COMMAND_SEGMENT, REPLY_SEGMENT]:
        return None
    _, city, domain, device_id, _, _ = parts
    if domain not in DOMAINS or not is_valid_id(city) or not is_valid_id(device_id):
        return None
    return city, domain, device_id


@dataclass(frozen=True, slots=True)
class TelemetryTopic:
    """A telemetry topic taken apart: who published, for which city and domain, in which form."""

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


def _m(
    name: str, unit: str, low: float, high: float, description: str, *, state: bool = False, switched: bool = False
) -> Metric:
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
        *(
            _m(f"ispu{p}", "1", 0, 1000, f"published ISPU sub-index for {p.upper()}")
            for p in ("Pm25", "Pm10", "So2", "Co", "O3", "No2")
        ),
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
        _m("sirenState", "/", 0, 1, "flood siren: 0 silent, 1 sounding", state=True),
    )
}


@dataclass(frozen=True, slots=True)
class Relation:
    """Two metrics of one device that keep a physical relation, judged together by the detectors
    (processing/kernels.py, relation_batch): the primary is predicted from the reference, as a
    share of it (`form` "ratio") or at an offset from it ("offset"), learnt per device. When one of
    the two sensors drifts or fails, the relation breaks while each metric may still look usual on
    its own; the anomaly (`inconsistent`) is stored on the primary. Readings are paired when a
    device reports both at the same time, as one message does."""

    primary: str
    reference: str
    form: str  # "ratio" or "offset"

    @property
    def series_name(self) -> str:
        """The relation series' name beside the device's metrics: no metric name holds "~"."""
        return f"{self.primary}~{self.reference}"


# PM1 and PM2.5 are fractions of the mass PM10 counts (by particle size), so in the same air each is
# a share of the larger one that changes slowly with the aerosol's sources; LAmax is the loudest
# moment of the interval whose energy average is LAeq, so LAeq sits a crest below it that changes
# slowly with the kind of noise (decibels: an offset, not a share).
RELATIONS: tuple[Relation, ...] = (
    Relation("pm25", "pm10", "ratio"),
    Relation("pm1", "pm25", "ratio"),
    Relation("LAeq", "LAmax", "offset"),
)

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
    return [
        _new_tuple(Reading, (int(ts), city, domain, device, metric, float(val), unit, recv, src))
        for ts, metric, val, unit in body["r"]
    ]


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
    NUMBER_OUT_OF_RANGE = "number_out_of_range"  # a number no 64-bit float can hold (e.g. 400 digits)
    TIME_OUT_OF_RANGE = "time_out_of_range"  # a time outside years 1970-9999, or not representable
    TOO_DEEP = "too_deep"  # JSON nested deeper than any accepted shape allows
    TOO_MANY_VALUES = "too_many_values"  # more values in one message than the gateway takes
    RATE_LIMITED = "rate_limited"  # the sender published faster than its rate limit
    INTERNAL_ERROR = "internal_error"  # checking the message failed unexpectedly: a platform bug


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one value or message was refused: a stable reason code and a message for a person."""

    reason: Reason
    message: str  # for a person: what was wrong and how to fix it


# A dead letter is one record per rejected message, however many of its values were rejected, so
# a hostile message cannot multiply itself: its reasons are capped (the rest counted) and its
# payload is kept once, capped, with its length and SHA-256.
DEAD_LETTER_VERSION = 2
DEAD_LETTER_MAX_REJECTIONS = 20
DEAD_LETTER_MAX_PAYLOAD = 16 * 1024


def encode_dead_letter(
    *,
    topic: str,
    payload: bytes,
    rejections: list[Rejection],
    received_ms: int,
    reason_counts: dict[str, int] | None = None,
) -> bytes:
    """One rejected message → one dead-letter record value.

    `rejections` are the reasons kept for a person to read (at most DEAD_LETTER_MAX_REJECTIONS are
    written); `reason_counts` counts every rejection by reason, kept or not (default: `rejections`).
    `reason` and `message` repeat the first rejection, for readers that want one line.
    """
    if reason_counts is None:
        reason_counts = {}
        for r in rejections:
            reason_counts[r.reason.value] = reason_counts.get(r.reason.value, 0) + 1
    kept = rejections[:DEAD_LETTER_MAX_REJECTIONS]
    body = {
        "v": DEAD_LETTER_VERSION,
        "reason": kept[0].reason.value,
        "message": kept[0].message,
        "rejections": [{"reason": r.reason.value, "message": r.message} for r in kept],
        "rejections_total": sum(reason_counts.values()),
        "reasons": reason_counts,
        "topic": topic,
        "received_ms": received_ms,
        "payload_b64": base64.b64encode(payload[:DEAD_LETTER_MAX_PAYLOAD]).decode(),
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "payload_truncated": len(payload) > DEAD_LETTER_MAX_PAYLOAD,
    }
    return orjson.dumps(body)


def decode_dead_letter(value: bytes) -> dict[str, Any]:
    """A dead-letter record → a dict with `payload` as bytes (version 1 records too: one reason each)."""
    body: dict[str, Any] = orjson.loads(value)
    body["payload"] = base64.b64decode(str(body.pop("payload_b64")))
    return upgraded_dead_letter(body)


def upgraded_dead_letter(body: dict[str, Any]) -> dict[str, Any]:
    """A dead letter's JSON, its payload still base64, with a version 1 record's one reason said as
    later versions say every reason (in place; returned). For readers that decode no payload."""
    if body.get("v") == WIRE_VERSION:  # before version 2: one record per rejected value
        body.setdefault("rejections", [{"reason": body["reason"], "message": body["message"]}])
        body.setdefault("reasons", {str(body["reason"]): 1})
        body.setdefault("rejections_total", 1)
    return body


# Floats end here: anything beyond is not a number any stage can store.
FLOAT_MAX = sys.float_info.max


def is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that a 64-bit float holds finitely. Never raises: a Python int
    of thousands of digits is compared, not converted (math.isfinite would overflow)."""
    kind = type(value)
    if kind is float:
        return math.isfinite(value)  # type: ignore[arg-type]
    if kind is int or (isinstance(value, int) and kind is not bool):
        return -FLOAT_MAX <= value <= FLOAT_MAX  # type: ignore[operator]
    return False


def escaped(text: str, limit: int = 1000) -> str:
    """`text` with every non-printable character written as its escape (newline as \\n, ESC as
    \\x1b), cut at `limit`: for showing device-controlled text on a terminal or in a log line."""
    cut = text[:limit]
    shown = cut if cut.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return shown if len(text) <= limit else shown + f"...({len(text)} chars)"


def printable(value: object, limit: int = 80) -> str:
    """`value` as a short, safe piece of text for a log line, a terminal or a rejection message.

    A device chooses its metric names, units and payloads: shown raw, a newline forges a log line
    and an escape sequence drives the reader's terminal. Strings are shown as Python's repr, which
    escapes every non-printable character; containers and huge numbers are summarised, never
    rendered whole (a 1,000-level list or a 5,000-digit int would raise or flood).
    """
    if isinstance(value, str):
        text = repr(value if len(value) <= limit else value[:limit])
        return text if len(value) <= limit else text + f"...({len(value)} chars)"
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        if -(10**30) < value < 10**30:
            return repr(value)
        return f"<integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    if isinstance(value, dict):
        return f"<object of {len(value)} members>"
    if isinstance(value, list | tuple):
        return f"<array of {len(value)} items>"
    return f"<{type(value).__name__}>"
