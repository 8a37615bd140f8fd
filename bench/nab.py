"""NAB benchmark: run the streaming detectors over ../shared/data/nab and print the standard-profile score.

    .venv/bin/python -m bench.nab

Each file is one series, fed to processing.detect.Detectors in micro-batches of 100 readings in
time order, exactly as the processor would. Baselines in the same run: the null detector (0 by
definition), a random detector, and a plain windowed-Gaussian z-score detector. The published
scoreboard (all 58 NAB files): ARTime 74.9, Numenta HTM 70.5, CAD OSE 69.9, Skyline 58.2,
KNN CAD 58.0, Windowed Gaussian 39.6, random 11.0. This folder holds 25 of the 58 files, so the
figures are indicative, not comparable one to one. The first row is the processor's detectors:
Numenta's anomaly likelihood over graded raw scores (kernels.LIKELIHOOD_PARAMS; docs/processing.md,
"Anomaly likelihood"), with spikes and dips also judged raw beside it; then two ablations and the
same detectors on every value plus 10,000 (units must change no score); then with
the processor's settings (weekend profiles), and at its fixed threshold; then the raw scores it ran
before, whose defaults were chosen on these files.

Honest evaluation: beside the in-sample score (threshold swept over every file), each method is
scored cross-validated, leaving one category out (LOCO) and one file out (LOFO): every setting
chosen by looking at scores (the threshold, and the candidate where a method has several) is
chosen on the other folds only (simulators.scoring.CandidateResults). A method more than 5 points
better in-sample than cross-validated is flagged as over-fitted.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kota.settings import PROJECT_ROOT
from processing import kernels
from processing.detect import Detectors
from processing.processor import apply_settings
from processing.settings import ProcessorSettings
from simulators.scoring import CandidateResults, prepare

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


# NAB's times are local, so local time is UTC here. The processor gives weekends a profile of their
# own (a city follows the week); NAB's recordings are one to two weeks long, short to learn weekends from.
PROCESSOR_PARAMS = apply_settings(kernels.DEFAULT_PARAMS.copy(), ProcessorSettings(utc_offset_hours=0.0))

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
# A method: its candidate settings by name. Each candidate is run once per file; the threshold (and,
# where there are several, the candidate) is chosen per fold on the other files' results only.
Method = dict[str, Scorer]
# Candidates whose threshold is set beforehand, not swept: the processor's own anomaly threshold.
FIXED_THRESHOLDS = {"processor at its threshold": ProcessorSettings().anomaly_threshold}


def methods() -> dict[str, Method]:
    rng = np.random.default_rng(0)
    likelihood = kernels.LIKELIHOOD_PARAMS
    raw_points_off = likelihood.copy()
    raw_points_off[kernels.param_index("raw_points")] = 0.0
    with_gaps = likelihood.copy()
    with_gaps[kernels.P_GAP_FACTOR] = ProcessorSettings().dropout_factor
    return {
        # The processor's detectors (kernels.LIKELIHOOD_PARAMS): the headline row.
        "kota, anomaly likelihood": {"likelihood": lambda ts, v: kota_scores(ts, v, params=likelihood)},
        # Ablations: the likelihood alone (spikes and dips not judged raw beside it), and with the
        # kernels' gap detector (a reading that ends a silence; the processor finds silences while
        # they last instead, and NAB's silences are not labelled).
        "kota, likelihood alone": {"no raw points": lambda ts, v: kota_scores(ts, v, params=raw_points_off)},
        "kota, + gaps at return": {"gaps": lambda ts, v: kota_scores(ts, v, params=with_gaps)},
        # The same files from another zero (kelvin for degrees, absolute for gauge pressure): a
        # series' units must change no score, so this row must equal the first.
        "kota, values + 10,000": {"offset": lambda ts, v: kota_scores(ts, v + 10_000.0, params=likelihood)},
        # What the processor adds for a city: weekend profiles (apply_settings), at NAB's local
        # time; then at its fixed threshold.
        "kota, processor settings": {"processor": lambda ts, v: kota_scores(ts, v, params=PROCESSOR_PARAMS)},
        "kota, processor as deployed": {
            "processor at its threshold": lambda ts, v: kota_scores(ts, v, params=PROCESSOR_PARAMS)
        },
        # Raw scores, the processor's default before the likelihood (defaults chosen on these files).
        "kota, raw scores": {"raw": kota_scores},
        # The one raw knob docs/processing.md reports a sweep for (tightness 1.5-3 gave 73-78 on the
        # 18 files then): here chosen per fold among its documented values, 0 turning it off.
        "kota, raw, tightness per fold": {
            f"tightness {x:g}": (lambda ts, v, x=x: kota_scores(ts, v, params=kernels.params_with(daily_tightness=x)))
            for x in (0.0, 1.5, 2.0, 3.0)
        },
        "kota, likelihood ensemble": {"ensemble": lambda ts, v: kota_scores(ts, v, params=kernels.ENSEMBLE_PARAMS)},
        "windowed gaussian": {"window 6400": lambda ts, v: windowed_gaussian_scores(v)},
        "random": {"seed 0": lambda ts, v: rng.random(len(v))},
    }


def category(name: str) -> str:
    """A file's NAB category (its folder): used to make folds, never by a detector or a parameter."""
    return name.split("/")[0]


