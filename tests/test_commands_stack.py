"""Commands to devices on the real stack: API → commander → Mosquitto → device → reply → status.

The simulated city's street light obeys through its gateway and shows it in the readings stored; a
device offline when the command is sent gets it when it comes back; an unanswered command expires; a
critical one waits for a second operator; no device reads another's commands or answers for it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer

from deploy import components, procs
from kota.contract import (
    DEADLETTER_TOPIC,
    decode_dead_letter,
    device_command_topic,
    device_reply_topic,
    device_telemetry_topic,
)
from kota.registry import Device
from kota.settings import StackSettings
from ops_api import accounts
from tests.helpers import kota_command, kota_ok, mqtt_client, provision, query, run_kota, unique_id, wait_for

CITY = "cmdkota"


def _token(stack: StackSettings, user_id: str, role: str) -> str:
    with psycopg.connect(stack.postgres_dsn) as conn:
        accounts.upsert_user(conn, accounts.User(user_id, role, (CITY,)), actor="tests")  # type: ignore[arg-type]
        return accounts.issue_token(conn, user_id, label="tests", actor="tests")


@pytest.fixture(scope="module")
def people(pipeline: StackSettings) -> Iterator[dict[str, httpx.Client]]:
    """Two operators and an integrator of CITY, each an API client with their own token."""
    clients = {
        name: httpx.Client(
            base_url=pipeline.api_url,
            timeout=15,
            headers={"Authorization": f"Bearer {_token(pipeline, unique_id(name), role)}"},
        )
        for name, role in (("op-a", "operator"), ("op-b", "operator"), ("integrator", "integrator"))
    }
    yield clients
    for client in clients.values():
        client.close()


def _status(client: httpx.Client, device_id: str, command_id: str) -> dict[str, Any]:
    answer = client.get(f"/api/v1/devices/{device_id}/commands/{command_id}")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _wait_status(client: httpx.Client, device_id: str, command_id: str, wanted: str, timeout_s: float = 60) -> dict:
    return wait_for(
        lambda: (c := _status(client, device_id, command_id))["status"] == wanted and c,
        timeout_s=timeout_s,
        what=f"command {command_id} to be {wanted}",
    )


def _send(client: httpx.Client, device_id: str, command: str, expect: int = 201, **body: Any) -> dict[str, Any]:
    answer = client.post(f"/api/v1/devices/{device_id}/commands", json={"command": command, **body})
    assert answer.status_code == expect, answer.text
    result: dict[str, Any] = answer.json()
    return result


def _audit(stack: StackSettings, command_id: str) -> list[tuple[str, str]]:
    rows = query(
        stack,
        "SELECT action, actor FROM audit_log WHERE target_type = 'command' AND target_id = %s ORDER BY event_id",
        (command_id,),
    )
    return [(a, b) for a, b in rows]


class FakeDevice:
    """A device of the tests: its own MQTT login, subscribed to `topics`, recording what it gets."""

    def __init__(self, stack: StackSettings, device: Device, topics: list[str] | None = None) -> None:
        self.device = device
        self.received: list[tuple[str, dict[str, Any]]] = []
        self._subscribed = threading.Event()
        self.client = mqtt_client(stack, device.device_id)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.subscribe([(t, 1) for t in topics or [self.command_topic]])
        assert self._subscribed.wait(10), "no SUBACK"

    @property
    def command_topic(self) -> str:
        return device_command_topic(self.device.city, self.device.domain, self.device.device_id)

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        try:
            self.received.append((message.topic, json.loads(message.payload)))
        except ValueError:
            self.received.append((message.topic, {"raw": message.payload.decode(errors="replace")}))

    def reply(self, command_id: str, status: str, topic: str | None = None, **extra: Any) -> None:
        body = json.dumps({"id": command_id, "status": status, **extra}).encode()
        self.raw(body, topic)

    def raw(self, payload: bytes, topic: str | None = None) -> None:
        d = self.device
        info = self.client.publish(topic or device_reply_topic(d.city, d.domain, d.device_id), payload, qos=1)
        info.wait_for_publish(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_the_simulated_street_light_obeys_and_its_readings_show_it(pipeline, people, tmp_path):
    """The whole loop: API → commander → broker → the simulator's light (through its gateway) →
    reply → succeeded; the readings stored after it show the lamp off, then dimmed."""
    city = CITY
    argv, env = kota_command(
        pipeline, "simulate", "--city", city, "--devices", "8", "--interval", "1", "--forms", "batch",
        "--counts", str(tmp_path / "counts.json"),
    )  # fmt: skip
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as sim:
        try:
            light = f"{city}-street-light-001"
            wait_for(
                lambda: query(pipeline, "SELECT count(*) FROM readings WHERE device_id = %s", (light,))[0][0] >= 2,
                timeout_s=90,
                what="the simulated light's readings",
            )
            off = _send(people["op-a"], light, "off")
            assert off["status"] == "queued" and off["requested_by"].startswith("op-a")
            done = _wait_status(people["integrator"], light, off["command_id"], "succeeded")
            assert done["result"] == {"powerState": 0, "level": 0.0}
            assert done["acknowledged_at"] is not None and done["sent_at"] is not None

            def readings_after(finished: str, metric: str) -> list[float]:
                rows = query(
                    pipeline,
                    "SELECT value FROM readings WHERE device_id = %s AND metric = %s AND received_at > %s::timestamptz",
                    (light, metric, finished),
                )
                return [r[0] for r in rows]

            wait_for(lambda: len(readings_after(done["finished_at"], "powerState")) >= 2, what="readings after off")
            assert set(readings_after(done["finished_at"], "powerState")) == {0.0}
            assert set(readings_after(done["finished_at"], "powerConsumption")) == {0.0}

            dim = _send(people["op-b"], light, "dim", params={"level": 40})
            dimmed = _wait_status(people["op-a"], light, dim["command_id"], "succeeded")
            wait_for(lambda: len(readings_after(dimmed["finished_at"], "powerState")) >= 2, what="readings after dim")
            assert set(readings_after(dimmed["finished_at"], "powerState")) == {1.0}
            assert all(0 < w <= 0.4 * 140 for w in readings_after(dimmed["finished_at"], "powerConsumption"))
            assert [a for a, _ in _audit(pipeline, off["command_id"])] == [
                "command.requested", "command.sent", "command.acknowledged", "command.succeeded",
            ]  # fmt: skip
            assert _audit(pipeline, off["command_id"])[-1][1] == light  # the device said so

            # Every 3 s instead of every second: the readings' own times are 3 s apart from then on.
            slower = _send(people["op-a"], light, "set_interval", params={"seconds": 3})
            slowed = _wait_status(people["op-a"], light, slower["command_id"], "succeeded")
            assert slowed["result"] == {"interval_s": 3.0}

            def times_after(finished: str) -> list[float]:
                rows = query(
                    pipeline,
                    "SELECT extract(epoch FROM ts) FROM readings WHERE device_id = %s AND metric = 'powerState' "
                    "AND received_at > %s::timestamptz ORDER BY ts",
                    (light, finished),
                )
                return [float(r[0]) for r in rows]

            spaced = wait_for(
                lambda: (t := times_after(slowed["finished_at"])) and len(t) >= 4 and t,
                timeout_s=60,
                what="readings at the new interval",
            )
            # (From the second on: the first may be the tick that took the command, a second after the one before.)
            assert all(b - a >= 2.999 for a, b in zip(spaced[1:], spaced[2:], strict=False)), spaced
        finally:
            sim.terminate()
            output = sim.communicate(timeout=60)[0]
    assert sim.returncode == 0, output[-3000:]


def test_a_device_offline_when_sent_gets_its_command_when_it_comes_back(pipeline, people):
    light = provision(pipeline, "street_light", city=CITY)
    made = _send(people["op-a"], light.device_id, "dim", params={"level": 70})
    # The broker took it, nobody acknowledged it: published again after the resend interval (10 s).
    resent = wait_for(
        lambda: (c := _status(people["op-a"], light.device_id, made["command_id"]))["send_count"] >= 2 and c,
        what="a second publish",
    )
    assert resent["status"] == "sent" and resent["acknowledged_at"] is None
    device = FakeDevice(pipeline, light)
    try:
        wait_for(lambda: device.received, timeout_s=60, what="the command after the device came back")
        topic, body = device.received[0]
        assert topic == device.command_topic
        assert (body["id"], body["command"], body["params"]) == (made["command_id"], "dim", {"level": 70})
        device.reply(body["id"], "received")
        _wait_status(people["op-a"], light.device_id, made["command_id"], "acknowledged")
        device.reply(body["id"], "succeeded", result={"level": 70})
        device.reply(body["id"], "failed", error="late and contradictory")  # a result stands
        done = _wait_status(people["op-a"], light.device_id, made["command_id"], "succeeded")
        assert done["result"] == {"level": 70} and done["error"] is None
    finally:
        device.close()


def test_a_command_nobody_answers_expires(pipeline, people):
    light = provision(pipeline, "street_light", city=CITY)
    made = _send(people["op-a"], light.device_id, "off", ttl_s=10)
    expired = _wait_status(people["op-b"], light.device_id, made["command_id"], "expired", timeout_s=90)
    assert expired["finished_at"] is not None
    assert _audit(pipeline, made["command_id"])[-1] == ("command.expired", "kota-commander")


def test_a_critical_command_waits_for_a_second_operator(pipeline, people):
    siren = provision(pipeline, "flood_siren", city=CITY)
    device = FakeDevice(pipeline, siren)
    try:
        made = _send(people["op-a"], siren.device_id, "sound")
        assert made["status"] == "awaiting_approval" and made["critical"]
        url = f"/api/v1/devices/{siren.device_id}/commands/{made['command_id']}/approve"
        own = people["op-a"].post(url)
        assert own.status_code == 403 and own.json()["detail"]["code"] == "own_command"
        assert people["integrator"].post(url).status_code == 403
        time.sleep(2)  # would it be sent unapproved? (the commander looks every 0.5 s)
        assert device.received == [] and _status(people["op-a"], siren.device_id, made["command_id"])["send_count"] == 0
        approved = people["op-b"].post(url)
        assert approved.status_code == 200, approved.text
        assert approved.json()["approved_by"].startswith("op-b")
        again = people["op-b"].post(url)
        assert again.status_code == 409 and again.json()["detail"]["code"] == "not_awaiting_approval"
        wait_for(lambda: device.received, what="the approved command")
        device.reply(made["command_id"], "succeeded", result={"sirenState": 1})
        _wait_status(people["op-a"], siren.device_id, made["command_id"], "succeeded")
        trail = _audit(pipeline, made["command_id"])
        assert [a for a, _ in trail] == ["command.requested", "command.approved", "command.sent", "command.succeeded"]
        assert trail[0][1].startswith("op-a") and trail[1][1].startswith("op-b") and trail[3][1] == siren.device_id
    finally:
        device.close()


def test_no_device_reads_anothers_commands_nor_answers_for_it(pipeline, people):
    a = provision(pipeline, "street_light", city=CITY)
    b = provision(pipeline, "street_light", city=CITY)
    b_topic = device_command_topic(b.city, b.domain, b.device_id)
    spy = FakeDevice(pipeline, a, topics=["kota/#", b_topic])
    victim = FakeDevice(pipeline, b)
    try:
        made = _send(people["op-a"], b.device_id, "off")
        wait_for(lambda: victim.received, what="b's command")
        command_id = made["command_id"]
        # A answers for B on B's reply topic (the broker drops it) and on its own (not its command),
        # forges a command to B, and sends garbage: nothing changes B's command, nothing stops the commander.
        spy.reply(command_id, "failed", topic=device_reply_topic(b.city, b.domain, b.device_id), error="forged")
        spy.reply(command_id, "failed", error="forged")
        spy.raw(json.dumps({"v": 1, "id": str(uuid.uuid4()), "command": "on", "params": {}}).encode(), topic=b_topic)
        for garbage in (b"\xff\xfe", b"{", b"[]", b'{"id": 1}', b"9" * 20000, json.dumps({"id": command_id}).encode()):
            spy.raw(garbage)
        victim.reply(command_id, "received")
        _wait_status(people["op-a"], b.device_id, command_id, "acknowledged")
        victim.reply(command_id, "succeeded")
        assert _wait_status(people["op-a"], b.device_id, command_id, "succeeded")["error"] is None
        assert spy.received == []  # neither B's command nor anything under kota/#
        assert [body["id"] for _, body in victim.received] == [command_id] * len(victim.received)
        # The ingest gateways never saw a command or a reply: no dead letter for either, up to a marker.
        marker = device_telemetry_topic(a.city, a.domain, a.device_id)
        spy.raw(b'{"powerState": 7}', topic=marker)
        topics = asyncio.run(_dead_letter_topics_until(pipeline, marker))
        assert not [t for t in topics if "/command" in t], topics
    finally:
        spy.close()
        victim.close()


async def _dead_letter_topics_until(stack: StackSettings, marker: str) -> list[str]:
    """The topics of the dead letters from the start of the topic up to the first one for `marker`."""
    consumer = AIOKafkaConsumer(
        DEADLETTER_TOPIC, **stack.kafka_client_options(), auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    topics: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while marker not in topics:
            assert time.monotonic() < deadline, "the marker's dead letter never came"
            for records in (await consumer.getmany(timeout_ms=500)).values():
                topics += [decode_dead_letter(r.value)["topic"] for r in records]
    finally:
        await consumer.stop()
    return topics


def test_a_reply_sent_while_the_commander_is_down_is_recorded_when_it_is_back(pipeline, people):
    light = provision(pipeline, "street_light", city=CITY)
    device = FakeDevice(pipeline, light)
    try:
        made = _send(people["op-a"], light.device_id, "on")
        wait_for(lambda: device.received, what="the command")
        procs.stop(pipeline, "commander")
        device.reply(made["command_id"], "succeeded", result={"powerState": 1})  # kept in its broker session
        assert _status(people["op-a"], light.device_id, made["command_id"])["status"] == "sent"
        components.start_component(pipeline, "commander")
        _wait_status(people["op-a"], light.device_id, made["command_id"], "succeeded")
    finally:
        components.start_component(pipeline, "commander")
        device.close()


def test_refusals_have_stable_codes_and_roles_are_kept(pipeline, people):
    light = provision(pipeline, "street_light", city=CITY)
    path = f"/api/v1/devices/{light.device_id}/commands"
    unknown = people["op-a"].post(path, json={"command": "sound"})
    assert unknown.status_code == 422 and unknown.json()["detail"]["code"] == "unknown_command"
    bad = people["op-a"].post(path, json={"command": "dim", "params": {"level": 150}})
    assert bad.status_code == 422 and bad.json()["detail"]["code"] == "bad_parameters"
    assert people["integrator"].post(path, json={"command": "on"}).status_code == 403
    listing = people["integrator"].get(path)
    assert listing.status_code == 200 and {c["command"] for c in listing.json()["catalogue"]} == {
        "on", "off", "dim", "set_interval",
    }  # fmt: skip
    other_city = provision(pipeline, "street_light", city="cmdkota-other")
    assert (
        people["op-a"].post(f"/api/v1/devices/{other_city.device_id}/commands", json={"command": "on"}).status_code
        == 404
    )
    made = [people["op-a"].post(path, json={"command": "on"}) for _ in range(11)]
    assert [m.status_code for m in made] == [201] * 10 + [429]
    assert made[-1].json()["detail"]["code"] == "rate_limited"
    assert len(people["op-b"].get(path).json()["commands"]) == 10
    for not_an_id in ("-" * 36, "x"):
        assert people["op-b"].get(f"{path}/{not_an_id}").status_code == 422
        assert people["op-b"].post(f"{path}/{not_an_id}/approve").status_code == 422
    assert people["op-b"].get(f"{path}/{uuid.uuid4()}").status_code == 404


def test_the_cli_sends_lists_and_approves_through_the_api(pipeline):
    siren = provision(pipeline, "flood_siren", city=CITY)
    asker, approver = _token(pipeline, unique_id("cli-a"), "operator"), _token(pipeline, unique_id("cli-b"), "operator")
    sent = kota_ok(pipeline, "commands", "send", siren.device_id, "sound", "--token", asker)
    command_id = sent.split()[0]
    assert "awaiting_approval" in sent and f"kota commands approve {siren.device_id} {command_id}" in sent
    refused = run_kota(pipeline, "commands", "approve", siren.device_id, command_id, "--token", asker)
    assert refused.returncode == 1 and "own_command" in refused.stderr
    assert "queued" in kota_ok(pipeline, "commands", "approve", siren.device_id, command_id, "--token", approver)
    bad = run_kota(
        pipeline, "commands", "send", siren.device_id, "set_interval", "--param", "seconds=0", "--token", asker
    )
    assert bad.returncode == 1 and "bad_parameters" in bad.stderr
    listing = kota_ok(pipeline, "commands", "list", siren.device_id, env={"KOTA_API_TOKEN": approver})
    assert "obeys: sound (critical), stop, set_interval" in listing and command_id in listing


def test_the_commander_role_may_move_commands_along_and_nothing_more(pipeline):
    commander = pipeline.model_copy(update={"postgres_user": "kota_commander"})
    with psycopg.connect(commander.postgres_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("kota_commander",)
        conn.execute("SELECT count(*) FROM device_commands").fetchone()
        for refused in (
            "SELECT count(*) FROM users",
            "SELECT count(*) FROM readings",
            "SELECT count(*) FROM audit_log",
            "INSERT INTO device_commands (command_id, device_id, city, command, status, requested_by, expires_at) "
            "VALUES (gen_random_uuid(), 'x', 'x', 'on', 'queued', 'x', now())",
            "DELETE FROM device_commands",
            "UPDATE devices SET enabled = false",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(refused)
