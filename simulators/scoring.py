"""NAB scoring (Numenta Anomaly Benchmark), computed as NAB's sweeper does.

For a threshold, a point whose score reaches it is a detection. Inside a labelled window only the
earliest detection counts, worth A_TP * sigmoid of how early it came; a window without one costs
A_FN; a detection outside every window costs A_FP, scaled by how far it lies past the previous
window. Points in the probationary period (the first 15%, at most 750) are not scored. One
threshold is chosen for the whole corpus by sweeping, and the total is normalised so that the
null detector (never detects) scores 0 and the perfect one 100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Profile:
    tp: float
    fp: float
    fn: float


STANDARD = Profile(tp=1.0, fp=0.11, fn=1.0)


def scaled_sigmoid(x: float) -> float:
    return -1.0 if x > 3.0 else 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


MAX_TP = scaled_sigmoid(-1.0)


def probation_length(n: int, percent: float = 0.15) -> int:
    return int(min(math.floor(percent * n), percent * 5000))


@dataclass
class ScoredFile:
    """What a file contributes at any threshold, precomputed: per-point weights if detected."""

    name: str
    scores: np.ndarray  # the detector's score per point
    window_of: np.ndarray  # window index per point, -1 outside windows
    tp_weight: np.ndarray  # weighted TP score per point (inside windows)
    fp_weight: np.ndarray  # weighted FP score per point (outside windows)
    scorable: np.ndarray  # False in the probationary period
    n_windows: int


def prepare(name: str, scores: np.ndarray, windows: list[tuple[int, int]], profile: Profile = STANDARD) -> ScoredFile:
    """`windows` are (first, last) point indices, inclusive, in time order."""
    n = len(scores)
    window_of = np.full(n, -1)
    tp_weight = np.zeros(n)
    fp_weight = np.zeros(n)
    for w, (first, last) in enumerate(windows):
        width = last - first + 1
        for i in range(first, last + 1):
            window_of[i] = w
            tp_weight[i] = scaled_sigmoid(-(last - i + 1) / width) * profile.tp / MAX_TP
    previous: tuple[int, int] | None = None
    upcoming = iter(windows)
    next_window = next(upcoming, None)
    for i in range(n):
        while next_window is not None and i > next_window[1]:
            previous, next_window = next_window, next(upcoming, None)
        if window_of[i] >= 0:
            continue
        if previous is None:
            fp_weight[i] = -1.0 * profile.fp
        else:
            position = abs(previous[1] - i) / max(previous[1] - previous[0], 1)
            fp_weight[i] = scaled_sigmoid(position) * profile.fp
    scorable = np.arange(n) >= probation_length(n)
    return ScoredFile(name, np.asarray(scores, dtype=float), window_of, tp_weight, fp_weight, scorable, len(windows))


def file_score(f: ScoredFile, threshold: float, profile: Profile = STANDARD) -> tuple[float, int, int, int]:
    """(raw score, true positives, false positives, false negatives) at a threshold."""
    detected = (f.scores >= threshold) & f.scorable
    outside = detected & (f.window_of < 0)
    raw = float(f.fp_weight[outside].sum())
    tp = 0
    for w in range(f.n_windows):
        hits = np.flatnonzero(detected & (f.window_of == w))
        if hits.size:
            raw += f.tp_weight[hits[0]]  # the earliest detection in the window
            tp += 1
        else:
            raw -= profile.fn
    return raw, tp, int(outside.sum()), f.n_windows - tp


@dataclass(frozen=True)
class CorpusScore:
    score: float  # normalised: null detector 0, perfect 100
    threshold: float
    raw: float
    tp: int
    fp: int
    fn: int


def corpus_score(files: list[ScoredFile], profile: Profile = STANDARD, max_thresholds: int = 400) -> CorpusScore:
    """Sweep one threshold over the corpus; return the best normalised score."""
    all_scores = np.concatenate([f.scores[f.scorable] for f in files])
    quantiles = np.quantile(all_scores, np.linspace(0, 1, max_thresholds)) if all_scores.size else np.zeros(0)
    candidates = np.unique(np.concatenate([quantiles, [np.inf], np.linspace(0.05, 1.0, 96)]))
    windows = sum(f.n_windows for f in files)
    null, perfect = -profile.fn * windows, profile.tp * windows
    best: CorpusScore | None = None
    for threshold in candidates:
        parts = [file_score(f, float(threshold), profile) for f in files]
        raw = sum(p[0] for p in parts)
        normalised = 100.0 * (raw - null) / (perfect - null) if perfect != null else 0.0
        if best is None or normalised > best.score:
            best = CorpusScore(
                normalised,
                float(threshold),
                raw,
                sum(p[1] for p in parts),
                sum(p[2] for p in parts),
                sum(p[3] for p in parts),
            )
    assert best is not None
    return best
