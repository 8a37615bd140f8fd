"""The parser against input nobody wrote by hand: arbitrary bytes, arbitrary JSON in all four forms,
huge numbers and deep nesting. Whatever arrives, it returns readings or reasons and never raises;
what it accepts is always storable, and what it says about a rejection is short and printable."""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ingest.parse import MAX_KEPT_REJECTIONS, MAX_TS_MS, MIN_TS_MS, ParseLimits, parse_message
from kota.contract import Reason, device_telemetry_topic, gateway_telemetry_topic
from kota.registry import Gateway, new_device

NOW = 1_795_000_000_000
AQ = new_device("aq-1", "bandung", "air_quality")
LIGHT = new_device("sl-1", "bandung", "street_light")
GATE = new_device("gate-1", "bandung", "water_level", gateway_id="gw-1")
CORRIDOR = new_device("corridor-1", "bandung", "traffic_corridor", gateway_id="gw-1")
DEVICES = {d.device_id: d for d in (AQ, LIGHT, GATE, CORRIDOR)}
GATEWAYS = {"gw-1": Gateway("gw-1", "bandung")}
TOPICS = [
    device_telemetry_topic("bandung", "environment", "aq-1"),
    device_telemetry_topic("bandung", "environment", "aq-1", "senml"),
    gateway_telemetry_topic("bandung", "gw-1"),
    gateway_telemetry_topic("bandung", "gw-1", "senml"),
]
LIMITS = ParseLimits()
METRIC_NAMES = sorted({m for d in DEVICES.values() for m in d.metrics})

huge_ints = st.integers(min_value=10**300, max_value=10**4000).map(lambda n: n * (-1) ** (n % 2))
numbers = st.one_of(
    st.integers(), huge_ints, st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=-1e6, max_value=1e6)
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    numbers,
    st.text(max_size=20),
    st.sampled_from(
        ["\x1b[2J", "a\nb", "\u202e", "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")]
    ),
)


def _containers(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4))


json_values = st.recursive(scalars, _containers, max_leaves=20)
metric_names = st.one_of(st.sampled_from(METRIC_NAMES), st.text(max_size=12))
times = st.one_of(st.none(), st.integers(min_value=NOW - 10**10, max_value=NOW + 10**9), numbers, json_values)


def device_payloads() -> st.SearchStrategy[object]:
    values = st.dictionaries(metric_names, st.one_of(numbers, json_values), max_size=6)
    entry = st.fixed_dictionaries({"values": values}, optional={"ts": times})
    flat_with_time = st.builds(lambda ts, flat: {**flat, "ts": ts}, times, values)
    return st.one_of(values, flat_with_time, entry, st.lists(entry, max_size=4), json_values)


def senml_records() -> st.SearchStrategy[object]:
    names = st.one_of(
        metric_names,
        st.sampled_from(["gate-1/currentLevel", "corridor-1/intensity", "x/pm25"]),
        st.text(max_size=16),
        json_values,
    )
    record = st.fixed_dictionaries(
        {},
        optional={
            "bn": st.one_of(st.just("gate-1/"), st.text(max_size=8), numbers),
            "bt": st.one_of(st.just(NOW / 1000), numbers),
            "n": names,
            "t": times,
            "u": st.one_of(st.text(max_size=6), json_values),
            "v": st.one_of(numbers, json_values),
            "vb": json_values,
            "vs": json_values,
            "bv": numbers,
            "bu": st.text(max_size=6),
        },
    )
    return st.one_of(record, st.lists(record, max_size=5), json_values)


def payloads() -> st.SearchStrategy[tuple[str, bytes]]:
    def encode(body: object) -> bytes:
        # json.dumps writes NaN/Infinity and any int, as a careless device would.
        return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")

    device = st.tuples(st.just(TOPICS[0]), device_payloads().map(encode))
    senml = st.tuples(st.sampled_from([TOPICS[1], TOPICS[3]]), senml_records().map(encode))
    gateway = st.tuples(
        st.just(TOPICS[2]),
        st.dictionaries(
            st.one_of(st.sampled_from(["gate-1", "corridor-1", "aq-1", "nobody"]), st.text(max_size=8)),
            device_payloads(),
            max_size=4,
        ).map(encode),
    )
    raw = st.tuples(st.sampled_from(TOPICS), st.binary(max_size=300))
    return st.one_of(device, senml, gateway, raw)


def parse(topic: str, payload: bytes):
    return parse_message(topic, payload, devices=DEVICES, gateways=GATEWAYS, received_ms=NOW, limits=LIMITS)


