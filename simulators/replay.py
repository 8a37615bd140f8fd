"""Replay recorded files through MQTT as devices: `kota replay`.

A mapping says how a CSV file becomes readings: its delimiter, where the time is (one column with a
format, or year/month/day/hour columns) and in which time zone, which column names the device (or
one fixed device), the device type, and which columns are which metric in which unit. NAB, the
Beijing air-quality files and the Jakarta ISPU file have built-in mappings (`mapping_for`); any
other CSV takes a JSON mapping of the same shape (see docs/testing_streams.md).

Every row is accounted for: each value becomes a reading or is counted as skipped with a reason
(empty, not a number, outside the metric's range); the replay prints both counts, and the
platform must store exactly the readings it sent.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kota.contract import METRICS, convert_unit
from kota.registry import DEVICE_TYPES, Device, MetricSpec


@dataclass(frozen=True)
class ColumnMetric:
    metric: str
    unit: str  # the unit the file uses; converted to the metric's canonical unit


@dataclass(frozen=True)
class Mapping:
    device_type: str
    metrics: dict[str, ColumnMetric]  # file column → metric
    time_column: str | None = None
    time_format: str = "iso"  # strptime format, or iso, epoch_s, epoch_ms
    time_columns: tuple[str, ...] = ()  # year, month, day[, hour[, minute]] in separate columns
    timezone: str = "+07:00"
    device_column: str | None = None
    device_name: str | None = None  # one device for the whole file
    delimiter: str = ","

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Mapping:
        time = document.get("time", {})
        device = document.get("device", {})
        return cls(
            device_type=document["device_type"],
            metrics={
                c: ColumnMetric(m["metric"], m.get("unit", METRICS[m["metric"]].unit))
                for c, m in document["metrics"].items()
            },
            time_column=time.get("column"),
            time_format=time.get("format", "iso"),
            time_columns=tuple(time.get("columns", ())),
            timezone=time.get("timezone", "+07:00"),
            device_column=device.get("column"),
            device_name=device.get("name"),
            delimiter=document.get("delimiter", ","),
        )

    def __post_init__(self) -> None:
        if self.device_type not in DEVICE_TYPES:
            raise ValueError(f"device_type {self.device_type!r}: one of {', '.join(DEVICE_TYPES)}")
        for column, target in self.metrics.items():
            if target.metric not in METRICS:
                raise ValueError(f"column {column!r}: unknown metric {target.metric!r}")
            if convert_unit(1.0, target.unit, METRICS[target.metric].unit) is None:
                raise ValueError(
                    f"column {column!r}: {target.unit!r} does not convert to {METRICS[target.metric].unit!r}"
                )
        if (self.time_column is None) == (not self.time_columns):
            raise ValueError("time: give either a column or columns")
        if (self.device_column is None) == (self.device_name is None):
            raise ValueError("device: give either a column or a name")


# NAB file names say what the sensor measured; any other NAB-format file needs --metric.
NAB_METRICS = {
    "speed": ColumnMetric("averageVehicleSpeed", "km/h"),
    "occupancy": ColumnMetric("occupancy", "%"),
    "TravelTime": ColumnMetric("travelTime", "s"),
}

BEIJING = Mapping(
    device_type="air_quality",
    time_columns=("year", "month", "day", "hour"),
    timezone="+08:00",
    device_column="station",
    metrics={
        "PM2.5": ColumnMetric("pm25", "ug/m3"),
        "PM10": ColumnMetric("pm10", "ug/m3"),
        "SO2": ColumnMetric("so2", "ug/m3"),
        "NO2": ColumnMetric("no2", "ug/m3"),
        "CO": ColumnMetric("co", "ug/m3"),
        "O3": ColumnMetric("o3", "ug/m3"),
        "TEMP": ColumnMetric("temperature", "Cel"),
        "WSPM": ColumnMetric("windSpeed", "m/s"),
        "RAIN": ColumnMetric("precipitation", "mm"),
    },
)

JAKARTA = Mapping(
    device_type="air_quality",
    time_column="tanggal",
    time_format="%d/%m/%Y",
    timezone="+07:00",
    device_column="stasiun",
    delimiter=";",
    metrics={
        "max": ColumnMetric("ispu", "1"),
        "pm25": ColumnMetric("ispuPm25", "1"),
        "pm10": ColumnMetric("ispuPm10", "1"),
        "so2": ColumnMetric("ispuSo2", "1"),
        "co": ColumnMetric("ispuCo", "1"),
        "o3": ColumnMetric("ispuO3", "1"),
        "no2": ColumnMetric("ispuNo2", "1"),
    },
)


def nab_mapping(path: Path, metric: str | None = None, device_type: str = "traffic_corridor") -> Mapping:
    prefix = path.stem.split("_")[0]
    target = ColumnMetric(metric, METRICS[metric].unit) if metric else NAB_METRICS.get(prefix)
    if target is None:
        raise ValueError(f"{path.name}: NAB files say only 'value'; name its metric with --metric")
    return Mapping(
        device_type=device_type,
        time_column="timestamp",
        time_format="%Y-%m-%d %H:%M:%S",
        timezone="+00:00",
        device_name=slug(path.stem),
        metrics={"value": target},
    )


def mapping_for(
    path: Path, kind: str = "auto", *, metric: str | None = None, mapping_file: Path | None = None
) -> tuple[str, Mapping]:
    """(kind, mapping): `kind` is nab, beijing, jakarta or csv (which needs `mapping_file`)."""
    if kind == "auto":
        header = path.open(encoding="utf-8").readline().strip()
        kind = (
            "csv"
            if mapping_file
            else "nab"
            if header == "timestamp,value"
            else "beijing"
            if header.startswith('"No","year"')
            else "jakarta"
            if header.startswith("tanggal;")
            else "csv"
        )
    if kind == "nab":
        return kind, nab_mapping(path, metric)
    if kind == "beijing":
        return kind, BEIJING
    if kind == "jakarta":
        return kind, JAKARTA
    if mapping_file is None:
        raise ValueError(
            f"{path.name}: not a known format; describe its columns with --mapping (docs/testing_streams.md)"
        )
    return "csv", Mapping.from_json(json.loads(mapping_file.read_text()))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


@dataclass(frozen=True)
class Row:
    device: str  # slug of the device column or name; the replay prefixes its city
    ts_ms: int
    values: dict[str, float]


@dataclass
class Parsed:
    rows: list[Row] = field(default_factory=list)
    readings: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason → values skipped
    bad_rows: Counter[str] = field(default_factory=Counter)  # reason → whole rows skipped


def _row_time(record: dict[str, str], m: Mapping, zone: dt.timezone) -> int:
    if m.time_columns:
        parts = [int(record[c]) for c in m.time_columns] + [0, 0]  # hour and minute default to 0
        year, month, day, hour, minute = parts[:5]
        return int(dt.datetime(year, month, day, hour, minute, tzinfo=zone).timestamp() * 1000)
    text = record[m.time_column or ""].strip()
    if m.time_format == "epoch_ms":
        return int(float(text))
    if m.time_format == "epoch_s":
        return int(float(text) * 1000)
    moment = dt.datetime.fromisoformat(text) if m.time_format == "iso" else dt.datetime.strptime(text, m.time_format)
    return int((moment if moment.tzinfo else moment.replace(tzinfo=zone)).timestamp() * 1000)


def parse(path: Path, m: Mapping, *, since_ms: int | None = None, until_ms: int | None = None) -> Parsed:
    """Read the whole file; rows outside [since, until) are left out (not counted as skipped)."""
    sign = -1 if m.timezone.startswith("-") else 1
    hours, minutes = (int(x) for x in m.timezone.lstrip("+-").split(":"))
    zone = dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
    parsed = Parsed()
    with path.open(encoding="utf-8", newline="") as handle:
        for record in csv.DictReader(handle, delimiter=m.delimiter):
            try:
                ts = _row_time(record, m, zone)
            except (ValueError, TypeError, KeyError) as exc:
                parsed.bad_rows[f"unreadable time ({type(exc).__name__})"] += 1
                continue
            if (since_ms is not None and ts < since_ms) or (until_ms is not None and ts >= until_ms):
                continue
            device = slug(record.get(m.device_column or "", "") or "") if m.device_column else m.device_name
            if not device:
                parsed.bad_rows["no device"] += 1
                continue
            values = {}
            for column, target in m.metrics.items():
                text = (record.get(column) or "").strip()
                if not text or text.upper() in ("NA", "NAN", "-", "---"):
                    parsed.skipped["empty"] += 1
                    continue
                try:
                    raw = float(text)
                except ValueError:
                    parsed.skipped["not a number"] += 1
                    continue
                spec = METRICS[target.metric]
                value = convert_unit(raw, target.unit, spec.unit)
                if value is None or not spec.low <= value <= spec.high:
                    parsed.skipped[f"outside {target.metric}'s range"] += 1
                    continue
                values[target.metric] = value
            if values:
                parsed.rows.append(Row(device, ts, values))
                parsed.readings += len(values)
    parsed.rows.sort(key=lambda r: r.ts_ms)  # files are in time order per device, not always across them
    return parsed


def devices_for(parsed: Parsed, m: Mapping, city: str, gateway_id: str) -> dict[str, Device]:
    """One registry device per file device, declaring exactly the metrics the file carries."""
    domain, _ = DEVICE_TYPES[m.device_type]
    metrics = {
        t.metric: MetricSpec(METRICS[t.metric].unit, METRICS[t.metric].low, METRICS[t.metric].high)
        for t in m.metrics.values()
    }
    return {
        name: Device(f"{city}-{name}", city, domain, m.device_type, metrics=metrics, gateway_id=gateway_id)
        for name in sorted({r.device for r in parsed.rows})
    }


def batches(
    rows: list[Row], devices: dict[str, Device], per_message: int = 500, shift_ms: int = 0
) -> Iterator[tuple[bytes, int, int]]:
    """Gateway JSON messages of about `per_message` readings, times moved by `shift_ms`:
    (payload, readings, recorded time of its first row, which paced replays wait for)."""
    body: dict[str, list[dict[str, object]]] = {}
    readings = first_ts = 0
    for row in rows:
        if not body:
            first_ts = row.ts_ms
        body.setdefault(devices[row.device].device_id, []).append({"ts": row.ts_ms + shift_ms, "values": row.values})
        readings += len(row.values)
        if readings >= per_message:
            yield json.dumps(body, separators=(",", ":")).encode(), readings, first_ts
            body, readings = {}, 0
    if body:
        yield json.dumps(body, separators=(",", ":")).encode(), readings, first_ts


def nab_labels(path: Path, windows_file: Path, device: Device, metric: str, shift_ms: int) -> list[dict[str, Any]]:
    """The file's NAB windows, shifted as its rows were, in the simulator's labels format."""
    windows = json.loads(windows_file.read_text())
    key = next((k for k in windows if k.endswith(f"/{path.name}")), None)
    labels = []
    for first, last in windows.get(key, []) if key else []:

        def ms(text: str) -> int:
            return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp() * 1000) + shift_ms

        labels.append(
            {
                "kind": "nab_window",
                "device_id": device.device_id,
                "metric": metric,
                "start_ms": ms(first),
                "end_ms": ms(last),
                "magnitude": 0,
            }
        )
    return labels
