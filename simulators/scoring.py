"""NAB scoring (Numenta Anomaly Benchmark), computed as NAB's sweeper does.

For a threshold, a point whose score reaches it is a detection. Inside a labelled window only the
earliest detection counts, worth A_TP * sigmoid of how early it came; a window without one costs
A_FN; a detection outside every window costs A_FP, scaled by how far it lies past the previous
window. Points in the probationary period (the first 15%, at most 750) are not scored. One
threshold is chosen for the whole corpus by sweeping, and the total is normalised so that the
null detector (never detects) scores 0 and the perfect one 100.

Cross-validated (`CandidateResults`): a method is a few named candidate settings, each detected
once per file; for each fold the candidate and the threshold are chosen on the other files only
and scored on the fold's files. The folds' raw scores are summed over the corpus (each file is in
one fold) and normalised with the whole corpus' null and perfect scores, as the in-sample figure is,
so the two compare directly.
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


class FileSweep:
    """A file's raw score, TP, FP and FN at many thresholds at once (what `file_score` gives at one).

    Built once per (file, candidate setting) and reused by every fold that trains or tests on the
    file: the points outside windows sorted by score with their cumulative false-positive cost, and
    per window the running maximum of its scorable points' scores (the earliest detection at a
    threshold is the first point whose running maximum reaches it)."""

    def __init__(self, f: ScoredFile, profile: Profile = STANDARD) -> None:
        self.file = f
        self.profile = profile
        outside = f.scorable & (f.window_of < 0)
        order = np.argsort(-f.scores[outside], kind="stable")
        self._outside_desc = -f.scores[outside][order]  # ascending
        self._fp_cumulative = np.concatenate([[0.0], np.cumsum(f.fp_weight[outside][order])])
        self._windows = []
        for w in range(f.n_windows):
            idx = np.flatnonzero(f.scorable & (f.window_of == w))
            self._windows.append((np.maximum.accumulate(f.scores[idx]), f.tp_weight[idx]))
        self.scorable_scores = f.scores[f.scorable]

    def at(self, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(raw, TP, FP, FN) per threshold, as `file_score` computes them one at a time."""
        t = np.asarray(thresholds, dtype=float)
        fp = np.searchsorted(self._outside_desc, -t, side="right")
        raw = self._fp_cumulative[fp].copy()
        tp = np.zeros(t.shape, dtype=np.int64)
        for running_max, weights in self._windows:
            first = np.searchsorted(running_max, t, side="left")
            hit = first < running_max.size
            if running_max.size:
                raw += np.where(hit, weights[np.minimum(first, running_max.size - 1)], -self.profile.fn)
            else:
                raw -= self.profile.fn
            tp += hit
        return raw, tp, fp, self.file.n_windows - tp


def threshold_grid(scores: list[np.ndarray], max_thresholds: int = 400) -> np.ndarray:
    """The thresholds a sweep tries: quantiles of the given (scorable) scores, a fixed grid, and inf."""
    pooled = np.concatenate(scores) if scores else np.zeros(0)
    quantiles = np.quantile(pooled, np.linspace(0, 1, max_thresholds)) if pooled.size else np.zeros(0)
    return np.unique(np.concatenate([quantiles, [np.inf], np.linspace(0.05, 1.0, 96)]))


@dataclass(frozen=True)
class Choice:
    """A setting chosen by its score on some files: which candidate, at which threshold."""

    candidate: str
    threshold: float
    train_score: float  # normalised over the files it was chosen on


@dataclass(frozen=True)
class Fold:
    held_out: tuple[str, ...]  # the files scored with `choice`, never looked at to choose it
    choice: Choice
    raw: float
    tp: int
    fp: int
    fn: int


@dataclass(frozen=True)
class Evaluation:
    """Held-out raw scores summed over every fold and normalised with the whole corpus' null and perfect."""

    score: float
    raw: float
    tp: int
    fp: int
    fn: int
    folds: tuple[Fold, ...]


