import hashlib

import pytest

from kota.contract import (
    DEAD_LETTER_MAX_PAYLOAD,
    DEAD_LETTER_MAX_REJECTIONS,
    Reading,
    Reason,
    Rejection,
    decode_dead_letter,
    decode_device_batch,
    device_telemetry_topic,
    encode_dead_letter,
    encode_device_batch,
    is_finite_number,
    parse_telemetry_topic,
    printable,
)


def test_device_batch_round_trip_keeps_every_field():
    readings = [
        Reading(1_732_240_000_000 + i, "bandung", "environment", "aq-1", m, v, "ug/m3", 1_732_240_000_500, "mqtt-json")
        for i, (m, v) in enumerate([("pm25", 31.5), ("pm10", 50.0), ("no2", 0.0)])
    ]
    decoded = decode_device_batch(encode_device_batch(readings))
    assert decoded == readings
    # Readings, not bare tuples that happen to compare equal (the decoder builds them with tuple.__new__).
    assert all(type(r) is Reading for r in decoded)
    assert [(r.metric, r.value, r.received_ms) for r in decoded] == [
        (r.metric, r.value, r.received_ms) for r in readings
    ]


def test_decode_refuses_other_wire_versions():
    with pytest.raises(ValueError, match="wire version"):
        decode_device_batch(b'{"v": 99, "city": "x", "domain": "x", "device": "x", "recv": 0, "src": "x", "r": []}')


def test_telemetry_topic_round_trip_and_refusals():
    topic = device_telemetry_topic("bandung", "traffic", "corridor-7")
    parsed = parse_telemetry_topic(topic)
    assert parsed is not None
    assert (parsed.city, parsed.domain, parsed.sender_id, parsed.is_gateway, parsed.is_senml) == (
        "bandung",
        "traffic",
        "corridor-7",
        False,
        False,
    )
    gw = parse_telemetry_topic("kota/bandung/gateway/gw-1/senml")
    assert gw is not None and (gw.domain, gw.sender_id, gw.is_gateway, gw.is_senml) == (None, "gw-1", True, True)
    assert parse_telemetry_topic("kota/bandung/weather/x/telemetry") is None  # unknown domain
    assert parse_telemetry_topic("kota/Bandung/traffic/x/telemetry") is None  # ids are lower-case
    assert parse_telemetry_topic("kota/bandung/traffic/x/attributes") is None
    assert parse_telemetry_topic("kota/bandung/traffic/telemetry") is None


def test_dead_letter_keeps_original_bytes_and_reason():
    payload = b"\xff\xfe not json"
    record = encode_dead_letter(
        topic="kota/a/traffic/b/telemetry",
        payload=payload,
        rejections=[Rejection(Reason.NOT_UTF8, "payload is not UTF-8")],
        received_ms=5,
    )
    body = decode_dead_letter(record)
    assert body["payload"] == payload
    assert body["reason"] == "not_utf8" and body["topic"] == "kota/a/traffic/b/telemetry"
    assert body["payload_bytes"] == len(payload) and body["payload_truncated"] is False
    assert body["payload_sha256"] == hashlib.sha256(payload).hexdigest()


def test_one_dead_letter_holds_a_message_of_many_rejections_once_and_bounded():
    payload = b"x" * (DEAD_LETTER_MAX_PAYLOAD * 10)
    rejections = [Rejection(Reason.UNKNOWN_METRIC, f"metric m{i}") for i in range(15_000)]
    record = encode_dead_letter(
        topic="kota/a/traffic/b/telemetry", payload=payload, rejections=rejections, received_ms=5
    )
    assert len(record) < 2 * DEAD_LETTER_MAX_PAYLOAD + 10_000  # not 15,000 copies of 160 KB
    body = decode_dead_letter(record)
    assert body["payload"] == payload[:DEAD_LETTER_MAX_PAYLOAD] and body["payload_truncated"] is True
    assert body["payload_bytes"] == len(payload)
    assert body["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    assert len(body["rejections"]) == DEAD_LETTER_MAX_REJECTIONS
    assert body["rejections_total"] == 15_000 and body["reasons"] == {"unknown_metric": 15_000}


def test_version_1_dead_letters_still_read():
    import base64

    import orjson

    old = orjson.dumps(
        {
            "v": 1,
            "reason": "out_of_range",
            "message": "m",
            "topic": "t",
            "received_ms": 1,
            "payload_b64": base64.b64encode(b"{}").decode(),
        }
    )
    body = decode_dead_letter(old)
    assert body["payload"] == b"{}" and body["reasons"] == {"out_of_range": 1}
    assert body["rejections"] == [{"reason": "out_of_range", "message": "m"}]


@pytest.mark.parametrize(
    ("value", "finite"),
    [
        (1.5, True),
        (10**308, True),
        (10**309, False),
        pytest.param(-(10**5000), False, id="5000-digits"),
        (float("nan"), False),
        (float("inf"), False),
        (True, False),
        ("1", False),
        (None, False),
    ],
)
def test_is_finite_number_never_raises(value, finite):
    assert is_finite_number(value) is finite


@pytest.mark.parametrize(
    "value",
    [
        "a\nforged log line",
        "\x1b[2J\x1b[31m",
        "\u202eevil",
        "x" * 10_000,
        pytest.param(10**5000, id="5000-digits"),
        [[[]]] * 3,
        {"a": 1},
        float("nan"),
    ],
)
def test_printable_is_short_and_escaped(value):
    text = printable(value)
    assert len(text) < 120
    assert text.isprintable()  # no newline, escape, bidi override or other control character


def test_unit_conversions_reach_the_canonical_unit():
    from kota.contract import convert_unit

    assert convert_unit(300.15, "K", "Cel") == pytest.approx(27.0)
    assert convert_unit(1.5, "m", "cm") == 150.0
    assert convert_unit(0.05, "mg/m3", "ug/m3") == pytest.approx(50.0)
    assert convert_unit(42.0, "%", "/") == pytest.approx(0.42)
    assert convert_unit(7.0, "cm", "cm") == 7.0
    assert convert_unit(1.0, "dB", "cm") is None
