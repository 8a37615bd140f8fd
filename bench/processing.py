"""Processing benchmark: the detector and aggregation kernels, the processor from Kafka into the
database with exactly-once on, and the database write paths.

    (River, the baseline, is installed by ./bootstrap.sh with the project's bench extra)
    .venv/bin/python -m bench.processing [--quick] [--only kernels|processor|writes|relations]

1. Kernels, one core: 1M readings over 10k series, micro-batches of 10k, through every detector
   (rate of change on too) and one-minute partials. Baselines in the same run: the same detector
   logic in plain Python (tests/reference_detectors.py) and River's HalfSpaceTrees, each timed on a
   slice and reported as readings/s, with the ratio.
2. Processor: readings queued on Kafka while the processor is stopped, then drained into the
   database by `kota processor` (exactly-once transactions, detection, rules, alerts) with one
   worker process, then with two (the default, processing/workers.py) and up to `--workers N`;
   the rate is taken between the polls past 10% and past 90% stored, which leaves start-up out.
   Each run is a consumer group of its own, started at the topic's end: a city of 2,000 stations
   (pm25 every 10 s, records of 50 readings), whatever earlier runs left in the database.
3. Relations on the stack: stations reporting PM2.5 and PM10 in one record, one worker, with the
   detectors' relations off and on back to back six times, which goes first alternating: medians,
   ranges and the median of each pair's ratio.
4. Database writes: the same rows into a fresh table by COPY (text and binary) and by executemany,
   interleaved; and columns sent as array parameters in text against binary, as the store sends them.

Runs its own stack (.kota-bench/, ports shifted by 200), shared with bench.ingest.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import time

import numpy as np
import psycopg

from bench import start_bench_stack
from kota.contract import RELATIONS
from kota.schema import partition_name
from kota.settings import StackSettings
from processing import kernels
from processing.detect import Detectors, PlainReading
from processing.processor import apply_settings
from processing.settings import ProcessorSettings


def say(message: str) -> None:
    print(message, flush=True)


def synthetic_stream(n: int, n_series: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Readings of n_series sensors reporting in turn (random order within each round), with daily
    cycles, noise and rare spikes; event times increase like a live stream."""
    rng = np.random.default_rng(seed)
    series = np.concatenate([rng.permutation(n_series) for _ in range(n // n_series + 1)])[:n].astype(np.int64)
    rounds = np.arange(n) // n_series
    ts = 1_790_000_000_000.0 + rounds * 10_000.0 + (np.arange(n) % n_series) * (10_000.0 / n_series)
    daily = np.sin(2 * np.pi * ts / 86_400_000.0)
    values = 50.0 + 10.0 * (series % 7) + 8.0 * daily + rng.normal(0, 1.5, n)
    values[rng.random(n) < 1e-4] += 80.0
    return series, ts, values


def bench_kernels(
    n: int, n_series: int, batch: int, slice_python: int, slice_river: int, passes: int = 3
) -> dict[str, float]:
    series, ts, values = synthetic_stream(n, n_series)
    out_series = np.empty(batch, np.int64)
    out_bucket = np.empty(batch)
    out_stats = np.empty((batch, kernels.AGG_COLUMNS))
    # Warm the JIT (compiled on first call, or loaded from numba's cache) on a copy of the state.
    warm = Detectors(kernels.ALL_DETECTORS_PARAMS, initial_series=n_series)
    warm.series_ids(range(n_series))
    warm.score(series[:batch], ts[:batch], values[:batch])
    kernels.minute_partials(series[:batch], ts[:batch], values[:batch], 60_000.0, out_series, out_bucket, out_stats)

    # The best of a few passes, each from fresh state, as timeit does: a single pass is too short to
    # trust on a shared host (docs/processing.md, "How we got here"). The processor's detectors (the
    # anomaly likelihood over graded raw scores, with its settings) and every raw detector, the
    # processor's default before, in the same run: their ratio is what the likelihood costs.
    configurations = {
        "kernels": apply_settings(kernels.LIKELIHOOD_PARAMS.copy(), ProcessorSettings()),
        "kernels, raw scores": kernels.ALL_DETECTORS_PARAMS,
    }
    results: dict[str, float] = {}
    for label, params in configurations.items():
        kernel_s = float("inf")
        for _ in range(passes):
            detectors = Detectors(params, initial_series=n_series)
            ids = detectors.series_ids(range(n_series))
            assert (ids == np.arange(n_series)).all()
            started = time.process_time()
            windows = 0
            for start in range(0, n, batch):
                stop = start + batch
                detectors.score(series[start:stop], ts[start:stop], values[start:stop])
                windows += kernels.minute_partials(
                    series[start:stop], ts[start:stop], values[start:stop], 60_000.0, out_series, out_bucket, out_stats
                )
            kernel_s = min(kernel_s, time.process_time() - started)
        results[label] = n / kernel_s
        say(
            f"{label}: {n:,} readings over {n_series:,} series in {kernel_s:.3f} s CPU, best of {passes} "
            f"({results[label]:,.0f} readings/s, {windows:,} one-minute partials)"
        )
    say(f"the anomaly likelihood costs {results['kernels, raw scores'] / results['kernels']:.2f}x the raw scores' time")

    from tests.reference_detectors import reference_scores

    params = kernels.ALL_DETECTORS_PARAMS
    ranges = {s: (-np.inf, np.inf) for s in range(n_series)}
    rows = list(
        zip(series[:slice_python].tolist(), ts[:slice_python].tolist(), values[:slice_python].tolist(), strict=True)
    )
    python_s = float("inf")
    for _ in range(passes):  # best of the same number of passes as the kernels, from fresh state
        states: dict = {}
        started = time.process_time()
        reference_scores(rows, params, ranges, states)
        partials: dict[tuple[int, int], list[float]] = {}
        for s, t, x in rows:  # the same one-minute partials in plain Python
            p = partials.setdefault((s, int(t // 60_000)), [0, 0.0, 0.0, x, x])
            p[0] += 1
            p[1] += x
            p[2] += x * x
            p[3] = min(p[3], x)
            p[4] = max(p[4], x)
        python_s = min(python_s, time.process_time() - started)
    results["python"] = slice_python / python_s
    say(
        f"plain Python, same logic: {slice_python:,} readings in {python_s:.2f} s CPU "
        f"({results['python']:,.0f} readings/s)"
    )

    from river import anomaly

    # River learns one model per series too; models are built before the clock starts, on a stream of
    # 100 series so each model sees enough readings to reach its steady per-reading cost.
    r_series, r_ts, r_values = synthetic_stream(slice_river, 100, seed=2)
    river_s = float("inf")
    for _ in range(passes):
        models = {s: anomaly.HalfSpaceTrees(n_trees=10, height=6, window_size=50, seed=1) for s in range(100)}
        started = time.process_time()
        for s, t, x in zip(r_series.tolist(), r_ts.tolist(), r_values.tolist(), strict=True):
            features = {"value": (x - 50.0) / 120.0, "hour": (t // 3_600_000 % 24) / 24.0}
            models[s].score_one(features)
            models[s].learn_one(features)
        river_s = min(river_s, time.process_time() - started)
    results["river"] = slice_river / river_s
    say(
        f"River HalfSpaceTrees (10 trees, height 6, one model per series): {slice_river:,} readings in "
        f"{river_s:.2f} s CPU ({results['river']:,.0f} readings/s)"
    )
    say(
        f"kernels vs plain Python: {results['kernels'] / results['python']:,.0f}x; "
        f"vs River HalfSpaceTrees: {results['kernels'] / results['river']:,.0f}x; goal 10,000,000 readings/s"
    )
    results.update(bench_relations(passes=passes))
    return results


def bench_relations(devices: int = 3_000, ticks: int = 20, batch_ticks: int = 2, passes: int = 3) -> dict[str, float]:
    """What judging relations between metrics costs the processor's entry point (`score_readings`,
    with the pairing in Python and `kernels.relation_batch`), against the same readings without
    relations, in the same run: a city of air stations (8 metrics, two relations), noise meters (2
    metrics, one) and water meters (2 metrics, none), a reading a minute each."""
    rng = np.random.default_rng(3)
    kinds = (
        ("air", ("pm1", "pm25", "pm10", "no2", "o3", "co", "so2", "temperature")),
        ("noise", ("LAeq", "LAmax")),
        ("water", ("pressure", "waterConsumption")),
    )
    batches: list[list[PlainReading]] = []
    for tick in range(ticks):
        if tick % batch_ticks == 0:
            batches.append([])
        ts = 1_790_000_000_000 + tick * 60_000
        for d in range(devices):
            name, metrics = kinds[d % 3]
            level = 20.0 + d % 50
            batches[-1] += [
                PlainReading(f"{name}-{d}", m, ts, level * (1 + 0.1 * i) + rng.normal(0, 2))
                for i, m in enumerate(metrics)
            ]
    readings = sum(len(b) for b in batches)
    params = apply_settings(kernels.LIKELIHOOD_PARAMS.copy(), ProcessorSettings())
    Detectors(params, relations=RELATIONS).score_readings(batches[0], 0)  # warm the JIT
    results: dict[str, float] = {}
    for label, relations in (("without relations", ()), ("with relations", RELATIONS)):
        best = float("inf")
        for _ in range(passes):
            detectors = Detectors(params, relations=relations)
            started = time.process_time()
            for batch in batches:
                detectors.score_readings(batch, 0)
            best = min(best, time.process_time() - started)
        results[f"score_readings, {label}"] = readings / best
        say(
            f"score_readings {label}: {readings:,} readings in {best:.3f} s CPU, best of {passes} "
            f"({readings / best:,.0f}/s)"
        )
    ratio = results["score_readings, without relations"] / results["score_readings, with relations"]
    say(f"relations between metrics cost {ratio:.2f}x the time of score_readings without them")
    return results


def bench_database_writes(dsn: str, rows: int, rounds: int) -> dict[str, float]:
    data = [
        (
            1_790_000_000_000 + i * 1000,
            f"bench-{i % 1000:04d}",
            "pressure",
            float(i % 97),
            "bar",
            1_790_000_000_000 + i * 1000,
        )
        for i in range(rows)
    ]
    timings: dict[str, list[float]] = {"copy": [], "binary copy": [], "executemany": []}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(rounds):
            for method in timings:
                conn.execute("DROP TABLE IF EXISTS bench_writes")
                conn.execute(
                    "CREATE UNLOGGED TABLE bench_writes (ts_ms bigint, device_id text, metric text, "
                    "value double precision, unit text, received_ms bigint)"
                )
                started = time.perf_counter()
                with conn.transaction(), conn.cursor() as cur:
                    if method == "copy":
                        with cur.copy("COPY bench_writes FROM STDIN") as copy:
                            for row in data:
                                copy.write_row(row)
                    elif method == "binary copy":  # what processing.store stages readings with
                        with cur.copy("COPY bench_writes FROM STDIN (FORMAT BINARY)") as copy:
                            copy.set_types(["int8", "text", "text", "float8", "text", "int8"])
                            for row in data:
                                copy.write_row(row)
                    else:
                        cur.executemany("INSERT INTO bench_writes VALUES (%s, %s, %s, %s, %s, %s)", data)
                timings[method].append(time.perf_counter() - started)
        conn.execute("DROP TABLE IF EXISTS bench_writes")
    rates = {m: rows / statistics.median(t) for m, t in timings.items()}
    say(
        f"database writes of {rows:,} rows, median of {rounds}: COPY {rates['copy']:,.0f} rows/s, "
        f"binary COPY {rates['binary copy']:,.0f} rows/s, executemany {rates['executemany']:,.0f} rows/s "
        f"(COPY {rates['copy'] / rates['executemany']:.1f}x, binary COPY "
        f"{rates['binary copy'] / rates['executemany']:.1f}x executemany)"
    )
    return rates


def bench_array_parameters(dsn: str, rows: int, rounds: int) -> dict[str, float]:
    """The newest value per series as processing.store upserts them: columns as array parameters to
    one `unnest`, sent as text (%s) or binary (%b). Timed as a SELECT over the unnest, which is the
    part that differs: the client's dumping of the lists and the server's parsing of them."""
    columns = (
        [f"bench-{i:05d}" for i in range(rows)],
        ["pm25"] * rows,
        [1_790_000_000_000 + i for i in range(rows)],
        [i * 1.1 for i in range(rows)],
        ["ug/m3"] * rows,
    )
    query = "SELECT count(*) FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::float8[], %s::text[])"
    timings: dict[str, list[float]] = {"text": [], "binary": []}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(rounds):
            for form, placeholder in (("text", "%s"), ("binary", "%b")):
                started = time.perf_counter()
                conn.execute(query.replace("%s", placeholder), columns).fetchone()
                timings[form].append(time.perf_counter() - started)
    ms = {form: 1000 * statistics.median(t) for form, t in timings.items()}
    say(
        f"array parameters, {rows:,} rows of 5 columns, median of {rounds}: text {ms['text']:.1f} ms, "
        f"binary {ms['binary']:.1f} ms a round trip (binary {ms['text'] / ms['binary']:.1f}x faster)"
    )
    return ms


def end_offsets(stack: StackSettings) -> dict[int, int]:
    """Where each partition of the readings topic ends now."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from kota.contract import READINGS_TOPIC

    async def ends() -> dict[int, int]:
        consumer = AIOKafkaConsumer(**stack.kafka_client_options(), enable_auto_commit=False, group_id=None)
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(READINGS_TOPIC)
            if not partitions:  # a fresh client has no metadata yet
                await consumer._client.force_metadata_update()  # noqa: SLF001
                partitions = consumer.partitions_for_topic(READINGS_TOPIC) or set()
            offsets = await consumer.end_offsets([TopicPartition(READINGS_TOPIC, p) for p in sorted(partitions)])
            return {tp.partition: offset for tp, offset in offsets.items()}
        finally:
            await consumer.stop()

    return asyncio.run(ends())


def start_group_at_the_end(stack: StackSettings, group: str) -> None:
    """Store offsets for a new consumer group at the topic's end, where the processor seeks on start:
    it reads only what is produced from now on. Each run gets a group of its own, so its processor
    holds the detector state of this run's devices only, not every earlier run's (whose checkpoints
    made the measurement swing with the number of runs before it: docs/processing.md)."""
    from kota.contract import READINGS_TOPIC

    ends = end_offsets(stack)
    with psycopg.connect(stack.postgres_dsn) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO stream_offsets (consumer_group, topic, partition, next_offset) VALUES (%s, %s, %s, %s)",
            [(group, READINGS_TOPIC, p, offset) for p, offset in ends.items()],
        )


def drain_into_the_default_group(stack: StackSettings, group: str) -> None:
    """After a run: the stack's own group (`kota processor` as the other benchmarks start it) reads
    the run's records too, here, so that the next benchmark's processor does not spend its timed
    window on them (they are stored already: each batch goes the duplicate path). The run's group
    is dropped."""
    from deploy import components, procs
    from kota.contract import READINGS_TOPIC
    from processing.settings import ProcessorSettings

    def behind() -> int:
        with psycopg.connect(stack.postgres_dsn) as conn:
            stored: dict[int, int] = dict(
                conn.execute(
                    "SELECT partition, next_offset FROM stream_offsets WHERE consumer_group = %s AND topic = %s",
                    (ProcessorSettings().group_id, READINGS_TOPIC),
                ).fetchall()
            )
        return sum(max(0, end - stored.get(p, 0)) for p, end in ends.items())

    ends = end_offsets(stack)
    components.start_component(stack, "processor")
    while (records := behind()) > 0:
        say(f"the stack's own processor group catching up with the run: {records:,} records to go")
        time.sleep(5)
    procs.stop(stack, "processor")
    with psycopg.connect(stack.postgres_dsn) as conn:
        for table in ("stream_offsets", "detector_checkpoints"):
            conn.execute(f"DELETE FROM {table} WHERE consumer_group = %s", (group,))  # noqa: S608 (names above)


def bench_processor(
    stack: StackSettings, readings: int, workers: int = 1, pairs: bool = False, relations: bool = True
) -> float:
    """Readings per second stored by `kota processor` with `workers` workers. `pairs`: each station
    reports PM2.5 and PM10 together (a relation the detectors judge, when `relations` is on)."""
    from aiokafka import AIOKafkaProducer

    from deploy import components, procs
    from kota.contract import READINGS_TOPIC, Reading, encode_device_batch

    procs.stop(stack, "processor")
    run = f"bench{time.time_ns() % 10**9}"
    group = f"kota-processor-{run}"  # the processor's Kafka user may join only groups named so
    start_group_at_the_end(stack, group)
    n_devices, per_record = 2_000, 50
    now = int(time.time() * 1000)

    # Each tick a record holds: PM2.5 alone, or with PM10 (half the ticks, so the same readings a record).
    ticks, tick_ms = (per_record // 2, 20_000) if pairs else (per_record, 10_000)

    def sizes(d: int, i: int) -> tuple[tuple[str, float], ...]:
        """Each metric of a tick and its share of PM2.5's value."""
        return (("pm25", 1.0), ("pm10", 0.6 + 0.01 * ((d + i) % 5))) if pairs else (("pm25", 1.0),)

    async def produce() -> None:
        producer = AIOKafkaProducer(**stack.kafka_client_options(), acks="all", linger_ms=20, max_batch_size=1 << 20)
        await producer.start()
        try:
            pending = []
            per_device = readings // n_devices
            for offset in range(0, per_device, per_record):
                for d in range(n_devices):
                    device = f"{run}-{d:05d}"
                    batch = [
                        Reading(
                            now - 3_600_000 + (offset + i) * tick_ms,
                            "benchkota",
                            "environment",
                            device,
                            metric,
                            float(20 + (d + offset + i) % 17) / share,
                            "ug/m3",
                            now,
                            "bench",
                        )
                        for i in range(ticks)
                        for metric, share in sizes(d, i)
                    ]
                    pending.append(await producer.send(READINGS_TOPIC, encode_device_batch(batch), key=device.encode()))
            await asyncio.gather(*pending)
        finally:
            await producer.stop()

    say(f"queueing {readings:,} readings of {n_devices:,} devices on Kafka with the processor stopped")
    asyncio.run(produce())

    def stored() -> int:
        with psycopg.connect(stack.postgres_dsn) as conn:
            row = conn.execute(
                "SELECT coalesce(sum(n), 0) FROM agg_1m WHERE device_id LIKE %s", (run + "%",)
            ).fetchone()
        return int(row[0]) if row else 0

    # Workers of one `kota processor` share the topic's partitions, each with its own database
    # connection: one worker and its database backend take turns, so one leaves a core idle.
    components.start_component(
        stack,
        "processor",
        env={
            "KOTA_PROCESSOR_WORKERS": str(workers),
            "KOTA_PROCESSOR_GROUP_ID": group,
            "KOTA_PROCESSOR_RELATIONS": "true" if relations else "false",
        },
    )
    # (time, stored count) at the first poll past 10% and the first past 90%. The rate is the readings
    # stored between those two polls over the time between them, not 80% of the run: the processor
    # commits in batches of up to a quarter of the run. Polled every 0.5 s: each poll costs about 20 ms.
    marks: dict[float, tuple[float, int]] = {}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        count = stored()
        for fraction in (0.1, 0.9):
            if fraction not in marks and count >= fraction * readings:
                marks[fraction] = (time.monotonic(), count)
        if count >= readings:
            break
        time.sleep(0.5)
    (t_from, n_from), (t_to, n_to) = marks[0.1], marks[0.9]
    assert t_to > t_from, "one batch held the whole run: give it more readings"
    rate = (n_to - n_from) / (t_to - t_from)
    procs.stop(stack, "processor")  # the next user starts it with its own settings
    drain_into_the_default_group(stack, group)
    what = f", PM2.5 with PM10, relations {'on' if relations else 'off'}" if pairs else ""
    say(
        f"processor with {workers} worker{'s' if workers > 1 else ''}{what}, Kafka to database with exactly-once on: "
        f"{rate:,.0f} readings/s "
        f"({n_to - n_from:,} readings stored in {t_to - t_from:.1f} s, from past 10% to past 90% of {readings:,}; "
        f"goal 100,000)"
    )
    say(database_state(stack, now - 3_600_000))
    return rate


def bench_processor_relations(stack: StackSettings, readings: int, pairs: int) -> float:
    """What judging relations costs a processor worker on the stack: PM2.5 and PM10 reported
    together, one worker, relations off and on back to back `pairs` times, which goes first
    alternating (each run adds its readings to the same day's partition, and inserts slow as it
    grows). The machine is shared and noisy: medians and ranges, and the median of each pair's
    ratio. Returns that ratio (time a reading with relations over time without)."""
    rates: dict[bool, list[float]] = {False: [], True: []}
    ratios = []
    for n in range(pairs):
        run: dict[bool, float] = {}
        for relations in (False, True) if n % 2 == 0 else (True, False):
            run[relations] = bench_processor(stack, readings, 1, pairs=True, relations=relations)
            rates[relations].append(run[relations])
        ratios.append(run[False] / run[True])
    for relations, label in ((False, "off"), (True, "on")):
        r = rates[relations]
        spread = f"range {min(r):,.0f}-{max(r):,.0f}, {pairs} runs"
        say(f"relations {label}: median {statistics.median(r):,.0f} readings/s ({spread})")
    ratio = statistics.median(ratios)
    say(
        f"relations cost a worker {ratio:.3f}x the time per reading (median of {pairs} pairs' ratios, "
        f"range {min(ratios):.3f}-{max(ratios):.3f})"
    )
    return ratio


def database_state(stack: StackSettings, ts_ms: int) -> str:
    """How big the partition the readings went into has grown (each run adds its readings to the same
    day), so that runs can be compared on like states (docs/processing.md, "How we got here")."""
    name = partition_name(dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC).date())
    with psycopg.connect(stack.postgres_dsn) as conn:
        row = conn.execute(
            "SELECT c.reltuples::bigint, pg_size_pretty(pg_indexes_size(c.oid)), current_setting('shared_buffers') "
            "FROM pg_class c WHERE c.relname = %s",
            (name,),
        ).fetchone()
    if row is None:
        return f"(no partition {name}: TimescaleDB, or the readings went to the default partition)"
    rows, index_size, buffers = row
    return (
        f"database state: partition {name} holds about {max(rows, 0):,} readings, indexes {index_size} "
        f"(shared_buffers {buffers})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--only", choices=("kernels", "processor", "writes", "relations"))
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="run the processor bench with 1..N worker processes sharing the partitions",
    )
    args = parser.parse_args()
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    if args.only in (None, "kernels"):
        bench_kernels(
            100_000 if args.quick else 1_000_000,
            10_000,
            10_000,
            3_000 if args.quick else 20_000,
            1_000 if args.quick else 5_000,
        )
    if args.only in (None, "processor", "writes", "relations"):
        stack = start_bench_stack(say)
        if args.only in (None, "relations"):
            bench_processor_relations(stack, 100_000 if args.quick else 400_000, 1 if args.quick else 6)
        if args.only in (None, "processor"):
            for workers in range(1, args.workers + 1):
                bench_processor(stack, 50_000 if args.quick else 400_000, workers)
        if args.only in (None, "writes"):
            bench_database_writes(stack.postgres_dsn, 20_000 if args.quick else 100_000, 3)
            bench_array_parameters(stack.postgres_dsn, 5_000, 5 if args.quick else 15)


if __name__ == "__main__":
    main()
