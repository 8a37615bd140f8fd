"""ISPU from concentrations (Permen LHK P.14/2020), checked on breakpoints and on Jakarta's published days."""

import csv
import math
from pathlib import Path

import pytest

from processing.ispu import CONCENTRATION_EDGES, ISPU_EDGES, category, station_ispu, sub_index
from processing.rules import siaga_for

# An excerpt of the published file, committed with the tests (tests/data/README.md says which rows and why).
JAKARTA = Path(__file__).resolve().parent / "data" / "jakarta_ispu" / "ispu_dki_all.csv"


@pytest.mark.parametrize("pollutant", sorted(CONCENTRATION_EDGES))
def test_every_band_edge_maps_to_its_ispu_edge(pollutant):
    for concentration, ispu in zip(CONCENTRATION_EDGES[pollutant], ISPU_EDGES, strict=True):
        assert sub_index(pollutant, concentration) == pytest.approx(ispu)


def test_interpolation_inside_a_band():
    # PM2.5 55.4..150.4 ug/m3 is ISPU 100..200: halfway is 150
    assert sub_index("pm25", (55.4 + 150.4) / 2) == pytest.approx(150.0)
    assert sub_index("pm10", 100.0) == pytest.approx(75.0)


def test_above_the_top_band_is_reported_not_extrapolated():
    result = station_ispu({"pm25": 640.0, "pm10": 20.0})
    assert result is not None and math.isinf(result.value)
    assert result.label == "> 500" and result.category.name == "Berbahaya" and result.critical == "pm25"


def test_missing_and_impossible_values_are_left_out():
    assert sub_index("co", float("nan")) is None
    assert sub_index("co", -1.0) is None
    assert station_ispu({}) is None
    assert station_ispu({"temperature": 30.0}) is None


@pytest.mark.parametrize(
    ("ispu", "name", "colour"),
    [
        (1, "Baik", "hijau"),
        (50, "Baik", "hijau"),
        (50.4, "Baik", "hijau"),
        (51, "Sedang", "biru"),
        (100, "Sedang", "biru"),
        (101, "Tidak Sehat", "kuning"),
        (200, "Tidak Sehat", "kuning"),
        (201, "Sangat Tidak Sehat", "merah"),
        (300, "Sangat Tidak Sehat", "merah"),
        (301, "Berbahaya", "hitam"),
    ],
)
def test_categories_and_colours(ispu, name, colour):
    assert (category(ispu).name, category(ispu).colour) == (name, colour)


def test_station_ispu_takes_the_largest_sub_index_as_critical():
    result = station_ispu({"pm25": 60.0, "pm10": 80.0, "o3": 100.0, "co": 2000.0})
    assert result is not None
    assert result.critical == "pm25" and round(result.value) == 105 and result.category.name == "Tidak Sehat"


def test_published_jakarta_days_agree_with_our_categories_and_critical_pollutants():
    """The file holds sub-indices, the day's max, its critical pollutant and category. The published
    data has its own slips (a few days at exactly 200 filed as Sangat Tidak Sehat, a critical
    pollutant with no value that day), so we require near-total, not total, agreement."""
    rows = list(csv.DictReader(JAKARTA.open(), delimiter=";"))
    category_checked = category_agrees = critical_checked = critical_agrees = 0
    for row in rows:
        if not row["max"] or row["categori"] == "TIDAK ADA DATA":
            continue
        category_checked += 1
        category_agrees += category(float(row["max"])).name.upper() == row["categori"]
        subs = {p: float(row[p]) for p in ("pm25", "pm10", "so2", "co", "o3", "no2") if row[p]}
        top = max(subs.values(), default=None)
        leaders = [p for p, v in subs.items() if v == top]
        if len(leaders) == 1:
            critical_checked += 1
            critical_agrees += leaders[0].upper() == row["critical"].upper() and top == float(row["max"])
    assert category_checked > 340  # the excerpt checks 349 of its 352 days (the full file: 5,534 of 5,538)
    assert category_agrees / category_checked >= 0.99, (category_agrees, category_checked)
    assert critical_agrees / critical_checked >= 0.98, (critical_agrees, critical_checked)


def test_siaga_steps_up_at_each_threshold_and_down_only_past_the_deadband():
    thresholds = (80.0, 150.0, 200.0)
    assert [siaga_for(level, thresholds) for level in (80, 81, 150, 151, 200, 201)] == [4, 3, 3, 2, 2, 1]
    # Water hovering at 80 cm after crossing it holds Siaga 3; 75 cm is the deadband's edge, below it normal.
    assert [siaga_for(level, thresholds, current=3, deadband_cm=5) for level in (79.5, 76, 75, 74)] == [3, 3, 4, 4]
    # From Siaga 1 each step down has its own deadband: 197 holds 1, 190 is 2, 146 holds 2, 144 is 3.
    assert [siaga_for(level, thresholds, current=1, deadband_cm=5) for level in (197, 190, 146, 144, 60)] == [
        1,
        2,
        2,
        3,
        4,
    ]
    assert siaga_for(160, thresholds, current=3, deadband_cm=5) == 2  # stepping up needs no deadband
    assert siaga_for(79, thresholds, deadband_cm=5) == 4  # from normal, the deadband changes nothing
