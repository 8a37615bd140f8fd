"""Cross-validated NAB scores (simulators.scoring.CandidateResults, bench.nab): a setting chosen for
a fold never sees the fold, and the aggregate is the held-out raw scores normalised by hand."""

import numpy as np
import pytest

from simulators.scoring import STANDARD, CandidateResults, FileSweep, corpus_score, file_score, prepare

N = 2000
WINDOW = (1000, 1199)


def synthetic(name: str, at: dict[int, float], windows=(WINDOW,)):
    """A file scoring 0 but for `at` (index: score)."""
    scores = np.zeros(N)
    for i, s in at.items():
        scores[i] = s
    return prepare(name, scores, list(windows))


def corpus(candidate_scores: dict[str, list[dict[int, float]]]) -> CandidateResults:
    named = {
        c: [synthetic(f"cat{i % 2}/f{i}.csv", at) for i, at in enumerate(fs)] for c, fs in candidate_scores.items()
    }
    return CandidateResults(named)


def test_the_vectorised_sweep_equals_file_score_at_every_threshold():
    rng = np.random.default_rng(1)
    f = prepare("a/b.csv", rng.random(3000), [(900, 1100), (2000, 2300)])
    sweep = FileSweep(f)
    thresholds = np.concatenate([np.quantile(f.scores, np.linspace(0, 1, 50)), [0.0, 1.0, np.inf]])
    raw, tp, fp, fn = sweep.at(thresholds)
    for k, t in enumerate(thresholds):
        want = file_score(f, float(t))
        assert raw[k] == pytest.approx(want[0], abs=1e-9)
        assert (tp[k], fp[k], fn[k]) == want[1:]


def test_the_setting_chosen_for_a_fold_never_sees_the_fold():
    # Files 0-2 are found only at a threshold of 0.5 (their anomalies score 0.6, with noise at 0.4
    # outside the window); file 3's anomaly scores 0.3, so only a threshold of 0.3 finds it.
    files = [{1010: 0.6, 1500: 0.4} for _ in range(3)] + [{1010: 0.3}]
    results = corpus({"one": files})
    held_out_3 = results.evaluate([[3]]).folds[0]
    assert held_out_3.choice.threshold > 0.4  # chosen on files 0-2: above their noise, so file 3 is missed
    assert held_out_3.tp == 0 and held_out_3.fn == 1
    # Whatever the held-out file holds, its fold's choice is the same: it is never looked at.
    changed = corpus({"one": files[:3] + [{1010: 0.9, 100: 0.95, 1600: 0.1}]})
    assert changed.evaluate([[3]]).folds[0].choice == held_out_3.choice
    assert changed.choose([0, 1, 2]) == results.choose([0, 1, 2]) == held_out_3.choice
    # Candidates too: "late" is best on files 0-2, "early" on file 3, whose four windows outweigh
    # them, so the choice with file 3 ("early", in-sample) is not the choice without it ("late").
    four = [(1000 + 200 * w, 1199 + 200 * w) for w in range(4)]
    two = CandidateResults(
        {
            "early": [synthetic(f"c/f{i}.csv", {1190: 0.6}) for i in range(3)]
            + [synthetic("c/f3.csv", {a + 10: 0.6 for a, _ in four}, four)],
            "late": [synthetic(f"c/f{i}.csv", {1010: 0.6}) for i in range(3)] + [synthetic("c/f3.csv", {}, four)],
        }
    )
    assert two.in_sample().folds[0].choice.candidate == "early"
    assert two.evaluate([[3]]).folds[0].choice.candidate == "late"


def test_a_fold_never_sees_the_held_out_files_unlabelled_scores(monkeypatch):
    # The thresholds a fold tries come from its training files' scores only (threshold_grid).
    from simulators import scoring

    seen: list[int] = []
    real_grid = scoring.threshold_grid

    def spy(scores, max_thresholds=400):
        seen.extend(id(s) for s in scores)
        return real_grid(scores, max_thresholds)

    monkeypatch.setattr(scoring, "threshold_grid", spy)
    results = corpus({"one": [{1010: 0.6, 1500: 0.4} for _ in range(3)] + [{1010: 0.3, 10: 0.35}]})
    results.evaluate([[3]])
    assert seen and id(results.sweeps["one"][3].scorable_scores) not in seen
    assert {id(results.sweeps["one"][i].scorable_scores) for i in range(3)} <= set(seen)


def test_a_single_fold_is_refused_rather_than_scored_in_sample():
    results = corpus({"one": [{1010: 0.6} for _ in range(2)]})
    with pytest.raises(ValueError, match="other files"):
        results.leave_one_out(["a", "a"])


