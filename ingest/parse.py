"""Turn one MQTT message into canonical readings and rejections. Pure: no I/O, no clock.

The four accepted forms (docs/integrators.md has examples):

    kota/{city}/{domain}/{device}/telemetry   {"ts": ms, "values": {"pm25": 31.5}}, {"pm25": 31.5}
                                              (receive time is used) or a list of {"ts", "values"}
    kota/{city}/{domain}/{device}/senml       SenML JSON (RFC 8428): [{"bn": ..., "bt": s, "n": "pm25",
                                              "u": "ug/m3", "v": 31.5}, ...]
    kota/{city}/gateway/{gateway}/telemetry   {"device-a": <any device payload>, "device-b": ...}
    kota/{city}/gateway/{gateway}/senml       SenML whose names are "{device}/{metric}"

Each bad value is rejected on its own with a reason; the good values of the same message pass.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
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
)
from kota.registry import Device, Gateway

# SenML times below 2**28 seconds are relative to "now" (RFC 8428, section 4.5.3).
SENML_RELATIVE_LIMIT_S = 2**28


@dataclass(frozen=True, slots=True)
class ParseLimits:
    max_payload_bytes: int = 256 * 1024
    max_future_ms: int = 5 * 60 * 1000  # clocks drift; more than this ahead is a device bug
    max_age_ms: int = 7 * 24 * 3600 * 1000  # older readings belong in a replay, not live ingest


@dataclass(slots=True)
class ParseResult:
    readings: list[Reading]
    rejections: list[Rejection]

    def reject(self, reason: Reason, message: str) -> None:
        self.rejections.append(Rejection(reason, message))


# A SenML value as sent, before checks: (device id, time in ms or None, metric, value, unit or None).
_Candidate = tuple[str, Any, str, Any, str | None]


class _BadShape(Exception):
    pass


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
        result.reject(Reason.BAD_TOPIC, f"topic {topic!r} is not kota/{{city}}/{{domain|gateway}}/{{id}}/"
                                        "{telemetry|senml}")
        return result
    if len(payload) > limits.max_payload_bytes:
        result.reject(Reason.OVERSIZED, f"payload of {len(payload)} bytes exceeds the limit of "
                                        f"{limits.max_payload_bytes}")
        return result
    sender_problem = _check_sender(where, devices, gateways or {})
    if sender_problem is not None:
        result.rejections.append(sender_problem)
        return result
    try:
        body = orjson.loads(payload)  # fast path; it also refuses bad UTF-8 and NaN
    except orjson.JSONDecodeError:
        body = _slow_decode(payload, result)
        if body is None:
            return result

    source = "mqtt-" + ("gateway-" if where.is_gateway else "") + ("senml" if where.is_senml else "json")
    try:
        if where.is_senml:
            _check_senml(body, where, devices, received_ms, limits, source, result)
        else:
            _check_json(body, where, devices, received_ms, limits, source, result)
    except _BadShape as exc:
        # A message whose shape is wrong anywhere is refused whole: we cannot tell what it meant.
        result.readings.clear()
        result.rejections[:] = [Rejection(Reason.BAD_SHAPE, str(exc))]
    return result


def _slow_decode(payload: bytes, result: ParseResult) -> Any:
    """Say exactly why orjson refused: not UTF-8, not JSON, or JSON with NaN/Infinity (kept, so that
    those values get their own reason)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        result.reject(Reason.NOT_UTF8, f"payload is not UTF-8: {exc.reason} at byte {exc.start}")
        return None
    try:
        return json.loads(text, parse_constant=float)
    except (json.JSONDecodeError, RecursionError) as exc:
        result.reject(Reason.MALFORMED_JSON, f"payload is not JSON: {exc}")
        return None


