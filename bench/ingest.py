"""Ingest benchmark: readings per second from MQTT (QoS 1) into Kafka, kota gateway vs a naive bridge.

    .venv/bin/python -m bench.ingest [--quick]

For each bridge and payload kind, the messages are first queued in Mosquitto for the bridge's
persistent session while the bridge is stopped; then the bridge starts and drains them into Kafka.
So the publisher's speed is not measured, only the bridge's. The rate is readings divided by the
span of the Kafka record timestamps (producer send times), which leaves the bridge's start-up out;
CPU is the bridge process's user+system time over the same drain. Both bridges run on this same
machine, interleaved, three times each; the table shows medians. Compare the ratio, not the
absolute figures: the machine is shared and Kafka's round-trip time (the naive bridge's limit)
varies from run to run.

Runs its own stack (state folder .kota-bench/, ports shifted by 200) and leaves it running for the
next run; `KOTA_STATE_DIR=.kota-bench KOTA_PORT_OFFSET=200 kota down` stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench import start_bench_stack
from deploy import mqtt_access, procs
from deploy import stack as local
from kota.contract import READINGS_TOPIC, device_telemetry_topic, gateway_telemetry_topic
from kota.mqtt import MqttLogin, connect
from kota.registry import Gateway, new_device, upsert_devices, upsert_gateway
from kota.settings import PROJECT_ROOT, StackSettings

PASSWORD = "bench-secret"
GATEWAY = "bench-gw"
SINGLE = "bench-single"
BATCH_DEVICES = [f"bench-batch-{i:02d}" for i in range(10)]
KOTA_CLIENT_ID = "kota-bench-gateway"
NAIVE_CLIENT_ID = "kota-naive-bridge"


@dataclass
class Result:
    kind: str
    bridge: str
    readings: int
    seconds: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.readings / self.seconds

    @property
    def cpu_ms_per_10k(self) -> float:
        return self.cpu_s * 1000 / self.readings * 10_000


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def setup() -> StackSettings:
    stack = start_bench_stack(say)
    with psycopg.connect(stack.postgres_dsn) as conn:
        upsert_gateway(conn, Gateway(GATEWAY, "benchkota"), PASSWORD)
        devices = [new_device(SINGLE, "benchkota", "water_level")]
        devices += [new_device(d, "benchkota", "water_level", gateway_id=GATEWAY) for d in BATCH_DEVICES]
        upsert_devices(conn, devices, {d.device_id: PASSWORD for d in devices})
    mqtt_access.unlock_devices(stack)
    return stack


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_bridge(stack: StackSettings, bridge: str) -> int:
    env = {"KOTA_GATEWAY_CLIENT_ID": KOTA_CLIENT_ID}
    if bridge == "kota":
        return local.start_component(stack, "gateway", instance="bench-bridge", env=env)
    argv = [sys.executable, "-m", "bench.naive_bridge"]
    return procs.spawn(stack, "bench-bridge", argv, env={**local.component_env(stack), **env}, cwd=PROJECT_ROOT)


def forget_session(stack: StackSettings, client_id: str) -> None:
    """Connect with a clean session under that client id: the broker drops its queue and subscriptions."""
    password = mqtt_access.ingest_password(stack, local.mosquitto_dir(stack))
    connect(MqttLogin(stack.mqtt_port, mqtt_access.INGEST_USER, password), client_id).disconnect()


def prime(stack: StackSettings, bridge: str) -> None:
    """Give the bridge a persistent session with its subscription, then stop it: messages now queue for it."""
    forget_session(stack, NAIVE_CLIENT_ID if bridge == "kota" else KOTA_CLIENT_ID)
    start_bridge(stack, bridge)
    if not mqtt_access.wait_for_ingest_subscription(stack, 60):
        raise SystemExit(f"{bridge} bridge did not subscribe; see {procs.log_file(stack, 'bench-bridge')}")
    procs.stop(stack, "bench-bridge")


def publish(stack: StackSettings, kind: str, messages: int, base_ts: int) -> tuple[int, int]:
    """Queue the messages in the broker; return (readings, Kafka records they become)."""
    sender = SINGLE if kind == "single" else GATEWAY
    client = connect(MqttLogin(stack.mqtt_port, sender, PASSWORD), f"bench-pub-{kind}")
    acknowledged: set[int] = set()
    client.on_publish = lambda _c, _u, mid, _rc, _p: acknowledged.add(mid)
    mids = []
    if kind == "single":
        topic = device_telemetry_topic("benchkota", "environment", SINGLE)
        for i in range(messages):
            mids.append(client.publish(topic, json.dumps({"ts": base_ts + i, "values": {"currentLevel": i % 900}}),
                                       qos=1).mid)
        readings, records = messages, messages
    else:
        topic = gateway_telemetry_topic("benchkota", GATEWAY)
        for m in range(messages):
            body = {d: [{"ts": base_ts + m * 10 + s, "values": {"currentLevel": (m + s) % 900}} for s in range(10)]
                    for d in BATCH_DEVICES}
            mids.append(client.publish(topic, json.dumps(body), qos=1).mid)
        readings, records = messages * 100, messages * len(BATCH_DEVICES)
    deadline = time.monotonic() + 300
    while len(acknowledged) < len(mids):  # mids wrap at 65535; the counts still match
        if time.monotonic() > deadline:
            raise SystemExit("the broker did not acknowledge every benchmark message")
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    return readings, records


async def kafka_end(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
    return await consumer.end_offsets(partitions)


async def drain(stack: StackSettings, bridge: str, kind: str, readings: int, records: int) -> Result:
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()  # noqa: SLF001
        partitions = [TopicPartition(READINGS_TOPIC, p) for p in consumer.partitions_for_topic(READINGS_TOPIC)]
        before = await kafka_end(consumer, partitions)
        pid = start_bridge(stack, bridge)
        cpu_first = None
        deadline = time.monotonic() + 600
        while True:
            end = await kafka_end(consumer, partitions)
            landed = sum(end[tp] - before[tp] for tp in partitions)
            if landed and cpu_first is None:
                cpu_first = cpu_seconds(pid)
            if landed >= records:
                cpu_last = cpu_seconds(pid)
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{bridge}: only {landed} of {records} records reached Kafka")
            await asyncio.sleep(0.02)
        procs.stop(stack, "bench-bridge")
        # The span of producer timestamps of exactly these records.
        consumer.assign(partitions)
        first_ts, last_ts = None, None
        for tp in partitions:
            consumer.seek(tp, before[tp])
        remaining = records
        while remaining > 0:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for tp, recs in batch.items():
                for r in recs:
                    if r.offset < end[tp]:
                        remaining -= 1
                        first_ts = r.timestamp if first_ts is None else min(first_ts, r.timestamp)
                        last_ts = r.timestamp if last_ts is None else max(last_ts, r.timestamp)
        assert first_ts is not None and last_ts is not None
        seconds = max(last_ts - first_ts, 1) / 1000
        return Result(kind, bridge, readings, seconds, cpu_last - (cpu_first or cpu_last))
    finally:
        await consumer.stop()


def run_one(stack: StackSettings, bridge: str, kind: str, messages: int, base_ts: int) -> Result:
    prime(stack, bridge)
    readings, records = publish(stack, kind, messages, base_ts)
    say(f"{bridge:<5} {kind:<6}: {messages} messages queued ({readings} readings); draining")
    result = asyncio.run(drain(stack, bridge, kind, readings, records))
    say(f"{bridge:<5} {kind:<6}: {result.rate:,.0f} readings/s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, once each (a smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each bridge and payload (default 3)")
    args = parser.parse_args()
    scale, repeats = (0.1, 1) if args.quick else (1.0, args.repeats)
    stack = setup()
    base = int(time.time() * 1000) - 3 * 86_400_000  # distinct timestamps per run, all in the accepted past
    sizes = {("kota", "single"): 10_000, ("naive", "single"): 2_000,
             ("kota", "batch"): 1_000, ("naive", "batch"): 200}
    runs: dict[tuple[str, str], list[Result]] = {key: [] for key in sizes}
    step = 0
    for _ in range(repeats):
        for (bridge, kind), messages in sizes.items():
            runs[(bridge, kind)].append(run_one(stack, bridge, kind, max(10, int(messages * scale)),
                                                base + step * 5_000_000))
            step += 1

    def median(key: tuple[str, str], attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in runs[key])

    print()
    print(f"MQTT (QoS 1) -> Kafka (acks=all, idempotent); each bridge measured alone; median of {repeats} run(s)")
    print(f"{'payload':<28} {'bridge':<7} {'readings/run':>12} {'readings/s':>11} {'CPU ms / 10k readings':>22}")
    for (bridge, kind), results in runs.items():
        label = "1 reading per message" if kind == "single" else "gateway batch, 100 readings"
        print(f"{label:<28} {bridge:<7} {results[0].readings:>12,} {median((bridge, kind), 'rate'):>11,.0f} "
              f"{median((bridge, kind), 'cpu_ms_per_10k'):>22,.0f}")
    print()
    ratios = {kind: median(("kota", kind), "rate") / median(("naive", kind), "rate") for kind in ("single", "batch")}
    for kind, ratio in ratios.items():
        print(f"{kind:<6}: kota gateway is {ratio:,.1f}x the naive bridge")
    batch_rate = median(("kota", "batch"), "rate")
    print(f"goal: >= 50,000 readings/s with gateway batches ({batch_rate:,.0f}: "
          f"{'met' if batch_rate >= 50_000 else 'NOT met'}), >= 10x the naive bridge "
          f"(batches {ratios['batch']:,.1f}x: {'met' if ratios['batch'] >= 10 else 'NOT met'})")


if __name__ == "__main__":
    main()
