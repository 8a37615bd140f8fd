"""Every class of bad input gets its own stable reason; good values of a message still pass."""

import json

import pytest

from ingest.parse import ParseLimits, parse_message
from kota.contract import Reason, device_telemetry_topic, gateway_telemetry_topic
from kota.registry import Gateway, new_device

NOW = 1_795_000_000_000
AQ = new_device("aq-1", "bandung", "air_quality")
OFF = new_device("aq-off", "bandung", "air_quality", enabled=False)
GATE = new_device("gate-1", "bandung", "water_level", gateway_id="gw-1")
CORRIDOR = new_device("corridor-1", "bandung", "traffic_corridor", gateway_id="gw-1")
ELSEWHERE = new_device("jkt-gate", "jakarta", "water_level", gateway_id="gw-1")
DEVICES = {d.device_id: d for d in (AQ, OFF, GATE, CORRIDOR, ELSEWHERE)}
GATEWAYS = {
    "gw-1": Gateway("gw-1", "bandung"),
    "gw-2": Gateway("gw-2", "bandung"),
    "gw-off": Gateway("gw-off", "bandung", enabled=False),
}
TOPIC = device_telemetry_topic("bandung", "environment", "aq-1")
SENML = device_telemetry_topic("bandung", "environment", "aq-1", "senml")
GW_TOPIC = gateway_telemetry_topic("bandung", "gw-1")
GW_SENML = gateway_telemetry_topic("bandung", "gw-1", "senml")
LIMITS = ParseLimits(max_payload_bytes=2048)


def parse(payload: object, topic: str = TOPIC):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return parse_message(topic, body, devices=DEVICES, gateways=GATEWAYS, received_ms=NOW, limits=LIMITS)


def reasons(result) -> list[Reason]:
    return [r.reason for r in result.rejections]


def test_single_timestamp_payload():
    result = parse({"ts": NOW - 1000, "values": {"pm25": 31.5, "pm10": 50}})
    assert reasons(result) == []
    assert [(r.ts_ms, r.metric, r.value, r.unit) for r in result.readings] == [
        (NOW - 1000, "pm25", 31.5, "ug/m3"),
        (NOW - 1000, "pm10", 50.0, "ug/m3"),
    ]
    assert all(
        (r.city, r.domain, r.device_id, r.received_ms) == ("bandung", "environment", "aq-1", NOW)
        for r in result.readings
    )


def test_values_alone_take_the_receive_time():
    result = parse({"temperature": 27.5})
    assert [(r.ts_ms, r.metric, r.unit) for r in result.readings] == [(NOW, "temperature", "Cel")]


def test_a_flat_payload_with_a_time_is_stored_at_that_time():
    # {"ts", metric...} once stored its values at the receive time and rejected "ts" as a metric.
    result = parse({"ts": NOW - 5000, "pm25": 31.5, "pm10": 48})
    assert reasons(result) == []
    assert sorted((r.ts_ms, r.metric, r.value) for r in result.readings) == [
        (NOW - 5000, "pm10", 48.0),
        (NOW - 5000, "pm25", 31.5),
    ]
    # Its time is checked as any other: a bad one spoils only itself.
    assert reasons(parse({"ts": "yesterday", "pm25": 1})) == [Reason.WRONG_TYPE]
    assert reasons(parse({"ts": NOW - 30 * 86_400_000, "pm25": 1})) == [Reason.TIME_TOO_OLD]
    assert reasons(parse({"ts": NOW})) == [Reason.BAD_SHAPE]  # a time of nothing
    batch = parse({"gate-1": {"ts": NOW - 1000, "currentLevel": 92}}, GW_TOPIC)
    assert [(r.device_id, r.ts_ms, r.metric) for r in batch.readings] == [("gate-1", NOW - 1000, "currentLevel")]


def test_list_of_timestamps():
    result = parse([{"ts": NOW - 2000, "values": {"pm25": 1}}, {"ts": NOW - 1000, "values": {"pm25": 2}}])
    assert [(r.ts_ms, r.value) for r in result.readings] == [(NOW - 2000, 1.0), (NOW - 1000, 2.0)]


def test_booleans_are_zero_and_one():
    light = new_device("sl-1", "bandung", "street_light")
    result = parse_message(
        device_telemetry_topic("bandung", "utilities", "sl-1"),
        b'{"powerState": true}',
        devices={"sl-1": light},
        received_ms=NOW,
        limits=LIMITS,
    )
    assert result.readings[0].source == "mqtt-json"
    assert [(r.metric, r.value) for r in result.readings] == [("powerState", 1.0)]


