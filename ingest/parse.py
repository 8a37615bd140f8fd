"""Turn one MQTT message into canonical readings and rejections. Pure: no I/O, no clock.

The four accepted forms (docs/integrators.md has examples):

    kota/{city}/{domain}/{device}/telemetry   {"ts": ms, "values": {"pm25": 31.5}}, {"pm25": 31.5}
                                              (receive time is used) or a list of {"ts", "values"}
    kota/{city}/{domain}/{device}/senml       SenML JSON (RFC 8428): [{"bn": ..., "bt": s, "n": "pm25",
                                              "u": "ug/m3", "v": 31.5}, ...]
    kota/{city}/gateway/{gateway}/telemetry   {"device-a": <any device payload>, "device-b": ...}
    kota/{city}/gateway/{gateway}/senml       SenML whose names are "{device}/{metric}"

Each bad value is rejected on its own with a reason; the good values of the same message pass.

Nothing a device sends makes this raise: every number, time, nesting depth and count is bounded
and checked, each class with its own reason (tests/test_parse_fuzz.py throws arbitrary JSON and
bytes at all four forms). Device-chosen text (metric names, units, ids) reaches rejection
messages only through `printable`, escaped and cut short.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from kota.contract import (
    Reading,
    Reason,
    Rejection,
    TelemetryTopic,
    convert_unit,
    is_finite_number,
    parse_telemetry_topic,
    printable,
)
from kota.registry import Device, Gateway

# SenML times below 2**28 seconds are relative to "now" (RFC 8428, section 4.5.3).
SENML_RELATIVE_LIMIT_S = 2**28


# Times a reading may carry: 1970 to the end of year 9999, in epoch milliseconds. Anything else is
# not a date any stage can store or partition by (a ts of 1e20 overflowed the processor's day
# arithmetic).
MIN_TS_MS = 0
MAX_TS_MS = 253_402_300_799_999


@dataclass(frozen=True, slots=True)
class ParseLimits:
    """The bounds every message is checked against: size, time window, nesting and number of values."""

    max_payload_bytes: int = 256 * 1024
    max_future_ms: int = 5 * 60 * 1000  # clocks drift; more than this ahead is a device bug
    max_age_ms: int = 7 * 24 * 3600 * 1000  # older history has no way in yet (docs/integrators.md)
    # The deepest accepted shape (a gateway's {"device": [{"ts", "values": {...}}]}) nests 4 deep.
    max_depth: int = 8
    # A gateway batch of 100 devices with 8 metrics and 10 times each is 8,000 values.
    max_values: int = 10_000


# Rejections kept whole per message, for a person to read; the rest are only counted.
MAX_KEPT_REJECTIONS = 20


@dataclass(slots=True)
class ParseResult:
    """What one message became: readings to forward, and why the rest was refused."""

    readings: list[Reading]
    rejections: list[Rejection]  # the first MAX_KEPT_REJECTIONS
    reason_counts: dict[str, int] = field(default_factory=dict)  # every rejection, by reason

    def reject(self, reason: Reason, message: str) -> None:
        self.reason_counts[reason.value] = self.reason_counts.get(reason.value, 0) + 1
        if len(self.rejections) < MAX_KEPT_REJECTIONS:
            self.rejections.append(Rejection(reason, message))

    def refuse(self, reason: Reason, message: str) -> None:
        """Refuse the whole message: no reading of it passes, one reason says why."""
        self.readings.clear()
        self.rejections[:] = [Rejection(reason, message)]
        self.reason_counts = {reason.value: 1}


class Unrepresentable:
    """A JSON number that no 64-bit float holds (1e400, an integer of 400 digits). The slow decoder
    returns this in its place, so the value gets its own reason instead of overflowing (or, past
    4,300 digits, making Python's int parser raise) wherever it is used."""

    __slots__ = ("digits",)

    def __init__(self, text: str) -> None:
        self.digits = len(text)

    def __repr__(self) -> str:
        return f"<a number of {self.digits} characters outside the float range>"


# A SenML value as sent, before checks: (device id, time in ms or None, metric, value, unit or None).
_Candidate = tuple[str, Any, str, Any, str | None]


class _Refused(Exception):
    """The message is refused whole (its shape, depth or size): we cannot tell what it meant."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _bad_shape(message: str) -> _Refused:
    return _Refused(Reason.BAD_SHAPE, message)


def parse_message(
    topic: str,
    payload: bytes,
    *,
    devices: dict[str, Device],
    gateways: dict[str, Gateway] | None = None,
    received_ms: int,
    limits: ParseLimits,
) -> ParseResult:
    result = ParseResult([], [])
    where = parse_telemetry_topic(topic)
    if where is None:
        result.reject(
            Reason.BAD_TOPIC,
            f"topic {printable(topic, 200)} is not kota/{{city}}/{{domain|gateway}}/{{id}}/{{telemetry|senml}}",
        )
        return result
    if len(payload) > limits.max_payload_bytes:
        result.reject(
            Reason.OVERSIZED, f"payload of {len(payload)} bytes exceeds the limit of {limits.max_payload_bytes}"
        )
        return result
    sender_problem = _check_sender(where, devices, gateways or {})
    if sender_problem is not None:
        result.reject(sender_problem.reason, sender_problem.message)
        return result
    try:
        body = orjson.loads(payload)  # fast path; it also refuses bad UTF-8 and NaN
    except orjson.JSONDecodeError:
        body = _slow_decode(payload, result, limits)
        if body is None:
            return result

    source = "mqtt-" + ("gateway-" if where.is_gateway else "") + ("senml" if where.is_senml else "json")
    try:
        if where.is_senml:
            _check_senml(body, where, devices, received_ms, limits, source, result)
        else:
            _check_json(body, where, devices, received_ms, limits, source, result)
    except _Refused as exc:
        # Depth is judged only here and for rejected values (_check_value): every accepted shape
        # is walked by the checks anyway, so a message that passes them cannot be too deep, and
        # walking every message first cost a gateway batch half its parse time again.
        if exc.reason == Reason.BAD_SHAPE and _deeper_than(body, limits.max_depth):
            result.refuse(Reason.TOO_DEEP, _too_deep(limits))
        else:
            result.refuse(exc.reason, str(exc))
    return result


def _too_deep(limits: ParseLimits) -> str:
    return f"JSON nested deeper than {limits.max_depth} levels; no accepted shape nests more than 4"


def _deeper_than(body: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` deep; iterative, so no depth can exhaust the stack."""
    pending = [(body, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _slow_decode(payload: bytes, result: ParseResult, limits: ParseLimits) -> Any:
    """Say exactly why orjson refused: not UTF-8, not JSON, too deep, or JSON with NaN/Infinity or
    numbers beyond the float range (kept as values, so that they get reasons of their own)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        result.reject(Reason.NOT_UTF8, f"payload is not UTF-8: {exc.reason} at byte {exc.start}")
        return None
    try:
        return json.loads(text, parse_constant=float, parse_int=_parse_int, parse_float=_parse_float)
    except RecursionError:
        result.reject(Reason.TOO_DEEP, f"JSON nested deeper than {limits.max_depth} levels")
        return None
    except ValueError as exc:  # json.JSONDecodeError is one
        result.reject(Reason.MALFORMED_JSON, f"payload is not JSON: {printable(str(exc), 200)}")
        return None


def _parse_int(text: str) -> int | Unrepresentable:
    # Python refuses to parse an int of more than 4,300 digits (ValueError); 309 already exceed any float.
    if len(text.lstrip("-")) > 309:
        return Unrepresentable(text)
    return int(text)


def _parse_float(text: str) -> float | Unrepresentable:
    value = float(text)
    return value if math.isfinite(value) else Unrepresentable(text)


def _check_sender(where: TelemetryTopic, devices: dict[str, Device], gateways: dict[str, Gateway]) -> Rejection | None:
    if where.is_gateway:
        gateway = gateways.get(where.sender_id)
        if gateway is None:
            return Rejection(Reason.UNKNOWN_DEVICE, f"gateway {where.sender_id!r} is not registered")
        if not gateway.enabled:
            return Rejection(Reason.DEVICE_DISABLED, f"gateway {where.sender_id!r} is disabled")
        if gateway.city != where.city:
            return Rejection(
                Reason.WRONG_CITY_OR_DOMAIN,
                f"gateway {gateway.gateway_id!r} belongs to {gateway.city}, not {where.city}",
            )
        return None
    device = devices.get(where.sender_id)
    if device is None:
        return Rejection(Reason.UNKNOWN_DEVICE, f"device {where.sender_id!r} is not registered")
    if not device.enabled:
        return Rejection(Reason.DEVICE_DISABLED, f"device {where.sender_id!r} is disabled")
    if (device.city, device.domain) != (where.city, where.domain):
        return Rejection(
            Reason.WRONG_CITY_OR_DOMAIN,
            f"device {device.device_id!r} belongs to {device.city}/{device.domain}, not {where.city}/{where.domain}",
        )
    return None


def _resolve_device(
    device_id: str, where: TelemetryTopic, devices: dict[str, Device], result: ParseResult
) -> Device | None:
    device = devices.get(device_id)
    if not where.is_gateway:
        return device  # the sender itself, checked already
    if device is None or device.city != where.city:
        # Another city's device is unknown here, in the same words: a gateway must not learn which
        # ids another city has registered.
        result.reject(Reason.UNKNOWN_DEVICE, f"device {printable(device_id)} is not registered in {where.city}")
        return None
    if device.gateway_id != where.sender_id:
        result.reject(Reason.NOT_BOUND, f"device {printable(device_id)} is not bound to gateway {where.sender_id!r}")
        return None
    if not device.enabled:
        result.reject(Reason.DEVICE_DISABLED, f"device {device_id!r} is disabled")
        return None
    return device


# -- the JSON forms ------------------------------------------------------------------------------
_DEVICE_SHAPE = (
    'expected {"ts": ms, "values": {...}}, {"metric": value, ...} (with or without "ts") or a list of {"ts", "values"}'
)


def _entries(body: Any) -> list[tuple[Any, dict[str, Any]]]:
    """A device payload → (ts or None, values) pairs."""
    items = body if isinstance(body, list) else [body]
    entries = []
    for item in items:
        if not isinstance(item, dict) or not item:
            raise _bad_shape(_DEVICE_SHAPE)
        if "values" in item:
            values = item["values"]
            if not isinstance(values, dict) or len(item) > 2 or (len(item) == 2 and "ts" not in item):
                raise _bad_shape(_DEVICE_SHAPE)
            entries.append((item.get("ts"), values))
        elif isinstance(body, list):
            raise _bad_shape(_DEVICE_SHAPE)  # inside a list each entry says its ts and values
        elif "ts" in item:
            # Flat with its time, {"ts": ms, "pm25": 31.5}: the time is the reading's (as FIWARE's
            # TimeInstant), not a metric, and the values are not stamped with the receive time.
            values = {key: value for key, value in item.items() if key != "ts"}
            if not values:
                raise _bad_shape(_DEVICE_SHAPE)
            entries.append((item["ts"], values))
        else:
            entries.append((None, item))
    return entries


def _check_json(
    body: Any,
    where: TelemetryTopic,
    devices: dict[str, Device],
    received_ms: int,
    limits: ParseLimits,
    source: str,
    result: ParseResult,
) -> None:
    # The hot path: no intermediate objects per value, one device lookup per device.
    if where.is_gateway:
        if not isinstance(body, dict) or not body:
            raise _bad_shape('expected {"device-id": <device payload>, ...}')
        parts = [(str(device_id), _entries(device_body)) for device_id, device_body in body.items()]
    else:
        parts = [(where.sender_id, _entries(body))]
    values_sent = sum(len(values) for _, entries in parts for _, values in entries)
    if values_sent == 0:
        raise _bad_shape("the message holds no values")
    if values_sent > limits.max_values:
        raise _Refused(
            Reason.TOO_MANY_VALUES,
            f"{values_sent} values in one message; the limit is {limits.max_values}: send them in several messages",
        )
    readings = result.readings
    for device_id, entries in parts:
        device = _resolve_device(device_id, where, devices, result)
        if device is None:
            continue
        declared, city, domain = device.metrics, device.city, device.domain
        for ts, values in entries:
            if ts is None:
                ts = received_ms
            elif type(ts) is not int or not received_ms - limits.max_age_ms <= ts <= received_ms + limits.max_future_ms:
                for metric, value in values.items():  # the full check says exactly what is wrong
                    _check_value(device, ts, metric, value, None, received_ms, limits, source, result)
                continue
            for metric, value in values.items():
                spec = declared.get(metric)
                kind = type(value)
                # Fast path: a declared metric, a plain number, inside its range (NaN fails the
                # comparison). Anything else takes the full check, which names the reason.
                if spec is not None and (kind is float or kind is int) and spec.low <= value <= spec.high:
                    readings.append(
                        Reading(
                            ts, city, domain, device.device_id, metric, float(value), spec.unit, received_ms, source
                        )
                    )
                else:
                    _check_value(device, ts, metric, value, None, received_ms, limits, source, result)


# -- SenML (RFC 8428) ----------------------------------------------------------------------------
def _check_senml(
    body: Any,
    where: TelemetryTopic,
    devices: dict[str, Device],
    received_ms: int,
    limits: ParseLimits,
    source: str,
    result: ParseResult,
) -> None:
    candidates = list(_senml_candidates(body, where, received_ms, limits))  # the shape is checked whole first
    device: Device | None = None
    for device_id, ts, metric, value, unit in candidates:
        if device is None or device.device_id != device_id:
            device = _resolve_device(device_id, where, devices, result)
        if device is not None:
            _check_value(device, ts, metric, value, unit, received_ms, limits, source, result)


def _senml_candidates(body: Any, where: TelemetryTopic, received_ms: int, limits: ParseLimits) -> Iterator[_Candidate]:
    if isinstance(body, dict):
        body = [body]
    if not isinstance(body, list) or not body or not all(isinstance(r, dict) for r in body):
        raise _bad_shape("expected a SenML pack: a JSON array of records")
    if len(body) > limits.max_values:
        raise _Refused(
            Reason.TOO_MANY_VALUES,
            f"{len(body)} SenML records in one message; the limit is "
            f"{limits.max_values}: send them in several messages",
        )
    base_name, base_time, base_unit, base_value = "", 0.0, None, 0.0
    for record in body:
        base_name = record.get("bn", base_name)
        base_time = record.get("bt", base_time)
        base_unit = record.get("bu", base_unit)
        base_value = record.get("bv", base_value)
        if isinstance(base_time, Unrepresentable):
            raise _Refused(Reason.TIME_OUT_OF_RANGE, f"SenML bt {base_time!r}")
        if isinstance(base_value, Unrepresentable):
            raise _Refused(Reason.NUMBER_OUT_OF_RANGE, f"SenML bv {base_value!r}")
        if not isinstance(base_name, str) or not is_finite_number(base_time) or not is_finite_number(base_value):
            raise _bad_shape("SenML bn must be a string, bt and bv numbers")
        name = record.get("n", "")
        if not isinstance(name, str):
            raise _bad_shape(f"SenML n must be a string, not {printable(name)}")
        name = base_name + name
        if where.is_gateway:
            device_id, _, metric = name.partition("/")
        else:
            device_id, metric = where.sender_id, name.replace(":", "/").rsplit("/", 1)[-1]
        if not metric:
            raise _bad_shape(f"SenML record names no measurement: {printable(name)}")
        yield (
            device_id,
            _senml_time(base_time, record.get("t", 0), received_ms),
            metric,
            _senml_value(record, base_value),
            record.get("u", base_unit),
        )


def _senml_time(base_time: float, t: Any, received_ms: int) -> Any:
    """bt + t in epoch ms; a value that is not a finite number goes on as it is, to be rejected."""
    if not is_finite_number(t):
        return t
    seconds = float(base_time) + float(t)  # both within the float range; the sum may not be
    if not -1e13 < seconds < 1e13:  # beyond year 300,000 either way: no time at all
        return math.inf
    if seconds < SENML_RELATIVE_LIMIT_S:
        return received_ms + round(seconds * 1000)
    return round(seconds * 1000)


def _senml_value(record: dict[str, Any], base_value: float) -> Any:
    if "v" in record:
        value = record["v"]
        if not is_finite_number(value):
            return value  # rejected with the reason for what it is
        total = float(value) + float(base_value)
        return total if math.isfinite(total) else Unrepresentable(str(total))
    if "vb" in record:
        return record["vb"]
    return record.get("vs", record.get("vd", record.get("s")))


# -- one value -----------------------------------------------------------------------------------
def _check_value(
    device: Device,
    ts: Any,
    metric: str,
    value: Any,
    unit: Any,
    received_ms: int,
    limits: ParseLimits,
    source: str,
    result: ParseResult,
) -> None:
    if ts is None:
        ts = received_ms
    elif type(ts) is not int:
        if isinstance(ts, Unrepresentable) or (type(ts) is float and not math.isfinite(ts)):
            result.reject(Reason.TIME_OUT_OF_RANGE, f"{printable(metric)} at ts {ts!r}: not a time any stage can store")
            return
        if not is_finite_number(ts):
            result.reject(Reason.WRONG_TYPE, f"ts {printable(ts)} is not epoch milliseconds")
            return
        ts = int(ts)
    if not MIN_TS_MS <= ts <= MAX_TS_MS:
        result.reject(
            Reason.TIME_OUT_OF_RANGE,
            f"{printable(metric)} at ts {printable(ts)} is outside 1970-9999 in epoch milliseconds",
        )
        return
    if ts > received_ms + limits.max_future_ms:
        result.reject(
            Reason.TIME_IN_FUTURE,
            f"{printable(metric)} at ts {ts} is {(ts - received_ms) / 1000:.0f} s ahead of the gateway clock",
        )
        return
    if ts < received_ms - limits.max_age_ms:
        result.reject(
            Reason.TIME_TOO_OLD,
            f"{printable(metric)} at ts {ts} is older than {limits.max_age_ms // 3_600_000} h "
            "(a JSON `ts` in seconds? it is epoch milliseconds)",
        )
        return
    spec = device.metrics.get(metric)
    if spec is None:
        result.reject(
            Reason.UNKNOWN_METRIC,
            f"metric {printable(metric)} is not declared for device "
            f"{device.device_id!r} (declared: {', '.join(sorted(device.metrics))})",
        )
        return
    kind = type(value)
    if kind is bool:
        value = float(value)  # on/off style metrics: true/false are 1/0
    elif kind is Unrepresentable:
        result.reject(Reason.NUMBER_OUT_OF_RANGE, f"{metric} = {value!r}")
        return
    elif kind is not float and kind is not int:
        if (kind is dict or kind is list) and _deeper_than(value, limits.max_depth - 2):
            result.reject(Reason.TOO_DEEP, f"{metric}: {_too_deep(limits)}")
        else:
            result.reject(Reason.WRONG_TYPE, f"{metric} = {printable(value)} is a {kind.__name__}, expected a number")
        return
    elif not is_finite_number(value):
        if kind is int:
            result.reject(Reason.NUMBER_OUT_OF_RANGE, f"{metric} = {printable(value)} is outside the float range")
        else:
            result.reject(Reason.NOT_FINITE, f"{metric} = {value!r} is not a finite number")
        return
    if unit is not None:
        if not isinstance(unit, str) or (converted := convert_unit(value, unit, spec.unit)) is None:
            result.reject(
                Reason.WRONG_UNIT,
                f"{metric} in {printable(unit)} cannot be converted to its declared unit {spec.unit!r}",
            )
            return
        value = converted
    if not spec.low <= value <= spec.high:
        result.reject(
            Reason.OUT_OF_RANGE, f"{metric} = {printable(value)} is outside [{spec.low}, {spec.high}] {spec.unit}"
        )
        return
    result.readings.append(
        Reading(ts, device.city, device.domain, device.device_id, metric, float(value), spec.unit, received_ms, source)
    )
