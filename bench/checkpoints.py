"""Detector checkpoint writes: what one costs the batch transaction that carries it.

    .venv/bin/python -m bench.checkpoints [--series 17800] [--rounds 5] [--evict-series 100000] [--sizes-only]

A checkpoint is every series' detector state as one deflated .npz blob (processing.detect.serialize),
about 600 bytes a series. It is written into `detector_checkpoints.state` inside a batch's transaction, so
the stream waits for it. Timed, interleaved in the same run: snapshot and serialisation in the
processor, then the INSERT into a temporary copy of the table with the column compressed as
PostgreSQL does by default (STORAGE EXTENDED, pglz) and stored as it comes (STORAGE EXTERNAL, what
migration 0007 sets). Runs against the benchmarks' stack (.kota-bench/, ports shifted by 200).

First, without the database: the checkpoint's size at 100,000 series (bytes, and per series), against
the way checkpoints were written before (not deflated) in the same run, and
before and after evicting the half of them silent past ProcessorSettings.evict_after_days, with
what an eviction check costs (`--sizes-only` stops there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from bench import start_bench_stack
from bench.city_offline import DEFAULT_START, city_readings
from processing import kernels
from processing.detect import Detectors, DetectorSnapshot, serialize, snapshot_npz
from processing.processor import new_detectors
from processing.settings import ProcessorSettings
from simulators.anomalies import Injector, plan
from simulators.city import build_city


def say(message: str) -> None:
    print(f"bench.checkpoints: {message}", flush=True)


def learned_detectors(n_series: int) -> Detectors:
    """Detectors holding n_series series of learned state: what the processor's detectors hold after
    two simulated days of a city (bench.city_offline: 100 devices, weekend profiles on, so both
    kinds of day are filled), the series repeated to n_series under keys of their own. Real running
    means and spreads compress as these do: the copies of a series lie 60 kB apart or more in the
    state and the profiles (314 series a copy), beyond zlib's 32 kB window, so repeating them
    compresses nothing more there (the ranges and kinds, a few distinct values, compress anyway)."""
    start_ms = int(DEFAULT_START.timestamp() * 1000)
    city = build_city("bench", 100, seed=4)
    learnt = new_detectors(ProcessorSettings())
    ticks = 48 * 60
    injector = Injector(plan(city, start_ms, start_ms + ticks * 60_000, 60_000))
    for ts_ms, readings in city_readings(city, injector, start_ms, ticks, 60_000):
        ids = learnt.series_ids([(device, metric) for device, metric, _ in readings])
        learnt.score(ids, np.full(len(ids), float(ts_ms)), np.array([value for *_, value in readings]))
    one = learnt.snapshot()
    rows = np.arange(n_series) % learnt.n_series
    detectors = Detectors(learnt.params.copy())
    detectors.restore(
        DetectorSnapshot(
            {(f"city-device-{i:05d}", "pm25"): i for i in range(n_series)},
            one.state[rows],
            one.hourly[:, rows],
            one.low[rows],
            one.high[rows],
            one.params,
            one.measured[rows],
        )
    )
    return detectors


def checkpoint_bytes(detectors: Detectors) -> int:
    """A checkpoint's size as stored: the series keys (JSON) and the deflated .npz blob."""
    series, blob = serialize(detectors.snapshot())
    return len(json.dumps(series)) + len(blob)


def size_figures(detectors: Detectors, rounds: int = 5) -> None:
    """A checkpoint's size now and as it was written before (same state, same run), and what making
    each costs (median and range of `rounds`)."""
    n = detectors.n_series
    times: dict[str, list[float]] = {"now": [], "before": []}
    sizes: dict[str, int] = {}
    for _ in range(rounds):
        for way, make in (("now", lambda s: serialize(s)[1]), ("before", snapshot_npz)):
            started = time.perf_counter()
            blob = make(detectors.snapshot())
            times[way].append(time.perf_counter() - started)
            sizes[way] = len(blob)
    keys = len(json.dumps(serialize(detectors.snapshot())[0]))
    for way, label in (("before", "as it comes (before)"), ("now", "deflated")):
        total = sizes[way] + keys
        t = times[way]
        say(
            f"{n:,} series, {label}: {total / 1e6:.1f} MB, {total / n:,.0f} bytes a series; snapshot and "
            f"serialisation {1000 * statistics.median(t):.0f} ms (range {1000 * min(t):.0f}-{1000 * max(t):.0f})"
        )
    say(f"{(sizes['before'] + keys) / (sizes['now'] + keys):.1f}x smaller")


