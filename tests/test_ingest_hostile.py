"""Hostile input through the real broker into the running gateway: it stays up, its memory stays
bounded, and every message is accounted for, as readings stored or as its one dead letter."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from pathlib import Path

import psycopg
from aiokafka import AIOKafkaConsumer

from deploy import components, mosquitto, procs
from ingest.parse import ParseLimits, parse_message
from kota.contract import DEADLETTER_TOPIC, decode_dead_letter, device_telemetry_topic, gateway_telemetry_topic
from kota.registry import load_devices, load_gateways, set_rate_limit
from kota.settings import PROJECT_ROOT
from tests.helpers import (
    mqtt_client,
    provision,
    provision_gateway,
    query,
    wait_for,
)

INJECT = Path(__file__).parent / "inject"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _hostile_payloads(rng: random.Random, base_ts: int, index: int, metrics: list[str]) -> object | bytes:
    """One message a careless or hostile device might send; times unique to `index`."""
    ts = base_ts + index * 100
    kind = rng.randrange(16)
    metric = rng.choice(metrics)
    if kind == 0:
        return {"ts": ts, "values": {metric: rng.uniform(0, 50)}}  # good
    if kind == 1:
        return [{"ts": ts + i, "values": {m: rng.uniform(0, 50) for m in metrics[:3]}} for i in range(5)]
    if kind == 2:
        return b'{"' + metric.encode() + b'": 1' + b"0" * rng.randrange(300, 6000) + b"}"
    if kind == 3:
        return b'{"ts": 1' + b"0" * rng.randrange(20, 400) + b', "values": {"' + metric.encode() + b'": 1}}'
    if kind == 4:
        depth = rng.randrange(9, 3000)
        return b"[" * depth + b"]" * depth
    if kind == 5:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 6:
        return {"ts": ts, "values": {f"m{i}\nERROR forged\x1b[31m": i for i in range(rng.randrange(1, 3000))}}
    if kind == 7:
        return {"ts": ts, "values": {metric: rng.choice(["x", None, [1], {"a": 1}, True, -1e9, 1e308])}}
    if kind == 8:
        return b'{"' + metric.encode() + b'": NaN, "x": Infinity}'
    if kind == 9:
        return {"ts": rng.choice([-1, 1e20, 2**63, "yesterday", 1.5e12]), "values": {metric: 1}}
    if kind == 10:
        return {}
    if kind == 11:
        return {"ts": ts, "values": {}}
    if kind == 12:
        return {"ts": ts, "values": {metric: rng.uniform(0, 50), "unknownThing": 1}}
    if kind == 13:  # a big message of unknown metrics, close to the payload limit
        return {"ts": ts, "values": {f"n{i}": i for i in range(9_500)}}
    if kind == 14:
        return b"\xff\xfe" + b"{" * 100
    return {"ts": ts, "values": {m: rng.uniform(0, 50) for m in metrics}}


def _senml_payloads(rng: random.Random, base_ts: int, index: int, devices: list[str]) -> object | bytes:
    t = (base_ts + index * 100) / 1000
    device = rng.choice(devices)
    kind = rng.randrange(6)
    if kind == 0:
        return [{"bn": f"{device}/", "bt": t, "n": "currentLevel", "u": "cm", "v": rng.uniform(0, 100)}]
    if kind == 1:
        return [{"bn": f"{device}/", "bt": 1e308, "t": 1e308, "n": "currentLevel", "v": 1}]
    if kind == 2:
        return b'[{"n": "' + device.encode() + b'/currentLevel", "v": 1, "t": 1' + b"0" * 350 + b"}]"
    if kind == 3:
        return [{"n": {"nested": [1, 2]}, "v": 1}]
    if kind == 4:
        return [{"bn": f"{device}/", "bt": t, "n": "currentLevel", "v": 1, "bv": 1e308, "u": "m"}]
    return [{"bn": "stranger/", "bt": t, "n": "currentLevel", "v": 5}]


async def _dead_letters_since(stack, since_ms: int, want: set[str], timeout_s: float) -> dict[str, dict]:
    """Dead letters received since `since_ms`, by payload SHA-256, until every one in `want` is seen."""
    consumer = AIOKafkaConsumer(
        DEADLETTER_TOPIC,
        **stack.kafka_client_options(),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    found: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while not want <= set(found) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batch.values():
                for record in records:
                    letter = decode_dead_letter(record.value)
                    if int(letter["received_ms"]) >= since_ms:
                        found[str(letter["payload_sha256"])] = letter
    finally:
        await consumer.stop()
    return found


def test_thousands_of_hostile_messages_leave_the_gateway_up_bounded_and_accountable(pipeline):
    stack = pipeline
    rng = random.Random(20)
    devices = [provision(stack, "air_quality") for _ in range(3)]
    gateway = provision_gateway(stack)
    bound = [provision(stack, "water_level", gateway_id=gateway.gateway_id) for _ in range(2)]
    with psycopg.connect(stack.postgres_dsn) as conn:
        for account in [*(d.device_id for d in devices), gateway.gateway_id]:
            set_rate_limit(conn, account, 0)  # this test is about content, not rate
    gateway_pid = procs.running_pid(stack, "gateway")
    assert gateway_pid
    rss_before = _rss_mb(gateway_pid)
    gateway_log = procs.log_file(stack, "gateway")
    log_start = gateway_log.stat().st_size
    since_ms = int(time.time() * 1000) - 1000
    base_ts = int(time.time() * 1000) - 3_600_000  # an hour ago: inside the accepted window

    messages: list[tuple[str, str, bytes]] = []  # (sender, topic, payload)
    per_sender = 600
    for d in devices:
        topic = device_telemetry_topic(d.city, d.domain, d.device_id)
        for i in range(per_sender):
            body = _hostile_payloads(rng, base_ts, i, sorted(d.metrics))
            messages.append((d.device_id, topic, body if isinstance(body, bytes) else json.dumps(body).encode()))
    senml_topic = gateway_telemetry_topic(gateway.city, gateway.gateway_id, "senml")
    for i in range(per_sender):
        body = _senml_payloads(rng, base_ts, i, [b.device_id for b in bound])
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        messages.append((gateway.gateway_id, senml_topic, payload))

    clients = {sender: mqtt_client(stack, sender) for sender in {m[0] for m in messages}}
    try:
        infos = [clients[sender].publish(topic, payload, qos=1) for sender, topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=60)
        assert all(info.is_published() for info in infos), "the broker acknowledged every message"
    finally:
        for client in clients.values():
            client.disconnect()

    # What each message should become, by the same checks the gateway runs.
    with psycopg.connect(stack.postgres_dsn) as conn:
        registry, gateways = load_devices(conn), load_gateways(conn)
    expected_readings: set[tuple[str, str, int]] = set()
    expected_letters: set[str] = set()
    for _, topic, payload in messages:
        result = parse_message(
            topic,
            payload,
            devices=registry,
            gateways=gateways,
            received_ms=int(time.time() * 1000),
            limits=ParseLimits(),
        )
        expected_readings |= {(r.device_id, r.metric, r.ts_ms) for r in result.readings}
        if result.rejections:
            expected_letters.add(hashlib.sha256(payload).hexdigest())
    assert expected_readings and len(expected_letters) > 100  # the mix really holds both

    ids = [d.device_id for d in devices] + [b.device_id for b in bound]

    def stored() -> set[tuple[str, str, int]]:
        rows = query(
            stack,
            "SELECT device_id, metric, (extract(epoch FROM ts) * 1000)::bigint FROM readings WHERE device_id = ANY(%s)",
            (ids,),
        )
        return {(d, m, int(t)) for d, m, t in rows}

    wait_for(lambda: stored() >= expected_readings, timeout_s=120, what="every accepted reading stored")
    assert stored() == expected_readings  # nothing more either
    letters = asyncio.run(_dead_letters_since(stack, since_ms, expected_letters, timeout_s=60))
    missing = expected_letters - set(letters)
    assert not missing, f"{len(missing)} rejected messages have no dead letter"
    assert all(len(letter["rejections"]) <= 20 and len(letter["payload"]) <= 16 * 1024 for letter in letters.values())

    assert procs.running_pid(stack, "gateway") == gateway_pid, "the gateway never restarted"
    with open(gateway_log, "rb") as f:
        f.seek(log_start)
        logged = f.read()
    assert b"rejected unknown_metric" in logged  # it did log the device's metric names...
    assert b"\x1b" not in logged and b"\nERROR forged" not in logged  # ...escaped: no terminal codes, no forged lines
    rss_after = _rss_mb(gateway_pid)
    assert rss_after < rss_before + 150, f"gateway memory grew from {rss_before:.0f} to {rss_after:.0f} MB"


def test_an_unexpected_failure_checking_one_message_dead_letters_it_and_ingest_goes_on(pipeline):
    """The boundary around each message: a gateway whose parser raises on one message (a bug planted
    from outside, tests/inject/sitecustomize.py) dead-letters it as internal_error, keeps its pid,
    and stores the next message."""
    stack = pipeline
    device = provision(stack, "noise")
    procs.stop(stack, "gateway")
    try:
        # The checkout after the planted module: it imports the project before `-m` puts the working
        # folder on the path, and must find this checkout's packages, not an installed copy's.
        pythonpath = os.pathsep.join([str(INJECT), str(PROJECT_ROOT)])
        pid = components.start_component(stack, "gateway", env={"PYTHONPATH": pythonpath})
        mosquitto.open_devices_when_ingest_subscribed(stack, print)
        since_ms = int(time.time() * 1000) - 1000
        ts = int(time.time() * 1000) - 60_000
        poison = json.dumps({"ts": ts, "values": {"LAeq": 50.0}, "x": "kota-test-raise-inside-the-parser"}).encode()
        client = mqtt_client(stack, device.device_id)
        try:
            topic = device_telemetry_topic(device.city, device.domain, device.device_id)
            for payload in (poison, json.dumps({"ts": ts + 1000, "values": {"LAeq": 51.0}}).encode()):
                info = client.publish(topic, payload, qos=1)
                info.wait_for_publish(timeout=10)
                assert info.is_published()
        finally:
            client.disconnect()
        wait_for(
            lambda: query(stack, "SELECT value FROM readings WHERE device_id = %s", (device.device_id,)),
            timeout_s=60,
            what="the message after the failing one stored",
        )
        sha = hashlib.sha256(poison).hexdigest()
        letters = asyncio.run(_dead_letters_since(stack, since_ms, {sha}, timeout_s=30))
        assert letters[sha]["reason"] == "internal_error" and letters[sha]["payload"] == poison
        assert procs.running_pid(stack, "gateway") == pid
    finally:
        procs.stop(stack, "gateway")
        components.start_component(stack, "gateway")
        mosquitto.open_devices_when_ingest_subscribed(stack, print)


def test_a_device_over_its_rate_is_dead_lettered_and_counted_not_stored(pipeline):
    stack = pipeline
    device = provision(stack, "noise")
    with psycopg.connect(stack.postgres_dsn) as conn:
        set_rate_limit(conn, device.device_id, 1)  # burst: 60 messages (KOTA_GATEWAY_RATE_BURST_S)
    time.sleep(12)  # the gateway reads rate limits with the registry (every 10 s, or on an unknown sender)
    since_ms = int(time.time() * 1000) - 1000
    base = int(time.time() * 1000) - 600_000
    sent = 300
    client = mqtt_client(stack, device.device_id)
    try:
        topic = device_telemetry_topic(device.city, device.domain, device.device_id)
        infos = [
            client.publish(topic, json.dumps({"ts": base + i * 1000, "values": {"LAeq": 40.0}}), qos=1)
            for i in range(sent)
        ]
        for info in infos:
            info.wait_for_publish(timeout=30)
    finally:
        client.disconnect()

    async def limited() -> int:
        consumer = AIOKafkaConsumer(
            DEADLETTER_TOPIC,
            **stack.kafka_client_options(),
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
        total, quiet_since = 0, time.monotonic()
        try:
            while time.monotonic() - quiet_since < 3:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for record in records:
                        letter = decode_dead_letter(record.value)
                        if int(letter["received_ms"]) >= since_ms and device.device_id in str(letter["topic"]):
                            total += int(letter["reasons"].get("rate_limited", 0))
                            quiet_since = time.monotonic()
        finally:
            await consumer.stop()
        return total

    def count() -> int:
        return int(query(stack, "SELECT count(*) FROM readings WHERE device_id = %s", (device.device_id,))[0][0])

    wait_for(lambda: count() >= 60, timeout_s=60, what="the burst stored")
    time.sleep(2)
    rate_limited = asyncio.run(limited())
    stored = count()
    assert 60 <= stored < 100, stored  # the burst and what refilled meanwhile, not all 300
    assert stored + rate_limited == sent, (stored, rate_limited)  # every message accounted for
    metrics = local_metrics(stack)
    assert 'kota_gateway_rejected_total{reason="rate_limited"}' in metrics


def test_a_device_over_its_readings_budget_has_the_message_refused_whole(pipeline):
    """A message rate alone lets one device write 10,000 readings a message: the readings budget
    (message rate × KOTA_GATEWAY_READINGS_PER_MESSAGE, an hour's burst but at least one full
    message) refuses the message that would overdraw it, whole, with one dead letter."""
    device = provision(pipeline, "noise")
    with psycopg.connect(pipeline.postgres_dsn) as conn:
        # 6 messages at once, then one every 10 s; 1 reading a second, a burst of 10,000 (one full
        # message, more than the hour's 3,600)
        set_rate_limit(conn, device.device_id, 0.1)
    time.sleep(12)  # the gateway reads rate limits with the registry (every 10 s, or on an unknown sender)
    since_ms = int(time.time() * 1000) - 1000
    base = int(time.time() * 1000) - 4 * 3_600_000
    per_message, messages = 4_000, 3  # 4,000 + 4,000 fit the burst; the third overdraws it
    payloads = [
        json.dumps(
            [{"ts": base + (m * per_message + i) * 1000, "values": {"LAeq": 40.0 + i % 7}} for i in range(per_message)]
        ).encode()
        for m in range(messages)
    ]
    client = mqtt_client(pipeline, device.device_id)
    try:
        for payload in payloads:
            topic = device_telemetry_topic(device.city, device.domain, device.device_id)
            client.publish(topic, payload, qos=1).wait_for_publish(timeout=30)
    finally:
        client.disconnect()

    def count() -> int:
        return int(query(pipeline, "SELECT count(*) FROM readings WHERE device_id = %s", (device.device_id,))[0][0])

    wait_for(lambda: count() >= 2 * per_message, timeout_s=60, what="the two messages within the budget")
    hashes = [hashlib.sha256(payload).hexdigest() for payload in payloads]
    letters = asyncio.run(_dead_letters_since(pipeline, since_ms, {hashes[2]}, timeout_s=30))
    assert set(letters) & set(hashes) == {hashes[2]}, "the third message has its dead letter, the first two none"
    letter = letters[hashes[2]]
    assert letter["reasons"] == {"rate_limited": 1}
    assert "readings/s" in letter["rejections"][0]["message"]
    assert count() == 2 * per_message  # the third message stored nothing
    stored_first = query(pipeline, "SELECT min(ts), max(ts) FROM readings WHERE device_id = %s", (device.device_id,))[0]
    assert [int(t.timestamp() * 1000) for t in stored_first] == [base, base + (2 * per_message - 1) * 1000]


def local_metrics(stack) -> str:
    import httpx

    return httpx.get(f"http://127.0.0.1:{stack.gateway_metrics_port}/metrics", timeout=5).text
