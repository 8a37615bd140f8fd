"""Commands to devices without the stack: the catalogue's checks, the reply parser against anything
a device could send (hypothesis), the wire format, the simulated devices' firmware, and the ACL lines."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kota import commands
from kota.commands import CommandRefused, Refusal, ReplyReason, ReplyStatus, check_command, parse_reply
from kota.contract import device_command_topic, device_reply_topic, parse_reply_topic
from kota.registry import new_device
from simulators.commands import DeviceCommands


# -- the catalogue -----------------------------------------------------------------------------
def test_each_type_obeys_its_commands_and_every_type_set_interval():
    assert set(commands.catalogue("street_light")) == {"on", "off", "dim", "set_interval"}
    assert set(commands.catalogue("flood_siren")) == {"sound", "stop", "set_interval"}
    assert set(commands.catalogue("noise")) == {"set_interval"}
    assert commands.catalogue("flood_siren")["sound"].critical
    assert not any(s.critical for s in commands.catalogue("street_light").values())


@pytest.mark.parametrize(
    ("device_type", "command", "params", "code"),
    [
        ("street_light", "sound", {}, Refusal.UNKNOWN_COMMAND),
        ("noise", "off", {}, Refusal.UNKNOWN_COMMAND),
        ("street_light", "dim", {}, Refusal.BAD_PARAMETERS),
        ("street_light", "dim", {"level": 101}, Refusal.BAD_PARAMETERS),
        ("street_light", "dim", {"level": -1}, Refusal.BAD_PARAMETERS),
        ("street_light", "dim", {"level": "50"}, Refusal.BAD_PARAMETERS),
        ("street_light", "dim", {"level": True}, Refusal.BAD_PARAMETERS),
        ("street_light", "dim", {"level": 50, "colour": 3}, Refusal.BAD_PARAMETERS),
        ("street_light", "off", {"level": 50}, Refusal.BAD_PARAMETERS),
        ("noise", "set_interval", {"seconds": 0}, Refusal.BAD_PARAMETERS),
        ("noise", "set_interval", {"seconds": 3601}, Refusal.BAD_PARAMETERS),
        ("noise", "set_interval", {"seconds": 2.5}, Refusal.BAD_PARAMETERS),
    ],
)
def test_unknown_commands_and_bad_parameters_are_refused_with_a_stable_code(device_type, command, params, code):
    with pytest.raises(CommandRefused) as refused:
        check_command(device_type, command, params)
    assert refused.value.code == code


@pytest.mark.parametrize(
    ("device_type", "command", "params"),
    [
        ("street_light", "dim", {"level": 0}),
        ("street_light", "dim", {"level": 100}),
        ("street_light", "dim", {"level": 37.5}),
        ("street_light", "off", {}),
        ("flood_siren", "sound", {}),
        ("water_level", "set_interval", {"seconds": 1}),
        ("water_level", "set_interval", {"seconds": 3600}),
    ],
)
def test_commands_within_the_catalogue_pass(device_type, command, params):
    assert check_command(device_type, command, params).name == command


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(st.text(max_size=80), st.dictionaries(st.text(max_size=10), json_values, max_size=4))
def test_the_catalogue_check_answers_pass_or_a_refusal_never_anything_else(command, params):
    try:
        spec = check_command("street_light", command, params)
    except CommandRefused as refused:
        assert refused.code in (Refusal.UNKNOWN_COMMAND, Refusal.BAD_PARAMETERS)
        assert len(refused.message) < 2000
    else:
        assert spec.name == command and set(params) == set(spec.params)


# -- replies -----------------------------------------------------------------------------------
ID = str(uuid.uuid4())


@given(st.binary(max_size=300))
@example(b"\xff\xfe")
@example(b'{"id": "x", "status": "succeeded"}')
@example(b"[]")
@example(b'{"id": "' + ID.encode() + b'", "status": "done"}')
@example(b'{"id": "' + ID.encode() + b'", "status": "failed", "error": 5}')
@example(b"9" * 9000)
def test_any_bytes_give_a_reply_or_a_stable_reason_never_an_exception(payload):
    outcome = parse_reply(payload)
    assert isinstance(outcome, commands.Reply) or outcome in set(ReplyReason)


@given(json_values)
def test_any_json_gives_a_reply_or_a_stable_reason(value):
    outcome = parse_reply(json.dumps(value).encode())
    assert isinstance(outcome, commands.Reply) or outcome in set(ReplyReason)


storable = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@given(
    st.uuids(),
    st.sampled_from(list(ReplyStatus)),
    st.none()
    | st.dictionaries(
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10),
        storable,
        max_size=8,
    ),
    st.none() | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=1000),
)
def test_a_well_formed_reply_comes_back_as_sent(command_id, status, result, error):
    body = {"id": str(command_id), "status": status.value, "result": result, "error": error}
    reply = parse_reply(json.dumps(body).encode())
    assert isinstance(reply, commands.Reply)
    assert (reply.command_id, reply.status, reply.result) == (str(command_id), status, result)
    assert reply.error == (error[:500] if error is not None else None)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xc3\x28", ReplyReason.NOT_UTF8),
        (b"{", ReplyReason.MALFORMED_JSON),
        (b'"received"', ReplyReason.BAD_SHAPE),
        (b'{"status": "received"}', ReplyReason.BAD_ID),
        (b'{"id": "not-a-uuid", "status": "received"}', ReplyReason.BAD_ID),
        (json.dumps({"id": ID, "status": "done"}).encode(), ReplyReason.BAD_STATUS),
        (json.dumps({"id": ID, "status": "succeeded", "result": [1]}).encode(), ReplyReason.BAD_SHAPE),
        (
            json.dumps({"id": ID, "status": "succeeded", "result": {str(i): i for i in range(40)}}).encode(),
            ReplyReason.BAD_SHAPE,
        ),
        (b" " * (commands.MAX_REPLY_BYTES + 1), ReplyReason.OVERSIZED),
        (json.dumps({"id": ID, "status": "failed", "error": "a\x00b"}).encode(), ReplyReason.BAD_SHAPE),
        (json.dumps({"id": ID, "status": "succeeded", "result": {"k": "\x00"}}).encode(), ReplyReason.BAD_SHAPE),
    ],
)
def test_each_kind_of_bad_reply_has_its_reason(payload, reason):
    assert parse_reply(payload) == reason


@given(st.text(max_size=120))
@example("kota/bandung/utilities/sl-1/command/reply")
@example("kota/bandung/gateway/sl-1/command/reply")
@example("kota/Bandung/utilities/sl-1/command/reply")
def test_reply_topics_parse_only_in_their_one_form(topic):
    parsed = parse_reply_topic(topic)
    if parsed is not None:
        assert device_reply_topic(*parsed) == topic


def test_command_and_reply_topics():
    assert device_command_topic("bandung", "utilities", "sl-1") == "kota/bandung/utilities/sl-1/command"
    assert parse_reply_topic("kota/bandung/utilities/sl-1/command/reply") == ("bandung", "utilities", "sl-1")
    assert parse_reply_topic("kota/bandung/utilities/sl-1/command") is None


# -- the simulated firmware --------------------------------------------------------------------
LIGHT = new_device("bandung-street-light-001", "bandung", "street_light", gateway_id="gw")
SIREN = new_device("siren-1", "bandung", "flood_siren", gateway_id="gw")


def _command(device, name, params=None, command_id=None):
    body = {"v": 1, "id": command_id or str(uuid.uuid4()), "command": name, "params": params or {}}
    return device_command_topic(device.city, device.domain, device.device_id), json.dumps(body).encode()


def test_a_simulated_light_switched_off_reports_it_and_answers_once_per_id():
    firmware = DeviceCommands([LIGHT, SIREN])
    night = {"powerState": 1.0, "powerConsumption": 121.0}
    topic, payload = _command(LIGHT, "off")
    firmware.receive(topic, payload)
    firmware.receive(topic, payload)  # a resend
    replies = firmware.take_replies()
    assert [json.loads(p)["status"] for _, p in replies] == ["received", "succeeded", "succeeded"]
    assert {t for t, _ in replies} == {device_reply_topic("bandung", "utilities", LIGHT.device_id)}
    assert firmware.adjust(LIGHT, 0, night) == {"powerState": 0.0, "powerConsumption": 0.0}
    firmware.receive(*_command(LIGHT, "dim", {"level": 25}))
    assert firmware.adjust(LIGHT, 0, night) == {"powerState": 1.0, "powerConsumption": 121.0 * 0.25}


def test_the_interval_thins_a_devices_reports_and_a_bad_command_fails():
    firmware = DeviceCommands([LIGHT, SIREN])
    firmware.receive(*_command(SIREN, "set_interval", {"seconds": 10}))
    values = {"sirenState": 0.0}
    assert [firmware.adjust(SIREN, ts, values) is not None for ts in range(0, 30_000, 5_000)] == [
        True,
        False,
        True,
        False,
        True,
        False,
    ]
    firmware.take_replies()
    firmware.receive(*_command(SIREN, "dim", {"level": 3}))
    assert json.loads(firmware.take_replies()[-1][1])["status"] == "failed"
    firmware.receive(device_command_topic("bandung", "environment", "siren-1"), b"\xff not json")
    assert firmware.take_replies() == []


@given(st.binary(max_size=200), st.sampled_from([LIGHT, SIREN]))
@example(b'{"id": 1, "command": "off"}', LIGHT)
@example(b'{"id": "x", "command": "dim", "params": {"level": "high"}}', LIGHT)
@example(b'{"id": "x", "command": "dim", "params": []}', LIGHT)
@example(b'{"id": "x", "command": "set_interval", "params": {"seconds": 1e400}}', SIREN)
def test_the_simulated_firmware_takes_any_bytes_without_raising(payload, device):
    firmware = DeviceCommands([LIGHT, SIREN])
    firmware.receive(device_command_topic(device.city, device.domain, device.device_id), payload)
    for _topic, reply in firmware.take_replies():
        assert json.loads(reply)["status"] in ("received", "succeeded", "failed")
    values = {"powerState": 1.0, "powerConsumption": 100.0} if device is LIGHT else {"sirenState": 0.0}
    firmware.adjust(device, 0, values)
