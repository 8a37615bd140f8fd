"""Detector checkpoint writes: what one costs the batch transaction that carries it.

    .venv/bin/python -m bench.checkpoints [--series 17800] [--rounds 5] [--evict-series 100000] [--sizes-only]

A checkpoint is every series' detector state as one .npz blob (processing.detect.serialize), about
1.2 kB a series. It is written into `detector_checkpoints.state` inside a batch's transaction, so
the stream waits for it. Timed, interleaved in the same run: snapshot and serialisation in the
processor, then the INSERT into a temporary copy of the table with the column compressed as
PostgreSQL does by default (STORAGE EXTENDED, pglz) and stored as it comes (STORAGE EXTERNAL, what
migration 0007 sets). Runs against the benchmarks' stack (.kota-bench/, ports shifted by 200).

First, without the database: the checkpoint's size at 100,000 series (bytes, and per series), and
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
from processing import kernels
from processing.detect import Detectors, serialize


def say(message: str) -> None:
    print(f"bench.checkpoints: {message}", flush=True)


def learned_detectors(n_series: int) -> Detectors:
    """Detectors with n_series series whose state and hour-of-day profiles hold learned values (noise,
    which compresses about as badly as real running means do)."""
    detectors = Detectors(kernels.DEFAULT_PARAMS.copy())
    detectors.series_ids([(f"city-device-{i:05d}", "pm25") for i in range(n_series)])
    rng = np.random.default_rng(3)
    detectors.state[:n_series] = rng.normal(50, 10, detectors.state[:n_series].shape)
    detectors.hourly[:, :n_series] = rng.normal(50, 10, detectors.hourly[:, :n_series].shape)
    return detectors


def checkpoint_bytes(detectors: Detectors) -> int:
    """A checkpoint's size as stored: the series keys (JSON) and the .npz blob."""
    series, blob = serialize(detectors.snapshot())
    return len(json.dumps(series)) + len(blob)


def eviction_figures(n_series: int) -> None:
    """Checkpoint size at `n_series`, and before and after evicting the half silent for 31 days
    (ProcessorSettings.evict_after_days, 30); what an eviction check costs with nothing to evict
    (every check but a few) and with half to evict (compaction)."""
    detectors = learned_detectors(n_series)
    now_ms = 1_800_000_000_000.0
    last_ts = detectors.state[:n_series, kernels.LAST_TS]
    last_ts[:] = now_ms - 60_000.0
    last_ts[::2] = now_ms - 31 * kernels.DAY_MS  # every other series silent for 31 days
    after_ms = 30.0 * kernels.DAY_MS
    before = checkpoint_bytes(detectors)
    say(f"{n_series:,} series: checkpoint {before / 1e6:.1f} MB, {before / n_series:,.0f} bytes a series")
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
    eviction_figures(args.evict_series)
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