def check_invariants(topic: str, payload: bytes) -> None:
    result = parse(topic, payload)
    assert result.readings or result.rejections, "a message is always accounted for: readings or a reason"
    assert len(result.rejections) <= MAX_KEPT_REJECTIONS
    assert sum(result.reason_counts.values()) >= len(result.rejections)
    for reading in result.readings:
        device = DEVICES[reading.device_id]
        spec = device.metrics[reading.metric]
        assert type(reading.value) is float and math.isfinite(reading.value)
        assert spec.low <= reading.value <= spec.high and reading.unit == spec.unit
        assert type(reading.ts_ms) is int and MIN_TS_MS <= reading.ts_ms <= MAX_TS_MS
        assert NOW - LIMITS.max_age_ms <= reading.ts_ms <= NOW + LIMITS.max_future_ms
    for rejection in result.rejections:
        assert isinstance(rejection.reason, Reason)
        assert rejection.message.isprintable() and len(rejection.message) < 600, rejection.message


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads())
@example((TOPICS[0], b'{"pm25": 1' + b"0" * 400 + b"}"))  # OverflowError in math.isfinite, once
@example((TOPICS[0], b'{"pm25": 1' + b"0" * 5000 + b"}"))  # ValueError from Python's int parser, once
@example((TOPICS[0], b'{"ts": 1' + b"0" * 300 + b', "values": {"pm25": 1}}'))
@example((TOPICS[0], b'{"pm25": 1, "ts": 1' + b"0" * 300 + b"}"))
@example((TOPICS[1], b'[{"n": "pm25", "v": 1, "t": 1' + b"0" * 300 + b"}]"))
@example((TOPICS[1], b'[{"n": "pm25", "v": 1, "bt": 1e308, "t": 1e308}]'))  # bt + t overflows
@example((TOPICS[1], b'[{"n": "pm25", "v": 1e308, "bv": 1e308}]'))
@example((TOPICS[0], b"[" * 5000 + b"]" * 5000))
@example((TOPICS[2], b'{"gate-1": ' + b"[" * 900 + b"]" * 900 + b"}"))
def test_any_payload_gives_readings_or_reasons_and_never_raises(message):
    check_invariants(*message)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TOPICS), st.integers(min_value=1, max_value=20_000))
def test_any_nesting_depth_is_refused_with_its_own_reason(topic, depth):
    payload = b"[" * depth + b"]" * depth
    result = parse(topic, payload)
    if depth > LIMITS.max_depth:
        assert [r.reason for r in result.rejections] == [Reason.TOO_DEEP]
    check_invariants(topic, payload)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=310, max_value=20_000), st.sampled_from(["value", "ts", "senml-t", "senml-v"]))
def test_numbers_of_any_length_get_a_range_reason(digits, where):
    big = "9" * digits
    payload, topic = {
        "value": (f'{{"pm25": {big}}}', TOPICS[0]),
        "ts": (f'{{"ts": {big}, "values": {{"pm25": 1}}}}', TOPICS[0]),
        "senml-t": (f'[{{"n": "pm25", "v": 1, "t": {big}}}]', TOPICS[1]),
        "senml-v": (f'[{{"n": "pm25", "v": {big}}}]', TOPICS[1]),
    }[where]
    result = parse(topic, payload.encode())
    expected = Reason.TIME_OUT_OF_RANGE if where in ("ts", "senml-t") else Reason.NUMBER_OUT_OF_RANGE
    assert [r.reason for r in result.rejections] == [expected]
    assert not result.readings


def test_a_message_of_thousands_of_unknown_metrics_keeps_few_reasons_and_counts_all():
    body = {f"m{i}": 1 for i in range(9_000)}
    result = parse(TOPICS[0], json.dumps(body).encode())
    assert len(result.rejections) == MAX_KEPT_REJECTIONS
    assert result.reason_counts == {"unknown_metric": 9_000}


def test_more_values_than_the_limit_refuse_the_message():
    body = {f"m{i}": 1 for i in range(LIMITS.max_values + 1)}
    result = parse(TOPICS[0], json.dumps(body).encode())
    assert [r.reason for r in result.rejections] == [Reason.TOO_MANY_VALUES]


def test_device_text_in_reasons_cannot_forge_lines_or_drive_a_terminal():
    result = parse(
        TOPICS[0], json.dumps({"pm25\n2026-12-04 kota.gateway ERROR forged": 1, "\x1b[2J\x1b[31mred": 2}).encode()
    )
    assert [r.reason for r in result.rejections] == [Reason.UNKNOWN_METRIC] * 2
    assert all("\n" not in r.message and "\x1b" not in r.message for r in result.rejections)
