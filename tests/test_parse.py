"""Every class of bad input gets its own stable reason; good values of a message still pass."""

import json

import pytest

from ingest.parse import ParseLimits, parse_message
from kota.contract import Reason, device_telemetry_topic
from kota.registry import new_device

NOW = 1_795_000_000_000
AQ = new_device("aq-1", "bandung", "air_quality")
OFF = new_device("aq-off", "bandung", "air_quality", enabled=False)
DEVICES = {d.device_id: d for d in (AQ, OFF)}
TOPIC = device_telemetry_topic("bandung", "environment", "aq-1")
LIMITS = ParseLimits(max_payload_bytes=2048)


def parse(payload: object, topic: str = TOPIC):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return parse_message(topic, body, devices=DEVICES, received_ms=NOW, limits=LIMITS)


def reasons(result) -> list[Reason]:
    return [r.reason for r in result.rejections]


def test_single_timestamp_payload():
    result = parse({"ts": NOW - 1000, "values": {"pm25": 31.5, "pm10": 50}})
    assert reasons(result) == []
    assert [(r.ts_ms, r.metric, r.value, r.unit) for r in result.readings] == [
        (NOW - 1000, "pm25", 31.5, "ug/m3"), (NOW - 1000, "pm10", 50.0, "ug/m3")]
    assert all((r.city, r.domain, r.device_id, r.received_ms) == ("bandung", "environment", "aq-1", NOW)
               for r in result.readings)


def test_values_alone_take_the_receive_time():
    result = parse({"temperature": 27.5})
    assert [(r.ts_ms, r.metric, r.unit) for r in result.readings] == [(NOW, "temperature", "Cel")]


def test_list_of_timestamps():
    result = parse([{"ts": NOW - 2000, "values": {"pm25": 1}}, {"ts": NOW - 1000, "values": {"pm25": 2}}])
    assert [(r.ts_ms, r.value) for r in result.readings] == [(NOW - 2000, 1.0), (NOW - 1000, 2.0)]


def test_booleans_are_zero_and_one():
    light = new_device("sl-1", "bandung", "street_light")
    result = parse_message(device_telemetry_topic("bandung", "utilities", "sl-1"),
                           b'{"powerState": true}', devices={"sl-1": light}, received_ms=NOW, limits=LIMITS)
    assert [(r.metric, r.value) for r in result.readings] == [("powerState", 1.0)]


@pytest.mark.parametrize(("payload", "topic", "reason"), [
    (b"{not json", TOPIC, Reason.MALFORMED_JSON),
    (b'{"pm25": "\xff"}', TOPIC, Reason.NOT_UTF8),
    (b"{" + b" " * 4096 + b"}", TOPIC, Reason.OVERSIZED),
    ({"pm25": 1}, device_telemetry_topic("bandung", "environment", "nobody"), Reason.UNKNOWN_DEVICE),
    ({"pm25": 1}, device_telemetry_topic("bandung", "environment", "aq-off"), Reason.DEVICE_DISABLED),
    ({"pm25": 1}, device_telemetry_topic("jakarta", "environment", "aq-1"), Reason.WRONG_CITY_OR_DOMAIN),
    ({"pm25": 1}, "kota/bandung/environment/aq-1", Reason.BAD_TOPIC),
    ({"ts": NOW, "values": [1, 2]}, TOPIC, Reason.BAD_SHAPE),
    ([1, 2], TOPIC, Reason.BAD_SHAPE),
    ({"rainbow": 1}, TOPIC, Reason.UNKNOWN_METRIC),
    ({"pm25": "high"}, TOPIC, Reason.WRONG_TYPE),
    ({"ts": "yesterday", "values": {"pm25": 1}}, TOPIC, Reason.WRONG_TYPE),
    (b'{"pm25": NaN}', TOPIC, Reason.NOT_FINITE),
    (b'{"pm25": Infinity}', TOPIC, Reason.NOT_FINITE),
    ({"pm25": -5}, TOPIC, Reason.OUT_OF_RANGE),
    ({"ts": NOW + 3_600_000, "values": {"pm25": 1}}, TOPIC, Reason.TIME_IN_FUTURE),
    ({"ts": NOW - 30 * 86_400_000, "values": {"pm25": 1}}, TOPIC, Reason.TIME_TOO_OLD),
])
def test_each_bad_input_has_its_reason(payload, topic, reason):
    result = parse(payload, topic)
    assert reasons(result) == [reason]
    assert result.readings == []
    assert result.rejections[0].message  # a person can read why


def test_bad_values_do_not_take_good_ones_down():
    result = parse({"ts": NOW, "values": {"pm25": 12, "pm10": "x", "no2": -1, "o3": 40}})
    assert sorted(r.metric for r in result.readings) == ["o3", "pm25"]
    assert sorted(reasons(result)) == sorted([Reason.WRONG_TYPE, Reason.OUT_OF_RANGE])
