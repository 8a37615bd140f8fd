import pytest

from kota.contract import (
    Reading,
    Reason,
    Rejection,
    decode_dead_letter,
    decode_device_batch,
    device_telemetry_topic,
    encode_dead_letter,
    encode_device_batch,
    parse_telemetry_topic,
)


def test_device_batch_round_trip_keeps_every_field():
    readings = [Reading(1_732_240_000_000 + i, "bandung", "environment", "aq-1", m, v, "ug/m3",
                        1_732_240_000_500, "mqtt-json")
                for i, (m, v) in enumerate([("pm25", 31.5), ("pm10", 50.0), ("no2", 0.0)])]
    decoded = decode_device_batch(encode_device_batch(readings))
    assert decoded == readings
    # Readings, not bare tuples that happen to compare equal (the decoder builds them with tuple.__new__).
    assert all(type(r) is Reading for r in decoded)
    assert [(r.metric, r.value, r.received_ms) for r in decoded] == [(r.metric, r.value, r.received_ms)
                                                                     for r in readings]


def test_decode_refuses_other_wire_versions():
    with pytest.raises(ValueError, match="wire version"):
        decode_device_batch(b'{"v": 99, "city": "x", "domain": "x", "device": "x", "recv": 0, "src": "x", "r": []}')


def test_telemetry_topic_round_trip_and_refusals():
    topic = device_telemetry_topic("bandung", "traffic", "corridor-7")
    parsed = parse_telemetry_topic(topic)
    assert parsed is not None
    assert (parsed.city, parsed.domain, parsed.sender_id, parsed.is_gateway, parsed.is_senml) == (
        "bandung", "traffic", "corridor-7", False, False)
    gw = parse_telemetry_topic("kota/bandung/gateway/gw-1/senml")
    assert gw is not None and (gw.domain, gw.sender_id, gw.is_gateway, gw.is_senml) == (None, "gw-1", True, True)
    assert parse_telemetry_topic("kota/bandung/weather/x/telemetry") is None  # unknown domain
    assert parse_telemetry_topic("kota/Bandung/traffic/x/telemetry") is None  # ids are lower-case
    assert parse_telemetry_topic("kota/bandung/traffic/x/attributes") is None
    assert parse_telemetry_topic("kota/bandung/traffic/telemetry") is None


def test_dead_letter_keeps_original_bytes_and_reason():
    payload = b"\xff\xfe not json"
    record = encode_dead_letter(topic="kota/a/traffic/b/telemetry", payload=payload,
                                rejection=Rejection(Reason.NOT_UTF8, "payload is not UTF-8"), received_ms=5)
    body = decode_dead_letter(record)
    assert body["payload"] == payload
    assert body["reason"] == "not_utf8" and body["topic"] == "kota/a/traffic/b/telemetry"


def test_unit_conversions_reach_the_canonical_unit():
    from kota.contract import convert_unit

    assert convert_unit(300.15, "K", "Cel") == pytest.approx(27.0)
    assert convert_unit(1.5, "m", "cm") == 150.0
    assert convert_unit(0.05, "mg/m3", "ug/m3") == pytest.approx(50.0)
    assert convert_unit(42.0, "%", "/") == pytest.approx(0.42)
    assert convert_unit(7.0, "cm", "cm") == 7.0
    assert convert_unit(1.0, "dB", "cm") is None