def test_the_cross_validated_score_sums_held_out_raw_scores_and_normalises_over_the_corpus():
    files = [{1010: 0.6, 1500: 0.4}, {1100: 0.6, 1500: 0.4}, {1190: 0.6}, {1010: 0.3}]
    results = corpus({"one": files})
    evaluation = results.leave_one_out(["f0", "f1", "f2", "f3"])
    # By hand: each file scored at the threshold its fold chose on the other three.
    raw = 0.0
    for i, fold in enumerate(evaluation.folds):
        train = [j for j in range(4) if j != i]
        assert fold.choice == results.choose(train)
        raw += file_score(results.sweeps["one"][i].file, fold.choice.threshold)[0]
    null, perfect = -STANDARD.fn * 4, STANDARD.tp * 4  # four windows in all
    assert evaluation.raw == pytest.approx(raw)
    assert evaluation.score == pytest.approx(100 * (raw - null) / (perfect - null))
    # Leaving a category out: files 0 and 2 are cat0, 1 and 3 cat1.
    by_category = results.leave_one_out(["cat0", "cat1", "cat0", "cat1"])
    assert [f.held_out for f in by_category.folds] == [("cat0/f0.csv", "cat0/f2.csv"), ("cat1/f1.csv", "cat1/f3.csv")]
    cat0 = results.choose([1, 3])
    hand = sum(file_score(results.sweeps["one"][i].file, cat0.threshold)[0] for i in (0, 2))
    assert by_category.folds[0].raw == pytest.approx(hand)
    # In-sample is the old corpus-wide sweep.
    whole = corpus_score([s.file for s in results.sweeps["one"]])
    assert results.in_sample().score == pytest.approx(whole.score)
    assert results.in_sample().score >= evaluation.score


def test_bench_nab_runs_each_candidate_once_per_file():
    from bench import nab

    calls: list[int] = []

    def detect(ts, values):
        calls.append(len(values))
        return np.zeros(len(values))

    data = [(f"c{i}/f.csv", np.arange(N) * 60_000.0, np.zeros(N), [WINDOW]) for i in range(3)]
    results = nab.run_method(data, {"a": detect, "b": detect})
    results.leave_one_out(["c0", "c1", "c2"])
    results.leave_one_out(["c0/f.csv", "c1/f.csv", "c2/f.csv"])
    assert len(calls) == 6
    assert nab.category("realTraffic/speed_7578.csv") == "realTraffic"


def test_a_candidate_at_a_fixed_threshold_is_scored_there_not_swept():
    files = [{1010: 0.6, 1500: 0.4} for _ in range(3)]
    named = {"fixed": [synthetic(f"c/f{i}.csv", at) for i, at in enumerate(files)]}
    results = CandidateResults(named, fixed_thresholds={"fixed": 0.3})
    for evaluation in (results.in_sample(), results.leave_one_out(["a", "b", "c"])):
        assert {f.choice.threshold for f in evaluation.folds} == {0.3}
        assert evaluation.fp == 3  # the noise at 0.4 counts: 0.3 was not chosen to miss it


def test_bench_nab_scores_the_detectors_the_processor_runs():
    """The contract: bench.nab's headline row is the processor's detectors with the processor's
    defaults, through processing.detect; its processor rows add exactly the processor's settings."""
    from bench import nab
    from processing import kernels
    from processing.detect import PlainReading
    from processing.processor import apply_settings, new_detectors
    from processing.settings import ProcessorSettings

    processor = apply_settings(kernels.DEFAULT_PARAMS.copy(), ProcessorSettings())
    assert ProcessorSettings().anomaly_likelihood
    for name in kernels.LIKELIHOOD_SETS:  # the likelihood's own choices are the headline row's
        assert processor[kernels.param_index(name)] == kernels.LIKELIHOOD_PARAMS[kernels.param_index(name)]
    # Besides them, the processor sets only its city settings (and the repeat threshold), at NAB's local time.
    city = {kernels.P_WEEKENDS, kernels.P_UTC_OFFSET_HOURS, kernels.P_REPEAT_BELOW}
    differs = {i for i in range(len(processor)) if processor[i] != kernels.LIKELIHOOD_PARAMS[i]}
    assert differs <= city
    # The processor's rows score what the processor's own detectors (new_detectors, at NAB's local
    # time) score through its entry point, score_readings: the same scores for the same stream.
    processor_detectors = new_detectors(ProcessorSettings(utc_offset_hours=0.0))
    np.testing.assert_array_equal(nab.PROCESSOR_PARAMS, processor_detectors.params)
    rng = np.random.default_rng(4)
    ts = np.arange(3000) * 300_000.0
    values = rng.normal(10, 1, ts.size)
    values[2500] += 12
    readings = [PlainReading("nab", "value", int(t), float(v)) for t, v in zip(ts, values, strict=True)]
    direct = np.concatenate(
        [processor_detectors.score_readings(readings[i : i + 100], now_ms=0).scores for i in range(0, ts.size, 100)]
    )
    np.testing.assert_array_equal(nab.kota_scores(ts, values, params=nab.PROCESSOR_PARAMS), direct)
    assert direct[2500] >= ProcessorSettings().anomaly_threshold