def _check_sender(where: TelemetryTopic, devices: dict[str, Device],
                  gateways: dict[str, Gateway]) -> Rejection | None:
    if where.is_gateway:
        gateway = gateways.get(where.sender_id)
        if gateway is None:
            return Rejection(Reason.UNKNOWN_DEVICE, f"gateway {where.sender_id!r} is not registered")
        if not gateway.enabled:
            return Rejection(Reason.DEVICE_DISABLED, f"gateway {where.sender_id!r} is disabled")
        if gateway.city != where.city:
            return Rejection(Reason.WRONG_CITY_OR_DOMAIN,
                             f"gateway {gateway.gateway_id!r} belongs to {gateway.city}, not {where.city}")
        return None
    device = devices.get(where.sender_id)
    if device is None:
        return Rejection(Reason.UNKNOWN_DEVICE, f"device {where.sender_id!r} is not registered")
    if not device.enabled:
        return Rejection(Reason.DEVICE_DISABLED, f"device {where.sender_id!r} is disabled")
    if (device.city, device.domain) != (where.city, where.domain):
        return Rejection(Reason.WRONG_CITY_OR_DOMAIN,
                         f"device {device.device_id!r} belongs to {device.city}/{device.domain}, "
                         f"not {where.city}/{where.domain}")
    return None


def _resolve_device(device_id: str, where: TelemetryTopic, devices: dict[str, Device],
                    result: ParseResult) -> Device | None:
    device = devices.get(device_id)
    if not where.is_gateway:
        return device  # the sender itself, checked already
    if device is None:
        result.reject(Reason.UNKNOWN_DEVICE, f"device {device_id!r} is not registered")
        return None
    if device.gateway_id != where.sender_id or device.city != where.city:
        result.reject(Reason.NOT_BOUND, f"device {device_id!r} is not bound to gateway {where.sender_id!r}")
        return None
    if not device.enabled:
        result.reject(Reason.DEVICE_DISABLED, f"device {device_id!r} is disabled")
        return None
    return device


# -- the JSON forms ------------------------------------------------------------------------------
_DEVICE_SHAPE = 'expected {"ts": ms, "values": {...}}, {"metric": value, ...} or a list of {"ts", "values"}'


def _entries(body: Any) -> list[tuple[Any, dict[str, Any]]]:
    """A device payload → (ts or None, values) pairs."""
    items = body if isinstance(body, list) else [body]
    entries = []
    for item in items:
        if not isinstance(item, dict) or not item:
            raise _BadShape(_DEVICE_SHAPE)
        if "values" in item:
            values = item["values"]
            if not isinstance(values, dict) or len(item) > 2 or (len(item) == 2 and "ts" not in item):
                raise _BadShape(_DEVICE_SHAPE)
            entries.append((item.get("ts"), values))
        elif isinstance(body, list):
            raise _BadShape(_DEVICE_SHAPE)  # inside a list each entry says its ts and values
        else:
            entries.append((None, item))
    return entries


def _check_json(body: Any, where: TelemetryTopic, devices: dict[str, Device], received_ms: int,
                limits: ParseLimits, source: str, result: ParseResult) -> None:
    # The hot path: no intermediate objects per value, one device lookup per device.
    if where.is_gateway:
        if not isinstance(body, dict) or not body:
            raise _BadShape('expected {"device-id": <device payload>, ...}')
        parts = [(str(device_id), _entries(device_body)) for device_id, device_body in body.items()]
    else:
        parts = [(where.sender_id, _entries(body))]
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
                    readings.append(Reading(ts, city, domain, device.device_id, metric, float(value), spec.unit,
                                            received_ms, source))
                else:
                    _check_value(device, ts, metric, value, None, received_ms, limits, source, result)


# -- SenML (RFC 8428) ----------------------------------------------------------------------------
def _check_senml(body: Any, where: TelemetryTopic, devices: dict[str, Device], received_ms: int,
                 limits: ParseLimits, source: str, result: ParseResult) -> None:
    candidates = list(_senml_candidates(body, where, received_ms))  # the shape is checked whole first
    device: Device | None = None
    for device_id, ts, metric, value, unit in candidates:
        if device is None or device.device_id != device_id:
            device = _resolve_device(device_id, where, devices, result)
        if device is not None:
            _check_value(device, ts, metric, value, unit, received_ms, limits, source, result)