@pytest.mark.parametrize(
    ("payload", "topic", "reason"),
    [
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
        ({"gate-1": {"currentLevel": 1}}, gateway_telemetry_topic("bandung", "gw-2"), Reason.NOT_BOUND),
        ({"aq-1": {"pm25": 1}}, GW_TOPIC, Reason.NOT_BOUND),
        ({"ghost": {"pm25": 1}}, GW_TOPIC, Reason.UNKNOWN_DEVICE),
        # Another city's device, even one naming this gateway's id: unknown here, not "not bound".
        ({"jkt-gate": {"currentLevel": 1}}, GW_TOPIC, Reason.UNKNOWN_DEVICE),
        ({"gate-1": {"currentLevel": 1}}, gateway_telemetry_topic("bandung", "gw-9"), Reason.UNKNOWN_DEVICE),
        ({"gate-1": {"currentLevel": 1}}, gateway_telemetry_topic("bandung", "gw-off"), Reason.DEVICE_DISABLED),
        ({"gate-1": {"currentLevel": 1}}, gateway_telemetry_topic("jakarta", "gw-1"), Reason.WRONG_CITY_OR_DOMAIN),
        ([1, 2], GW_TOPIC, Reason.BAD_SHAPE),
        ([{"n": "pm25", "u": "dB", "v": 3}], SENML, Reason.WRONG_UNIT),
        ([{"n": "pm25", "vs": "high"}], SENML, Reason.WRONG_TYPE),
        ({"not": "senml"}, SENML, Reason.BAD_SHAPE),
        ([{"bn": 5, "n": "pm25", "v": 3}], SENML, Reason.BAD_SHAPE),
    ],
)
def test_each_bad_input_has_its_reason(payload, topic, reason):
    result = parse(payload, topic)
    assert reasons(result) == [reason]
    assert result.readings == []
    assert result.rejections[0].message  # a person can read why


def test_bad_values_do_not_take_good_ones_down():
    result = parse({"ts": NOW, "values": {"pm25": 12, "pm10": "x", "no2": -1, "o3": 40}})
    assert sorted(r.metric for r in result.readings) == ["o3", "pm25"]
    assert sorted(reasons(result)) == sorted([Reason.WRONG_TYPE, Reason.OUT_OF_RANGE])


def test_gateway_batch_many_devices_many_timestamps():
    result = parse(
        {
            "gate-1": [
                {"ts": NOW - 2000, "values": {"currentLevel": 81}},
                {"ts": NOW - 1000, "values": {"currentLevel": 83}},
            ],
            "corridor-1": {"ts": NOW - 1000, "values": {"occupancy": 0.4, "averageVehicleSpeed": 31}},
        },
        GW_TOPIC,
    )
    assert reasons(result) == []
    assert [(r.device_id, r.ts_ms, r.metric, r.value) for r in result.readings] == [
        ("gate-1", NOW - 2000, "currentLevel", 81.0),
        ("gate-1", NOW - 1000, "currentLevel", 83.0),
        ("corridor-1", NOW - 1000, "occupancy", 0.4),
        ("corridor-1", NOW - 1000, "averageVehicleSpeed", 31.0),
    ]
    assert {(r.city, r.source) for r in result.readings} == {("bandung", "mqtt-gateway-json")}
    assert {r.domain for r in result.readings} == {"environment", "traffic"}


def test_senml_base_fields_relative_time_and_unit_conversion():
    pack = [
        {"bn": "urn:dev:mac:0024befffe804ff1:", "bt": (NOW - 60_000) / 1000, "bu": "ug/m3", "n": "pm25", "v": 31.5},
        {"n": "co", "u": "mg/m3", "v": 1.2, "t": 30},
        {"n": "temperature", "u": "K", "v": 300.15},
        {"bt": 0, "n": "relativeHumidity", "u": "%RH", "v": 70, "t": -5},
    ]
    result = parse(pack, SENML)
    assert reasons(result) == []
    got = [(r.ts_ms, r.metric, round(r.value, 6), r.unit, r.source) for r in result.readings]
    assert got == [
        (NOW - 60_000, "pm25", 31.5, "ug/m3", "mqtt-senml"),
        (NOW - 30_000, "co", 1200.0, "ug/m3", "mqtt-senml"),
        (NOW - 60_000, "temperature", 27.0, "Cel", "mqtt-senml"),
        (NOW - 5_000, "relativeHumidity", 70.0, "%RH", "mqtt-senml"),
    ]


def test_gateway_senml_names_device_and_metric():
    pack = [
        {"bn": "gate-1/", "bt": NOW / 1000, "n": "currentLevel", "u": "m", "v": 1.6},
        {"bn": "corridor-1/", "n": "occupancy", "u": "%", "v": 40},
    ]
    result = parse(pack, GW_SENML)
    assert reasons(result) == []
    assert [(r.device_id, r.metric, round(r.value, 6), r.unit) for r in result.readings] == [
        ("gate-1", "currentLevel", 160.0, "cm"),
        ("corridor-1", "occupancy", 0.4, "/"),
    ]


def test_one_foreign_device_in_a_gateway_batch_spoils_nothing_else():
    result = parse({"gate-1": {"currentLevel": 90}, "aq-1": {"pm25": 12}}, GW_TOPIC)
    assert [r.device_id for r in result.readings] == ["gate-1"]
    assert reasons(result) == [Reason.NOT_BOUND]