class CandidateResults:
    """Per-file results of a method's candidate settings, each detected once, for selection per fold.

    `results` maps a candidate's name to its ScoredFile per file, files in one order for every
    candidate. Choosing a setting (candidate and threshold) for a fold looks only at the fold's
    training files: their scores give the thresholds tried, their labels the score maximised."""

    def __init__(
        self,
        results: dict[str, list[ScoredFile]],
        profile: Profile = STANDARD,
        fixed_thresholds: dict[str, float] | None = None,
    ) -> None:
        names = {tuple(f.name for f in files) for files in results.values()}
        if len(names) != 1:
            raise ValueError("every candidate needs a result for the same files, in the same order")
        self.names: tuple[str, ...] = names.pop()
        self.profile = profile
        self.sweeps = {c: [FileSweep(f, profile) for f in files] for c, files in results.items()}
        self.windows = [f.n_windows for f in next(iter(results.values()))]
        # Candidates run at a threshold set beforehand (the processor's anomaly threshold): not chosen.
        self.fixed_thresholds = fixed_thresholds or {}

    def normalised(self, raw: float, files: list[int]) -> float:
        windows = sum(self.windows[i] for i in files)
        null, perfect = -self.profile.fn * windows, self.profile.tp * windows
        return 100.0 * (raw - null) / (perfect - null) if perfect != null else 0.0

    def choose(self, train: list[int], max_thresholds: int = 400) -> Choice:
        """The candidate and threshold with the best summed raw score over the `train` files only
        (ties: the first candidate, the lowest threshold)."""
        best: Choice | None = None
        best_raw = -np.inf
        for candidate, sweeps in self.sweeps.items():
            if candidate in self.fixed_thresholds:
                grid = np.array([self.fixed_thresholds[candidate]])
            else:
                grid = threshold_grid([sweeps[i].scorable_scores for i in train], max_thresholds)
            raw = np.zeros(grid.size)
            for i in train:
                raw += sweeps[i].at(grid)[0]
            k = int(np.argmax(raw))
            if raw[k] > best_raw:
                best_raw = float(raw[k])
                best = Choice(candidate, float(grid[k]), self.normalised(best_raw, train))
        assert best is not None
        return best

    def score(self, choice: Choice, files: list[int]) -> tuple[float, int, int, int]:
        """(raw, TP, FP, FN) summed over `files` at a chosen setting."""
        parts = [self.sweeps[choice.candidate][i].at(np.array([choice.threshold])) for i in files]
        return (
            float(sum(p[0][0] for p in parts)),
            int(sum(p[1][0] for p in parts)),
            int(sum(p[2][0] for p in parts)),
            int(sum(p[3][0] for p in parts)),
        )

    def evaluate(self, held_out_folds: list[list[int]]) -> Evaluation:
        """Each fold's setting chosen on every other file and scored on the fold's files; the folds'
        raw scores summed and normalised with the null and perfect scores of all the files they hold."""
        folds = []
        for test in held_out_folds:
            held = set(test)
            train = [i for i in range(len(self.names)) if i not in held]
            if not train:  # a cross-validated score with nothing to choose on is not one: use in_sample()
                raise ValueError("a held-out fold needs other files to choose its setting on")
            choice = self.choose(train)
            folds.append(Fold(tuple(self.names[i] for i in test), choice, *self.score(choice, test)))
        everything = sorted({i for test in held_out_folds for i in test})
        raw = sum(f.raw for f in folds)
        return Evaluation(
            self.normalised(raw, everything),
            raw,
            sum(f.tp for f in folds),
            sum(f.fp for f in folds),
            sum(f.fn for f in folds),
            tuple(folds),
        )

    def in_sample(self) -> Evaluation:
        """Chosen and scored on every file: what a sweep over the whole corpus reports."""
        everything = list(range(len(self.names)))
        choice = self.choose(everything)
        fold = Fold(self.names, choice, *self.score(choice, everything))
        return Evaluation(self.normalised(fold.raw, everything), fold.raw, fold.tp, fold.fp, fold.fn, (fold,))

    def leave_one_out(self, group_of: list[str]) -> Evaluation:
        """Cross-validated: one fold per group (a file's name, or its category), held out in turn."""
        groups: dict[str, list[int]] = {}
        for i, group in enumerate(group_of):
            groups.setdefault(group, []).append(i)
        return self.evaluate(list(groups.values()))


def corpus_score(files: list[ScoredFile], profile: Profile = STANDARD, max_thresholds: int = 400) -> CorpusScore:
    """Sweep one threshold over the corpus; return the best normalised score."""
    results = CandidateResults({"": files}, profile)
    choice = results.choose(list(range(len(files))), max_thresholds)
    raw, tp, fp, fn = results.score(choice, list(range(len(files))))
    return CorpusScore(choice.train_score, choice.threshold, raw, tp, fp, fn)
