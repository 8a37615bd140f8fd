"""False signals on series that never change: what the detectors raise on streams with no anomaly.

    .venv/bin/python -m bench.stationary

NAB's files are few and its windows few; the recordings the detectors will meet are many, and most
of their readings are ordinary. This prints how often the processor's detectors signal (a score at
the processor's anomaly threshold, 0.3) on stationary synthetic streams of common shapes: Gaussian
noise, counts (Poisson), heavy tails (lognormal, exponential, Student's t with 3 degrees of
freedom), a load resting at 0 with bursts, readings rounded to a coarse resolution, an
autocorrelated process, a random walk and a daily cycle. 10,000 readings at 5 minutes each (35
days), five seeds, signals counted after the first 1,000 readings (the detectors' and the
likelihood's learning). Nothing is an anomaly, so every signal is false.

Beside them, in the same run: the likelihood alone (spikes and dips not judged raw beside it) and
the raw scores (the kernels' defaults). At 0.3 the likelihood reports a short mean of raw scores
whose tail probability under the series' own Gaussian fit is 1e-3 or less, so a series whose raw
scores average like a Gaussian would signal about 9 times in 9,000 readings before quiet periods;
heavier tails signal more. docs/processing.md, "False signals on stationary streams", has the
figures and what they mean for unseen recordings.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import numpy as np

from bench.nab import kota_scores
from processing import kernels
from processing.settings import ProcessorSettings

READINGS = 10_000
LEARNING = 1_000
SEEDS = (0, 1, 2, 3, 4)
INTERVAL_MS = 300_000.0


def autoregressive(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    out = np.empty(n)
    level = 0.0
    for i, shock in enumerate(rng.normal(0, 1, n)):
        level = phi * level + shock
        out[i] = level
    return out


Family = Callable[[np.random.Generator, np.ndarray], np.ndarray]
FAMILIES: dict[str, Family] = {
    "gaussian": lambda rng, ts: rng.normal(50, 5, len(ts)),
    "poisson, mean 0.3": lambda rng, ts: rng.poisson(0.3, len(ts)).astype(float),
    "poisson, mean 3": lambda rng, ts: rng.poisson(3, len(ts)).astype(float),
    "poisson, mean 50": lambda rng, ts: rng.poisson(50, len(ts)).astype(float),
    "lognormal, sigma 1": lambda rng, ts: rng.lognormal(0, 1, len(ts)),
    "exponential": lambda rng, ts: rng.exponential(1, len(ts)),
    "student t, 3 dof": lambda rng, ts: rng.standard_t(3, len(ts)),
    "0 with 5% bursts": lambda rng, ts: np.where(rng.random(len(ts)) < 0.05, rng.exponential(2, len(ts)), 0.0),
    "gaussian rounded": lambda rng, ts: np.round(rng.normal(20, 0.4, len(ts))),
    "autoregressive 0.95": lambda rng, ts: autoregressive(rng, len(ts), 0.95),
    "random walk": lambda rng, ts: np.cumsum(rng.normal(0, 1, len(ts))),
    "daily cycle": lambda rng, ts: 10 * np.sin(ts / 86_400_000 * 2 * np.pi) + rng.normal(0, 1, len(ts)),
}


def detector_sets() -> dict[str, np.ndarray]:
    alone = kernels.LIKELIHOOD_PARAMS.copy()
    alone[kernels.param_index("raw_points")] = 0.0
    return {
        "processor's detectors": kernels.LIKELIHOOD_PARAMS,
        "likelihood alone": alone,
        "raw scores": kernels.DEFAULT_PARAMS,
    }


def false_signals(family: Family, params: np.ndarray, seed: int, threshold: float) -> int:
    rng = np.random.default_rng(seed)
    ts = np.arange(READINGS) * INTERVAL_MS
    scores = kota_scores(ts, family(rng, ts), params=params)
    return int((scores[LEARNING:] >= threshold).sum())


def main() -> None:
    threshold = ProcessorSettings().anomaly_threshold
    sets = detector_sets()
    print(
        f"false signals (score >= {threshold}) in readings {LEARNING:,}-{READINGS:,} of stationary streams, "
        f"median (range) over {len(SEEDS)} seeds"
    )
    print(f"{'stream':<22}" + "".join(f"{name:>24}" for name in sets))
    totals = dict.fromkeys(sets, 0)
    for label, family in FAMILIES.items():
        cells = []
        for name, params in sets.items():
            counts = [false_signals(family, params, seed, threshold) for seed in SEEDS]
            totals[name] += sum(counts)
            cells.append(f"{statistics.median(counts):g} ({min(counts)}-{max(counts)})")
        print(f"{label:<22}" + "".join(f"{cell:>24}" for cell in cells))
    print(f"{'all, per seed':<22}" + "".join(f"{totals[name] / len(SEEDS):>24.1f}" for name in sets))


if __name__ == "__main__":
    main()