def eviction_figures(detectors: Detectors) -> None:
    """Checkpoint size before and after evicting the half silent for 31 days
    (ProcessorSettings.evict_after_days, 30); what an eviction check costs with nothing to evict
    (every check but a few) and with half to evict (compaction)."""
    n_series = detectors.n_series
    now_ms = 1_800_000_000_000.0
    last_ts = detectors.state[:n_series, kernels.LAST_TS]
    last_ts[:] = now_ms - 60_000.0
    last_ts[::2] = now_ms - 31 * kernels.DAY_MS  # every other series silent for 31 days
    after_ms = 30.0 * kernels.DAY_MS
    before = checkpoint_bytes(detectors)
    nothing = []
    for _ in range(5):
        started = time.perf_counter()
        detectors.evict_silent(now_ms, 40.0 * kernels.DAY_MS)  # nothing that silent
        nothing.append(time.perf_counter() - started)
    started = time.perf_counter()
    evicted = int((detectors.evict_silent(now_ms, after_ms) < 0).sum())
    compaction = time.perf_counter() - started
    after = checkpoint_bytes(detectors)
    say(
        f"evicting {evicted:,} silent for 31 days: checkpoint {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB "
        f"({after / detectors.n_series:,.0f} bytes a series, {detectors.n_series:,} left)"
    )
    say(
        f"an eviction check over {n_series:,} series: {1000 * statistics.median(nothing):.2f} ms with nothing "
        f"to evict (median of 5), {1000 * compaction:.0f} ms evicting half (compaction)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=17_800, help="series in one partition's detectors")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--evict-series", type=int, default=100_000, help="series for the eviction figures")
    parser.add_argument("--sizes-only", action="store_true", help="sizes and eviction only: no database")
    args = parser.parse_args()
    detectors = learned_detectors(args.evict_series)
    size_figures(detectors, args.rounds)
    eviction_figures(detectors)
    if args.sizes_only:
        return
    stack = start_bench_stack(say)
    detectors = learned_detectors(args.series)
    started = time.perf_counter()
    series, blob = serialize(detectors.snapshot())
    say(
        f"{args.series:,} series: snapshot and serialisation {1000 * (time.perf_counter() - started):.0f} ms, "
        f"{len(blob) / 1e6:.1f} MB"
    )
    timings: dict[str, list[float]] = {"extended": [], "external": []}
    with psycopg.connect(stack.postgres_dsn) as conn:
        for storage in timings:
            conn.execute(f"CREATE TEMP TABLE checkpoints_{storage} (LIKE detector_checkpoints INCLUDING DEFAULTS)")
            conn.execute(f"ALTER TABLE checkpoints_{storage} ALTER COLUMN state SET STORAGE {storage}")
        conn.commit()
        for _ in range(args.rounds):
            for storage, times in timings.items():
                started = time.perf_counter()
                conn.execute(
                    f"INSERT INTO checkpoints_{storage} (consumer_group, topic, partition, next_offset, "
                    "series, state) VALUES ('bench', 'bench', 0, 0, %s, %s)",
                    (Jsonb(series), blob),
                )
                conn.commit()
                times.append(time.perf_counter() - started)
                conn.execute(f"TRUNCATE checkpoints_{storage}")
                conn.commit()
    ms = {storage: 1000 * statistics.median(times) for storage, times in timings.items()}
    say(
        f"INSERT of one checkpoint, median of {args.rounds}: compressed (EXTENDED, the default) "
        f"{ms['extended']:.0f} ms, as it comes (EXTERNAL) {ms['external']:.0f} ms: "
        f"{ms['extended'] / ms['external']:.1f}x faster"
    )


if __name__ == "__main__":
    main()
