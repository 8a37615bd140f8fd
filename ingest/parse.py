"""Turn one MQTT message into canonical readings and rejections. Pure: no I/O, no clock.

Accepted payloads on `kota/{city}/{domain}/{device}/telemetry` (see docs/integrators.md):
    {"ts": 1732240000000, "values": {"pm25": 31.5, "pm10": 50}}   one timestamp (epoch ms)
    {"pm25": 31.5, "pm10": 50}                                  values alone: receive time is used
    [{"ts": ..., "values": {...}}, ...]                         several timestamps
Each bad value is rejected on its own with a reason; the good values of the same message pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kota.contract import (
    Reading,
    Reason,
    Rejection,
    is_finite_number,
    parse_telemetry_topic,
)
from kota.registry import Device


@dataclass(frozen=True, slots=True)
class ParseLimits:
    max_payload_bytes: int = 256 * 1024
    max_future_ms: int = 5 * 60 * 1000  # clocks drift; more than this ahead is a device bug
    max_age_ms: int = 7 * 24 * 3600 * 1000  # older readings belong in a replay, not live ingest


@dataclass(slots=True)
class ParseResult:
    readings: list[Reading]
    rejections: list[Rejection]


def _reject(reason: Reason, message: str) -> ParseResult:
    return ParseResult([], [Rejection(reason, message)])


def _keep_non_finite(constant: str) -> float:
    # json.loads would accept NaN/Infinity silently; keep them so they get their own reason.
    return float(constant)


def parse_message(
    topic: str,
    payload: bytes,
    *,
    devices: dict[str, Device],
    received_ms: int,
    limits: ParseLimits,
) -> ParseResult:
    where = parse_telemetry_topic(topic)
    if where is None:
        return _reject(Reason.BAD_TOPIC, f"topic {topic!r} is not kota/{{city}}/{{domain}}/{{device}}/telemetry")
    if len(payload) > limits.max_payload_bytes:
        return _reject(Reason.OVERSIZED,
                       f"payload of {len(payload)} bytes exceeds the limit of {limits.max_payload_bytes}")
    device = devices.get(where.device_id)
    if device is None:
        return _reject(Reason.UNKNOWN_DEVICE, f"device {where.device_id!r} is not registered")
    if not device.enabled:
        return _reject(Reason.DEVICE_DISABLED, f"device {where.device_id!r} is disabled")
    if (device.city, device.domain) != (where.city, where.domain):
        return _reject(Reason.WRONG_CITY_OR_DOMAIN,
                       f"device {device.device_id!r} belongs to {device.city}/{device.domain}, "
                       f"not {where.city}/{where.domain}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _reject(Reason.NOT_UTF8, f"payload is not UTF-8: {exc.reason} at byte {exc.start}")
    try:
        body = json.loads(text, parse_constant=_keep_non_finite)
    except (json.JSONDecodeError, RecursionError) as exc:
        return _reject(Reason.MALFORMED_JSON, f"payload is not JSON: {exc}")

    entries = _entries(body)
    if entries is None:
        return _reject(Reason.BAD_SHAPE,
                       'expected {"ts": ms, "values": {...}}, {"metric": value, ...} or a list of '
                       '{"ts", "values"} objects')
    result = ParseResult([], [])
    for ts, values in entries:
        _check_entry(device, ts, values, received_ms, limits, result)
    return result


def _entries(body: Any) -> list[tuple[Any, dict[str, Any]]] | None:
    """Normalise the accepted shapes to (ts or None, values) pairs."""
    items = body if isinstance(body, list) else [body]
    entries = []
    for item in items:
        if not isinstance(item, dict) or not item:
            return None
        if "values" in item:
            if not isinstance(item["values"], dict) or set(item) - {"ts", "values"}:
                return None
            entries.append((item.get("ts"), item["values"]))
        elif isinstance(body, list):
            return None  # inside a list each entry must say its ts and values
        else:
            entries.append((None, item))
    return entries


def _check_entry(device: Device, ts: Any, values: dict[str, Any], received_ms: int,
                 limits: ParseLimits, result: ParseResult) -> None:
    if ts is None:
        ts = received_ms
    elif not is_finite_number(ts):
        result.rejections.append(Rejection(Reason.WRONG_TYPE, f"ts {ts!r} is not epoch milliseconds"))
        return
    ts = int(ts)
    if ts > received_ms + limits.max_future_ms:
        result.rejections.append(Rejection(
            Reason.TIME_IN_FUTURE, f"ts {ts} is {(ts - received_ms) / 1000:.0f} s ahead of the gateway clock"))
        return
    if ts < received_ms - limits.max_age_ms:
        result.rejections.append(Rejection(
            Reason.TIME_TOO_OLD, f"ts {ts} is older than {limits.max_age_ms // 3_600_000} h; use `kota replay`"))
        return
    for metric, value in values.items():
        spec = device.metrics.get(metric)
        if spec is None:
            result.rejections.append(Rejection(
                Reason.UNKNOWN_METRIC,
                f"metric {metric!r} is not declared for device {device.device_id!r} "
                f"(declared: {', '.join(sorted(device.metrics))})"))
            continue
        if isinstance(value, bool):
            value = float(value)  # on/off style metrics: true/false are 1/0
        if not isinstance(value, int | float):
            result.rejections.append(Rejection(
                Reason.WRONG_TYPE, f"{metric} = {value!r} is a {type(value).__name__}, expected a number"))
            continue
        if not is_finite_number(value):
            result.rejections.append(Rejection(Reason.NOT_FINITE, f"{metric} = {value!r} is not a finite number"))
            continue
        if not spec.low <= value <= spec.high:
            result.rejections.append(Rejection(
                Reason.OUT_OF_RANGE, f"{metric} = {value} is outside [{spec.low}, {spec.high}] {spec.unit}"))
            continue
        result.readings.append(Reading(ts, device.city, device.domain, device.device_id, metric,
                                       float(value), spec.unit, received_ms, "mqtt-json"))
