"""NAB benchmark: run the streaming detectors over ../shared/data/nab and print the standard-profile score.

    .venv/bin/python -m bench.nab

Each file is one series, fed to processing.detect.Detectors in micro-batches of 100 readings in
time order, exactly as the processor would. Baselines in the same run: the null detector (0 by
definition), a random detector, and a plain windowed-Gaussian z-score detector. The published
scoreboard (all 58 NAB files): ARTime 74.9, Numenta HTM 70.5, CAD OSE 69.9, Skyline 58.2,
KNN CAD 58.0, Windowed Gaussian 39.6, random 11.0. This folder holds 18 of the 58 files, so the
figures are indicative, not comparable one to one. The second row gives weekends a profile of
their own, as the processor does for a city.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np

from kota.settings import PROJECT_ROOT
from processing import kernels
from processing.detect import Detectors
from simulators.scoring import ScoredFile, corpus_score, prepare

NAB = PROJECT_ROOT.parent / "shared" / "data" / "nab"


def _ms(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp).replace(tzinfo=dt.UTC).timestamp() * 1000


def load_corpus(root: Path = NAB) -> list[tuple[str, np.ndarray, np.ndarray, list[tuple[int, int]]]]:
    """(name, epoch ms, values, windows as inclusive index ranges) per labelled file."""
    labels = json.loads((root / "combined_windows.json").read_text())
    corpus = []
    for name, windows in sorted(labels.items()):
        with (root / name).open() as f:
            rows = list(csv.DictReader(f))
        ts = np.array([_ms(r["timestamp"]) for r in rows])
        values = np.array([float(r["value"]) for r in rows])
        spans = []
        for start, end in windows:
            first = int(np.searchsorted(ts, _ms(start), side="left"))
            last = int(np.searchsorted(ts, _ms(end), side="right")) - 1
            spans.append((first, last))
        corpus.append((name, ts, values, spans))
    return corpus


def kota_scores(ts: np.ndarray, values: np.ndarray, batch: int = 100, params: np.ndarray | None = None) -> np.ndarray:
    detector = Detectors(params)
    ids = detector.series_ids(["series"])
    out = np.zeros(len(values))
    for start in range(0, len(values), batch):
        chunk = slice(start, start + batch)
        out[chunk] = detector.score(np.repeat(ids, len(values[chunk])), ts[chunk], values[chunk])[0]
    return out


def windowed_gaussian_scores(values: np.ndarray, window: int = 6400) -> np.ndarray:
    """NAB's 'windowed Gaussian' idea: tail probability of the value against the recent window."""
    out = np.zeros(len(values))
    for i in range(len(values)):
        past = values[max(0, i - window) : i]
        if past.size > 10 and past.std() > 0:
            z = abs(values[i] - past.mean()) / past.std()
            out[i] = 1 - np.exp(-max(z - 1, 0) / 2)
    return out


# The processor gives weekends a profile of their own (ProcessorSettings.weekend_profiles): a city
# follows the week. NAB's recordings are one to two weeks long, too short to learn weekends from.
# NAB's times are local, so local time is UTC here.
WEEKEND_PARAMS = kernels.params_with(weekends=1.0, utc_offset_hours=0.0)


def main() -> None:
    corpus = load_corpus()
    rng = np.random.default_rng(0)
    detectors = {
        "kota (numba streaming)": kota_scores,
        "kota, weekend profiles": lambda ts, v: kota_scores(ts, v, params=WEEKEND_PARAMS),
        "windowed gaussian": lambda ts, v: windowed_gaussian_scores(v),
        "random": lambda ts, v: rng.random(len(v)),
    }
    print(
        f"NAB standard profile over {len(corpus)} files, {sum(len(c[2]) for c in corpus):,} points, "
        f"{sum(len(c[3]) for c in corpus)} labelled windows"
    )
    print(f"{'detector':<26} {'score':>6} {'threshold':>9} {'TP':>4} {'FP':>5} {'FN':>4} {'seconds':>8}")
    for label, detector in detectors.items():
        started = time.perf_counter()
        files: list[ScoredFile] = [prepare(name, detector(ts, values), windows) for name, ts, values, windows in corpus]
        elapsed = time.perf_counter() - started
        result = corpus_score(files)
        print(
            f"{label:<26} {result.score:>6.1f} {result.threshold:>9.3f} {result.tp:>4} {result.fp:>5} "
            f"{result.fn:>4} {elapsed:>8.2f}"
        )
    print("null detector scores 0.0 and a perfect one 100.0 by construction; published Numenta HTM: 70.5")


if __name__ == "__main__":
    main()
