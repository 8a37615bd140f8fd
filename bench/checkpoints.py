"""Detector checkpoint writes: what one costs the batch transaction that carries it.

    .venv/bin/python -m bench.checkpoints [--series 17800] [--rounds 5]

A checkpoint is every series' detector state as one .npz blob (processing.detect.serialize), about
1.2 kB a series. It is written into `detector_checkpoints.state` inside a batch's transaction, so
the stream waits for it. Timed, interleaved in the same run: snapshot and serialisation in the
processor, then the INSERT into a temporary copy of the table with the column compressed as
PostgreSQL does by default (STORAGE EXTENDED, pglz) and stored as it comes (STORAGE EXTERNAL, what
migration 0007 sets). Runs against the benchmarks' stack (.kota-bench/, ports shifted by 200).
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=17_800, help="series in one partition's detectors")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
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
