"""`kota replay` against the real stack: every valid value of the file is stored, once."""

import csv
import json
from pathlib import Path

import pytest

from simulators.replay import BEIJING, JAKARTA, mapping_for, parse
from tests.helpers import query, run_kota, unique_id, wait_for_stored

# Excerpts of the recordings, committed with the tests (tests/data/README.md); benchmarks read the full files.
DATA = Path(__file__).resolve().parent / "data"


def _kota(pipeline, *args: str):
    return run_kota(pipeline, "replay", *args)


def _stored(pipeline, city: str, expected: int) -> int:
    return wait_for_stored(pipeline, city, expected, timeout_s=60, what=f"{expected} readings of {city}")


def test_beijing_and_jakarta_rows_are_counted_value_by_value():
    beijing = DATA / "beijing_air" / "PRSA_Data_Dongsi_20130301-20170228.csv"
    parsed = parse(beijing, BEIJING)
    with beijing.open() as handle:
        rows = list(csv.DictReader(handle))
    values = [row[c] for row in rows for c in BEIJING.metrics]
    assert parsed.readings == sum(1 for v in values if v not in ("", "NA"))
    assert parsed.skipped["empty"] == sum(1 for v in values if v in ("", "NA"))
    assert {r.device for r in parsed.rows} == {"dongsi"}
    source = DATA / "jakarta_ispu" / "ispu_dki_all.csv"
    jakarta = parse(source, JAKARTA)
    assert {r.device for r in jakarta.rows} >= {"dki1-bunderan-hi", "dki5-kebon-jeruk"}
    with source.open() as handle:
        rows = [row for row in csv.DictReader(handle, delimiter=";") if row["stasiun"]]
    assert jakarta.readings == sum(1 for row in rows for c in JAKARTA.metrics if row[c].strip())
    assert jakarta.bad_rows == {"no device": 1}  # the file's one row without a station: reported, not guessed


@pytest.mark.stack
def test_a_nab_file_replays_without_losing_a_row_and_writes_its_windows(pipeline, tmp_path):
    city = unique_id("nab")
    source = DATA / "nab" / "realTraffic" / "speed_7578.csv"
    # The last day and a half: shifted to end now, all of it inside the processor's two days of lateness.
    with source.open() as handle:
        expected = sum(1 for row in csv.DictReader(handle) if row["timestamp"] >= "2015-09-16")
    whole = _kota(pipeline, str(source), "--city", city)
    assert whole.returncode != 0 and "spans 9.1 days" in whole.stderr, "refused up front, not half-stored"
    labels, counts = tmp_path / "labels.json", tmp_path / "counts.json"
    result = _kota(
        pipeline,
        str(source),
        "--city",
        city,
        "--since",
        "2015-09-16T00:00:00+00:00",
        "--labels",
        str(labels),
        "--counts",
        str(counts),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(counts.read_text())["acknowledged_readings"] == expected
    assert _stored(pipeline, city, expected) == expected
    [(metric,)] = query(pipeline, "SELECT DISTINCT metric FROM readings WHERE device_id = %s", (f"{city}-speed-7578",))
    assert metric == "averageVehicleSpeed"
    windows = json.loads(labels.read_text())["labels"]
    assert windows and all(w["device_id"] == f"{city}-speed-7578" for w in windows)


@pytest.mark.stack
def test_any_csv_replays_through_a_mapping_and_reports_what_it_left_out(pipeline, tmp_path):
    city = unique_id("csv")
    source = tmp_path / "gates.csv"
    source.write_text(
        "when;gate;level_m;rain\n"
        "2026-01-01 08:00;Gate A;1.20;0\n"
        "2026-01-01 08:00;Gate B;0.80;2.5\n"
        "2026-01-01 08:10;Gate A;;1\n"  # no level: one value left out
        "2026-01-01 08:10;Gate B;abc;1\n"  # not a number
        "not a time;Gate A;1.0;0\n"  # the whole row
        "2026-01-01 08:20;Gate A;99;0\n"
    )  # 9,900 cm: outside currentLevel's range? no: kept
    mapping = tmp_path / "gates.json"
    mapping.write_text(
        json.dumps(
            {
                "delimiter": ";",
                "device_type": "water_level",
                "device": {"column": "gate"},
                "time": {"column": "when", "format": "%Y-%m-%d %H:%M", "timezone": "+07:00"},
                "metrics": {"level_m": {"metric": "currentLevel", "unit": "m"}, "rain": {"metric": "precipitation"}},
            }
        )
    )
    kind, parsed_mapping = mapping_for(source, mapping_file=mapping)
    parsed = parse(source, parsed_mapping)
    assert kind == "csv" and parsed.readings == 7 and parsed.bad_rows == {"unreadable time (ValueError)": 1}
    assert parsed.skipped == {"empty": 1, "not a number": 1, "outside currentLevel's range": 1}
    result = _kota(pipeline, str(source), "--mapping", str(mapping), "--city", city)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left out: 1 not a number" in result.stdout
    assert _stored(pipeline, city, 7) == 7
    assert query(
        pipeline,
        "SELECT value FROM readings WHERE device_id = %s AND metric = 'currentLevel' ORDER BY ts",
        (f"{city}-gate-a",),
    ) == [(120.0,)]
