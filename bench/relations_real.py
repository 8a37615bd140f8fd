"""Relations between metrics on real air: how often PM2.5 and PM10 of a real station disagree.

    .venv/bin/python -m bench.relations_real

The relation detector (processing/kernels.py, relation_batch; docs/processing.md, "Relations
between a device's metrics") was built on principle and checked on simulated stations, whose PM10
is 1.6 times the same air plus noise. Real stations are not so tidy: the share of PM2.5 in PM10
moves with dust, rain and the season, and real sensors fail. This feeds the Beijing stations'
hourly PM2.5 and PM10 (../shared/data/beijing_air, four years a station, unlabelled) through the
processor's detectors as a live stream would, and prints the `inconsistent` detections a station
and a year (a detection: a run of signals with no gap over a day, as an operator's alert would
stay open), beside the same count for each metric judged alone in the same run. Nothing here is
labelled, so this is not a precision: it is how often an operator would be asked to look. (Each
metric alone is judged by the same detectors with relations off, in the same run.) Then,
to see what the relation finds on real air, a drifting PM2.5 sensor is injected into the real
stream (one drift a run; found where a signal falls in the drift's hours that the clean run did
not have), against the same detectors judging PM2.5 alone in the same runs. Parameters are counted
in readings, so at a reading an hour the chart spans 30 hours and the relation remembers 60 days.
"""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import numpy as np

from kota.settings import PROJECT_ROOT
from processing import kernels
from processing.detect import PlainReading
from processing.processor import new_detectors
from processing.settings import ProcessorSettings

BEIJING = PROJECT_ROOT.parent / "shared" / "data" / "beijing_air"
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def station_readings(path: Path) -> list[list[PlainReading]]:
    """Each hour's PM2.5 and PM10 of one station, as one message (missing values left out)."""
    hours = []
    with path.open() as f:
        for row in csv.DictReader(f):
            ts = int(
                dt.datetime(
                    int(row["year"]), int(row["month"]), int(row["day"]), int(row["hour"]), tzinfo=dt.UTC
                ).timestamp()
                * 1000
            )
            device = row["station"]
            hour = [
                PlainReading(device, metric, ts, float(row[column]))
                for metric, column in (("pm25", "PM2.5"), ("pm10", "PM10"))
                if row[column] not in ("", "NA")
            ]
            if hour:
                hours.append(hour)
    return hours


def detections(times: list[int], gap_ms: int = DAY_MS) -> list[int]:
    """The first time of each run of signals with no gap over `gap_ms`."""
    firsts: list[int] = []
    last = None
    for t in sorted(times):
        if last is None or t - last > gap_ms:
            firsts.append(t)
        last = t
    return firsts


def run_station(hours: list[list[PlainReading]], settings: ProcessorSettings) -> dict[str, list[int]]:
    """Signal times by kind: `inconsistent` (the relation, from the processor's detectors), or each
    metric judged alone (by the same detectors with relations off: with them on, a reading the
    relation judges higher is stored as `inconsistent` and would be missing from its metric's count)."""
    signals: dict[str, list[int]] = {"inconsistent": [], "pm25 alone": [], "pm10 alone": []}
    for relations in (True, False):
        judged = settings.model_copy(update={"relations": relations})
        detectors = new_detectors(judged)
        for start in range(0, len(hours), 24):  # a day to a batch
            batch = [r for hour in hours[start : start + 24] for r in hour]
            _, scores, reasons, _ = detectors.score_readings(batch, now_ms=batch[-1].ts_ms)
            for i in np.flatnonzero((scores >= judged.anomaly_threshold) & (reasons != kernels.REPEAT)):
                if relations and reasons[i] == kernels.INCONSISTENT:
                    signals["inconsistent"].append(batch[i].ts_ms)
                elif not relations:
                    signals[f"{batch[i].metric} alone"].append(batch[i].ts_ms)
    return signals


def with_drift(
    hours: list[list[PlainReading]], first: int, ramp_hours: int, size: float, hold_hours: int
) -> list[list[PlainReading]]:
    """The station's PM2.5 sensor drifting from hour `first`: + `size` reached over `ramp_hours`,
    then held for `hold_hours`; PM10 as it was."""
    out = list(hours)
    for k in range(ramp_hours + hold_hours):
        bend = size * min(1.0, (k + 1) / ramp_hours)
        out[first + k] = [r._replace(value=r.value + bend) if r.metric == "pm25" else r for r in hours[first + k]]
    return out


def main() -> None:
    settings = ProcessorSettings()
    print(
        "bench.relations_real: Beijing stations, hourly PM2.5 and PM10 through the processor's detectors "
        "(a detection: signals with no gap over a day)"
    )
    stations = {path.stem.split("_")[2]: station_readings(path) for path in sorted(BEIJING.glob("PRSA_Data_*.csv"))}
    clean_runs = {}
    for name, hours in stations.items():
        signals = clean_runs[name] = run_station(hours, settings)
        years = (hours[-1][0].ts_ms - hours[0][0].ts_ms) / (365.25 * DAY_MS)
        counts = {kind: len(detections(times)) for kind, times in signals.items()}
        print(
            f"  {name:<9} {years:.1f} years: "
            + ", ".join(f"{kind} {n} ({n / years:.1f} a year)" for kind, n in counts.items())
        )
    # A drifting PM2.5 sensor injected into the real stream, one drift a run: found when a signal of
    # the kind falls in the drift's hours and was not in the clean run's (so the air's own events do
    # not count), with the delay from the drift's first hour.
    print(
        "Injected PM2.5 drifts (+ a share of the station's median PM2.5, reached over 1 or 7 days, held 2 "
        "days), 8 a station at evenly spaced hours after the first 60 days:"
    )
    for share, ramp_days in ((0.5, 1), (0.5, 7), (1.0, 1), (1.0, 7), (2.0, 1), (2.0, 7)):
        found: dict[str, list[float]] = {"inconsistent": [], "pm25 alone": []}
        total = 0
        for name, hours in stations.items():
            size = share * float(np.median([r.value for hour in hours for r in hour if r.metric == "pm25"]))
            ramp, hold = 24 * ramp_days, 48
            usable = len(hours) - 60 * 24 - ramp - hold
            for j in range(8):
                first = 60 * 24 + (j * usable) // 8
                start_ms, end_ms = hours[first][0].ts_ms, hours[first + ramp + hold - 1][0].ts_ms
                signals = run_station(with_drift(hours, first, ramp, size, hold), settings)
                total += 1
                for kind in found:
                    clean = set(clean_runs[name][kind])
                    new = [t for t in signals[kind] if start_ms <= t <= end_ms and t not in clean]
                    if new:
                        found[kind].append((min(new) - start_ms) / HOUR_MS)
        print(
            f"  +{share:g} x median over {ramp_days} day(s): "
            + "; ".join(
                f"{kind} found {len(delays)} of {total}"
                + (f", median {np.median(delays):.0f} h after it began" if delays else "")
                for kind, delays in found.items()
            )
        )


if __name__ == "__main__":
    main()
