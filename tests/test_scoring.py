"""NAB scoring behaves as NAB's: perfect 100, null 0, earlier beats later, false positives cost."""

import numpy as np
import pytest

from simulators.scoring import STANDARD, corpus_score, file_score, prepare, probation_length, scaled_sigmoid


def one_file(detect_at: list[int], n: int = 2000, windows=((1000, 1199),)):
    scores = np.zeros(n)
    scores[detect_at] = 1.0
    return prepare("f", scores, list(windows))


def test_perfect_detector_scores_100_and_null_scores_0():
    assert corpus_score([one_file([1000])]).score == pytest.approx(100.0)
    assert corpus_score([one_file([])]).score == pytest.approx(0.0)


def test_earlier_detection_in_the_window_is_worth_more():
    early, late = file_score(one_file([1010]), 0.5)[0], file_score(one_file([1190]), 0.5)[0]
    assert early > late > 0


def test_only_the_first_detection_in_a_window_counts():
    assert file_score(one_file([1010, 1020, 1100]), 0.5)[:2] == file_score(one_file([1010]), 0.5)[:2]


def test_false_positives_cost_and_probation_is_ignored():
    clean = file_score(one_file([1000]), 0.5)[0]
    noisy = file_score(one_file([1000, 1600, 1800]), 0.5)
    assert noisy[0] < clean and noisy[2] == 2
    in_probation = probation_length(2000) - 1
    assert file_score(one_file([1000, in_probation]), 0.5)[0] == clean


def test_sigmoid_shape():
    assert scaled_sigmoid(-1.0) > scaled_sigmoid(0.0) == 0.0 > scaled_sigmoid(0.5) > scaled_sigmoid(5.0) == -1.0
    assert STANDARD.fp < STANDARD.tp
