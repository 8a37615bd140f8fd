"""Ingest benchmark: readings per second from MQTT (QoS 1) into Kafka, kota gateway vs a naive bridge;
and one device flooding while 1,000 others report, against the same run without the flood.

    .venv/bin/python -m bench.ingest [--quick] [--only throughput|flood]

For each bridge and payload kind, the messages are first queued in Mosquitto for the bridge's
persistent session while the bridge is stopped; then the bridge starts and drains them into Kafka.
So the publisher's speed is not measured, only the bridge's. The rate is readings divided by the
span of the Kafka record timestamps (producer send times), which leaves the bridge's start-up out;
CPU is the bridge process's user+system time over the same drain. Both bridges run on this same
machine, interleaved, three times each; the table shows medians. Compare the ratio, not the
absolute figures: the machine is shared and Kafka's round-trip time (the naive bridge's limit)
varies from run to run.

The flood case runs the kota gateway live: 1,000 devices each publish one reading a second (QoS 1)
for the run, stamped with the time of publishing; their latency is the Kafka record's time (the
gateway's send) minus that stamp. Three runs: no flood; one device flooding as fast as it can
publish with the per-device rate limit on (the default); and the same flood with the limit off.

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
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench import start_bench_stack
from deploy import components, folders, mosquitto, mqtt_access, procs
from kota.contract import READINGS_TOPIC, device_telemetry_topic, gateway_telemetry_topic
from kota.mqtt import MqttLogin, connect
from kota.registry import Gateway, new_device, set_rate_limit, upsert_devices, upsert_gateway
from kota.settings import PROJECT_ROOT, StackSettings

PASSWORD = "bench-secret"
GATEWAY = "bench-gw"
SINGLE = "bench-single"
BATCH_DEVICES = [f"bench-batch-{i:02d}" for i in range(10)]
OTHERS = [f"bench-other-{i:04d}" for i in range(1000)]
FLOODER = "bench-flooder"
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
        for account in (GATEWAY, SINGLE):  # drained from a queue as fast as the bridge goes: no rate limit
            set_rate_limit(conn, account, 0)
        others = [new_device(d, "benchkota", "water_level") for d in [*OTHERS, FLOODER]]
        upsert_devices(conn, others, {d.device_id: PASSWORD for d in others})
        for device in others:
            set_rate_limit(conn, device.device_id, None)  # the defaults
    mqtt_access.unlock_devices(stack)
    return stack


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_bridge(stack: StackSettings, bridge: str) -> int:
    env = {"KOTA_GATEWAY_CLIENT_ID": KOTA_CLIENT_ID}
    if bridge == "kota":
        return components.start_component(stack, "gateway", instance="bench-bridge", env=env)
    argv = [sys.executable, "-m", "bench.naive_bridge"]
    return procs.spawn(stack, "bench-bridge", argv, env={**components.component_env(stack), **env}, cwd=PROJECT_ROOT)


def forget_session(stack: StackSettings, client_id: str) -> None:
    """Connect with a clean session under that client id: the broker drops its queue and subscriptions."""
    password = mqtt_access.ingest_password(stack, folders.mosquitto_dir(stack))
    connect(MqttLogin(stack.mqtt_ingest_port, mqtt_access.INGEST_USER, password), client_id).disconnect()


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
            mids.append(
                client.publish(topic, json.dumps({"ts": base_ts + i, "values": {"currentLevel": i % 900}}), qos=1).mid
            )
        readings, records = messages, messages
    else:
        topic = gateway_telemetry_topic("benchkota", GATEWAY)
        for m in range(messages):
            body = {
                d: [{"ts": base_ts + m * 10 + s, "values": {"currentLevel": (m + s) % 900}} for s in range(10)]
                for d in BATCH_DEVICES
            }
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
    consumer = AIOKafkaConsumer(**stack.kafka_client_options(), enable_auto_commit=False, group_id=None)
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


# -- one device flooding while 1,000 report ---------------------------------------------------
def _flood(port: int, seconds: float, counter: Any) -> None:
    """In a process of its own: publish as fast as the broker takes it for `seconds` (QoS 1, at most
    5,000 unacknowledged), as a device gone wrong."""
    import paho.mqtt.client as mqtt

    client = connect(MqttLogin(port, FLOODER, PASSWORD), FLOODER, max_queued=5000)
    topic = device_telemetry_topic("benchkota", "environment", FLOODER)
    deadline, sent, ts = time.monotonic() + seconds, 0, int(time.time() * 1000) - 3_600_000
    while time.monotonic() < deadline:
        info = client.publish(topic, b'{"ts": %d, "values": {"currentLevel": 5}}' % (ts + sent), qos=1)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            time.sleep(0.001)  # the broker has not acknowledged enough yet
        else:
            sent += 1
    time.sleep(2)
    counter.value = sent
    client.disconnect()
    client.loop_stop()


@dataclass
class FloodResult:
    case: str
    others_sent: int
    others_arrived: int
    p50_ms: float
    p99_ms: float
    flood_sent: int
    flood_forwarded: int


async def _others_latency(
    stack: StackSettings, since: dict[Any, int], expected: int, timeout_s: float
) -> tuple[list[float], int]:
    """Latencies (ms) of the others' readings written since `since`, and how many of the flooder's."""
    consumer = AIOKafkaConsumer(**stack.kafka_client_options(), enable_auto_commit=False, group_id=None)
    await consumer.start()
    latencies: list[float] = []
    flood = 0
    try:
        consumer.assign(list(since))
        for tp, offset in since.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while len(latencies) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=20_000)
            for records in batch.values():
                for record in records:
                    body = json.loads(record.value)
                    if body["device"] == FLOODER:
                        flood += len(body["r"])
                    elif body["device"].startswith("bench-other-"):
                        latencies += [record.timestamp - r[0] for r in body["r"]]
    finally:
        await consumer.stop()
    return latencies, flood


def _report(port: int, devices: list[str], seconds: float, ready: Any, go: Any, counter: Any) -> None:
    """In a process of its own (paho's select() takes at most ~340 clients a process): connect
    `devices`, then from `go` publish one reading a second each, stamped with the time of publishing."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        clients = list(pool.map(lambda d: connect(MqttLogin(port, d, PASSWORD), d, timeout_s=120), devices))
    ready.release()
    go.wait()
    topics = [device_telemetry_topic("benchkota", "environment", d) for d in devices]
    sent, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        tick = time.monotonic()
        for client, topic in zip(clients, topics, strict=True):
            client.publish(topic, b'{"ts": %d, "values": {"currentLevel": 7}}' % (time.time_ns() // 1_000_000), qos=1)
            sent += 1
        time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    time.sleep(2)  # let the last publishes out
    counter.value = sent
    for client in clients:
        client.disconnect()
        client.loop_stop()


REPORTERS = 4  # processes publishing for the 1,000 others


def run_flood_case(stack: StackSettings, case: str, seconds: float) -> FloodResult:
    import multiprocessing

    # The flooder's rate limit comes from the registry, which the running gateway reads every 10 s:
    # the gateway is not restarted between cases (a restart locks devices out until it subscribes).
    with psycopg.connect(stack.postgres_dsn) as conn:
        set_rate_limit(conn, FLOODER, 0 if case == "flood, no rate limit" else None)
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Semaphore(0), ctx.Event()
    counters = [ctx.Value("q", 0) for _ in range(REPORTERS)]
    reporters = [
        ctx.Process(target=_report, args=(stack.mqtt_port, OTHERS[i::REPORTERS], seconds, ready, go, c))
        for i, c in enumerate(counters)
    ]
    for process in reporters:
        process.start()
    for _ in reporters:
        if not ready.acquire(timeout=300):
            raise SystemExit("the reporting devices did not connect")
    time.sleep(11)  # the gateway has read the flooder's rate limit by now
    since = asyncio.run(_end_offsets(stack))
    flood_counter = ctx.Value("q", 0)
    flooder = None
    if case != "no flood":
        flooder = ctx.Process(target=_flood, args=(stack.mqtt_port, seconds, flood_counter))
        flooder.start()
    go.set()
    for process in reporters:
        process.join()
    if flooder is not None:
        flooder.join()
    sent = sum(int(c.value) for c in counters)
    latencies, flood_forwarded = asyncio.run(_others_latency(stack, since, sent, timeout_s=120))
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    return FloodResult(case, sent, len(latencies), pct(0.5), pct(0.99), int(flood_counter.value), flood_forwarded)


async def _end_offsets(stack: StackSettings) -> dict[Any, int]:
    consumer = AIOKafkaConsumer(**stack.kafka_client_options(), enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()  # noqa: SLF001
        partitions = [TopicPartition(READINGS_TOPIC, p) for p in consumer.partitions_for_topic(READINGS_TOPIC)]
        return dict(await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()


def flood_cases(stack: StackSettings, seconds: float, repeats: int) -> None:
    procs.stop(stack, "bench-bridge")
    forget_session(stack, KOTA_CLIENT_ID)  # start from an empty queue
    components.start_component(
        stack, "gateway", instance="bench-bridge", env={"KOTA_GATEWAY_CLIENT_ID": KOTA_CLIENT_ID}
    )
    mosquitto.open_devices_when_ingest_subscribed(stack, say, timeout_s=60)
    results: dict[str, list[FloodResult]] = {}
    try:
        for _ in range(repeats):
            for case in ("no flood", "flood, rate limit on", "flood, no rate limit"):
                result = run_flood_case(stack, case, seconds)
                say(
                    f"{case}: others p50 {result.p50_ms:.0f} ms, p99 {result.p99_ms:.0f} ms, "
                    f"{result.others_arrived}/{result.others_sent} arrived; flooder sent {result.flood_sent:,}, "
                    f"forwarded {result.flood_forwarded:,}"
                )
                results.setdefault(case, []).append(result)
    finally:
        procs.stop(stack, "bench-bridge")
    print()
    print(
        f"1,000 devices at 1 reading/s each, {seconds:.0f} s a run, latency publish -> Kafka; "
        f"median of {repeats} run(s) [min-max]"
    )
    print(f"{'case':<24} {'p50 ms':>16} {'p99 ms':>20} {'others arrived':>15} {'flood sent':>11} {'forwarded':>10}")
    for case, rs in results.items():

        def spread(attr: str, rs: list[FloodResult] = rs) -> str:
            values = [getattr(r, attr) for r in rs]
            return f"{statistics.median(values):,.0f} [{min(values):,.0f}-{max(values):,.0f}]"

        print(
            f"{case:<24} {spread('p50_ms'):>16} {spread('p99_ms'):>20} "
            f"{sum(r.others_arrived for r in rs) / sum(r.others_sent for r in rs):>14.1%} "
            f"{statistics.median(r.flood_sent for r in rs):>11,.0f} "
            f"{statistics.median(r.flood_forwarded for r in rs):>10,.0f}"
        )
    base = statistics.median(r.p99_ms for r in results["no flood"])
    limited = statistics.median(r.p99_ms for r in results["flood, rate limit on"])
    unlimited = statistics.median(r.p99_ms for r in results["flood, no rate limit"])
    print(
        f"others' p99 under a flood: {limited / base:,.1f}x the no-flood run with the rate limit, "
        f"{unlimited / base:,.1f}x without it"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, once each (a smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each bridge and payload (default 3)")
    parser.add_argument("--only", choices=("throughput", "flood"), help="one of the two benchmarks")
    parser.add_argument("--flood-seconds", type=float, default=20.0, help="length of each flood-case run")
    args = parser.parse_args()
    scale, repeats = (0.1, 1) if args.quick else (1.0, args.repeats)
    stack = setup()
    if args.only != "flood":
        throughput(stack, scale, repeats)
    if args.only != "throughput":
        flood_cases(stack, args.flood_seconds / (4 if args.quick else 1), repeats)


def throughput(stack: StackSettings, scale: float, repeats: int) -> None:
    base = int(time.time() * 1000) - 3 * 86_400_000  # distinct timestamps per run, all in the accepted past
    sizes = {("kota", "single"): 10_000, ("naive", "single"): 2_000, ("kota", "batch"): 1_000, ("naive", "batch"): 200}
    runs: dict[tuple[str, str], list[Result]] = {key: [] for key in sizes}
    step = 0
    for _ in range(repeats):
        for (bridge, kind), messages in sizes.items():
            runs[(bridge, kind)].append(
                run_one(stack, bridge, kind, max(10, int(messages * scale)), base + step * 5_000_000)
            )
            step += 1

    def median(key: tuple[str, str], attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in runs[key])

    print()
    print(f"MQTT (QoS 1) -> Kafka (acks=all, idempotent); each bridge measured alone; median of {repeats} run(s)")
    print(f"{'payload':<28} {'bridge':<7} {'readings/run':>12} {'readings/s':>11} {'CPU ms / 10k readings':>22}")
    for (bridge, kind), results in runs.items():
        label = "1 reading per message" if kind == "single" else "gateway batch, 100 readings"
        print(
            f"{label:<28} {bridge:<7} {results[0].readings:>12,} {median((bridge, kind), 'rate'):>11,.0f} "
            f"{median((bridge, kind), 'cpu_ms_per_10k'):>22,.0f}"
        )
    print()
    ratios = {kind: median(("kota", kind), "rate") / median(("naive", kind), "rate") for kind in ("single", "batch")}
    for kind, ratio in ratios.items():
        print(f"{kind:<6}: kota gateway is {ratio:,.1f}x the naive bridge")
    batch_rate = median(("kota", "batch"), "rate")
    print(
        f"goal: >= 50,000 readings/s with gateway batches ({batch_rate:,.0f}: "
        f"{'met' if batch_rate >= 50_000 else 'NOT met'}), >= 10x the naive bridge "
        f"(batches {ratios['batch']:,.1f}x: {'met' if ratios['batch'] >= 10 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