def _senml_candidates(body: Any, where: TelemetryTopic, received_ms: int) -> Iterator[_Candidate]:
    if isinstance(body, dict):
        body = [body]
    if not isinstance(body, list) or not body or not all(isinstance(r, dict) for r in body):
        raise _BadShape("expected a SenML pack: a JSON array of records")
    base_name, base_time, base_unit, base_value = "", 0.0, None, 0.0
    for record in body:
        base_name = record.get("bn", base_name)
        base_time = record.get("bt", base_time)
        base_unit = record.get("bu", base_unit)
        base_value = record.get("bv", base_value)
        if not isinstance(base_name, str) or not is_finite_number(base_time) or not is_finite_number(base_value):
            raise _BadShape("SenML bn must be a string, bt and bv numbers")
        name = base_name + str(record.get("n", ""))
        if where.is_gateway:
            device_id, _, metric = name.partition("/")
        else:
            device_id, metric = where.sender_id, name.replace(":", "/").rsplit("/", 1)[-1]
        if not metric:
            raise _BadShape(f"SenML record names no measurement: {record!r}")
        t = record.get("t", 0)
        if is_finite_number(t):
            seconds = base_time + t
            ts: Any = (received_ms + round(seconds * 1000) if seconds < SENML_RELATIVE_LIMIT_S
                       else round(seconds * 1000))
        else:
            ts = t  # rejected as a wrong type below
        if "v" in record:
            value = record["v"] + base_value if is_finite_number(record["v"]) else record["v"]
        elif "vb" in record:
            value = record["vb"]
        else:
            value = record.get("vs", record.get("vd", record.get("s")))
        yield (device_id, ts, metric, value, record.get("u", base_unit))


# -- one value -----------------------------------------------------------------------------------
def _check_value(device: Device, ts: Any, metric: str, value: Any, unit: str | None, received_ms: int,
                 limits: ParseLimits, source: str, result: ParseResult) -> None:
    if ts is None:
        ts = received_ms
    elif type(ts) is not int and not is_finite_number(ts):
        result.reject(Reason.WRONG_TYPE, f"ts {ts!r} is not epoch milliseconds")
        return
    ts = int(ts)
    if ts > received_ms + limits.max_future_ms:
        result.reject(Reason.TIME_IN_FUTURE, f"{metric} at ts {ts} is {(ts - received_ms) / 1000:.0f} s ahead "
                                             "of the gateway clock")
        return
    if ts < received_ms - limits.max_age_ms:
        result.reject(Reason.TIME_TOO_OLD, f"{metric} at ts {ts} is older than "
                                           f"{limits.max_age_ms // 3_600_000} h; use `kota replay`")
        return
    spec = device.metrics.get(metric)
    if spec is None:
        result.reject(Reason.UNKNOWN_METRIC, f"metric {metric!r} is not declared for device {device.device_id!r} "
                                             f"(declared: {', '.join(sorted(device.metrics))})")
        return
    kind = type(value)
    if kind is bool:
        value = float(value)  # on/off style metrics: true/false are 1/0
    elif kind is not float and kind is not int:
        result.reject(Reason.WRONG_TYPE, f"{metric} = {value!r} is a {kind.__name__}, expected a number")
        return
    elif not math.isfinite(value):
        result.reject(Reason.NOT_FINITE, f"{metric} = {value!r} is not a finite number")
        return
    if unit is not None:
        if not isinstance(unit, str) or (converted := convert_unit(value, unit, spec.unit)) is None:
            result.reject(Reason.WRONG_UNIT, f"{metric} in {unit!r} cannot be converted to its declared "
                                             f"unit {spec.unit!r}")
            return
        value = converted
    if not spec.low <= value <= spec.high:
        result.reject(Reason.OUT_OF_RANGE, f"{metric} = {value} is outside [{spec.low}, {spec.high}] {spec.unit}")
        return
    result.readings.append(Reading(ts, device.city, device.domain, device.device_id, metric, float(value),
                                   spec.unit, received_ms, source))