OVERFIT_POINTS = 5.0


NabFile = tuple[str, np.ndarray, np.ndarray, list[tuple[int, int]]]  # name, epoch ms, values, windows


def run_method(corpus: list[NabFile], method: Method) -> CandidateResults:
    """One detection pass per file per candidate; every fold reuses these results."""
    return CandidateResults(
        {
            name: [prepare(file, detect(ts, values), windows) for file, ts, values, windows in corpus]
            for name, detect in method.items()
        },
        fixed_thresholds={name: t for name, t in FIXED_THRESHOLDS.items() if name in method},
    )


def main() -> None:
    corpus = load_corpus()
    files = [c[0] for c in corpus]
    categories = [category(f) for f in files]
    print(
        f"NAB standard profile over {len(corpus)} files in {len(set(categories))} categories, "
        f"{sum(len(c[2]) for c in corpus):,} points, {sum(len(c[3]) for c in corpus)} labelled windows"
    )
    print(
        "in-sample: threshold (and candidate) chosen on all files; LOCO: chosen on the other categories, "
        "scored on the one left out;\nLOFO: chosen on the other files, scored on the one left out. "
        "Cross-validated figures sum the left-out raw scores over the corpus\nand normalise with the "
        "whole corpus' null (0) and perfect (100) scores, as the in-sample figure is."
    )
    print(
        f"{'detector':<30} {'cand':>4} {'in-sample':>9} {'LOCO':>6} {'LOFO':>6} {'threshold':>9} "
        f"{'TP':>4} {'FP':>5} {'FN':>4} {'seconds':>8}"
    )
    loco_choices: dict[str, list[str]] = {}
    for label, method in methods().items():
        started = time.perf_counter()
        results = run_method(corpus, method)
        elapsed = time.perf_counter() - started
        inside = results.in_sample()
        loco = results.leave_one_out(categories)
        lofo = results.leave_one_out(files)
        worst = max(inside.score - loco.score, inside.score - lofo.score)
        flag = f"  OVER-FITTED ({worst:.1f} points)" if worst > OVERFIT_POINTS else ""
        chosen = inside.folds[0].choice
        print(
            f"{label:<30} {len(method):>4} {inside.score:>9.1f} {loco.score:>6.1f} {lofo.score:>6.1f} "
            f"{chosen.threshold:>9.3f} {inside.tp:>4} {inside.fp:>5} {inside.fn:>4} {elapsed:>8.2f}{flag}"
        )
        loco_choices[label] = [
            f"{category(f.held_out[0])}: {f.choice.candidate} >= {f.choice.threshold:.3f}" for f in loco.folds
        ]
    print("LOCO choices per left-out category:")
    for label, choices in loco_choices.items():
        print(f"  {label}: " + "; ".join(choices))
    print(
        f"over-fitted: in-sample more than {OVERFIT_POINTS:g} points above a cross-validated score. "
        "Published (all 58 files): Numenta HTM 70.5"
    )


if __name__ == "__main__":
    main()
