"""What the platform detected against what was injected: the scorecard behind `kota score`.

Labels come from the simulator (or from a replay of NAB files, which writes the same format). The
platform's side comes from the database: rows of `anomalies` (the detectors) and `alerts` (what
reached an operator).

- A detection is a run of anomalies and alerts (the domain rules: ISPU, Siaga) on one device with
  no gap longer than `merge_gap_ms`; an alert counts as reason `alert:<type>`.
- A label is detected when a detection on its device that holds the label's metric (any metric, for
  a dropout) overlaps its window, extended by `grace_ms` after it ends (a detector may only be sure
  once a level shift has lasted a while): a PM10 signal does not find a drifting PM2.5 sensor.
- Precision: detections that touch a label / all detections. Recall: labels detected / labels.
- Time to detect: the event time of the detection's first anomaly or alert on the label's metric
  (on any, for a dropout) minus the label's start; time to alert the same for the first alert on
  the device inside the extended window.
- NAB standard profile over the labelled series, scored as `simulators.scoring` does, with each
  window at least `nab_window_ms` long (a one-reading spike has no room for NAB's early reward).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from simulators import scoring

MINUTE_MS = 60_000


@dataclass(frozen=True)
class Label:
    kind: str
    device_id: str
    metric: str | None
    start_ms: int
    end_ms: int


@dataclass(frozen=True)
class Detection:
    device_id: str
    first_ms: int
    last_ms: int
    reasons: frozenset[str]
    first_of_metric: tuple[tuple[str, int], ...]  # (metric, its first event time in the run), by metric

    @property
    def metrics(self) -> frozenset[str]:
        return frozenset(m for m, _ in self.first_of_metric)

    def first_on(self, metric: str | None) -> int | None:
        """When the run first signalled `metric` (None: any metric); None if it never did."""
        if metric is None:
            return self.first_ms
        return dict(self.first_of_metric).get(metric)


@dataclass
class KindScore:
    labels: int = 0
    detected: int = 0
    alerted: int = 0
    detect_delays_ms: list[int] = field(default_factory=list)
    alert_delays_ms: list[int] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.detected / self.labels if self.labels else 0.0


@dataclass
class Scorecard:
    """What the platform detected against the labels: per kind of anomaly, false alarms by reason, NAB score."""

    city: str
    labels: int
    detections: int
    true_detections: int
    by_kind: dict[str, KindScore]
    false_by_reason: dict[str, int]
    nab: scoring.CorpusScore | None

    @property
    def precision(self) -> float:
        return self.true_detections / self.detections if self.detections else 0.0

    @property
    def recall(self) -> float:
        return sum(k.detected for k in self.by_kind.values()) / self.labels if self.labels else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def labels_from(document: dict[str, Any]) -> list[Label]:
    return [
        Label(x["kind"], x["device_id"], x.get("metric"), int(x["start_ms"]), int(x["end_ms"]))
        for x in document["labels"]
    ]


def group_detections(rows: list[tuple[str, str, int, str]], merge_gap_ms: int) -> list[Detection]:
    """rows: (device id, metric, event time ms, reason), in any order."""
    by_device: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for device_id, metric, ts, reason in rows:
        by_device[device_id].append((ts, metric, reason))
    detections = []
    for device_id, points in by_device.items():
        points.sort()
        run = [points[0]]
        for point in points[1:]:
            if point[0] - run[-1][0] > merge_gap_ms:
                detections.append(_detection(device_id, run))
                run = []
            run.append(point)
        detections.append(_detection(device_id, run))
    return detections


def _detection(device_id: str, run: list[tuple[int, str, str]]) -> Detection:
    firsts: dict[str, int] = {}
    for ts, metric, _ in run:  # in time order
        firsts.setdefault(metric, ts)
    return Detection(device_id, run[0][0], run[-1][0], frozenset(r for _, _, r in run), tuple(sorted(firsts.items())))


def score(
    labels: list[Label],
    detections: list[Detection],
    alerts: list[tuple[str, int]],
    *,
    city: str,
    grace_ms: int = 30 * MINUTE_MS,
    nab: scoring.CorpusScore | None = None,
) -> Scorecard:
    """alerts: (device id, first signal ms)."""
    by_kind: dict[str, KindScore] = defaultdict(KindScore)
    touched: set[int] = set()
    for label in labels:
        kind = by_kind[label.kind]
        kind.labels += 1
        end = label.end_ms + grace_ms
        hits = {  # detection -> when it first signalled the label's metric
            i: first
            for i, d in enumerate(detections)
            if d.device_id == label.device_id
            and d.first_ms < end
            and d.last_ms >= label.start_ms
            and (first := d.first_on(label.metric)) is not None
        }
        if hits:
            kind.detected += 1
            touched.update(hits)
            first = min(max(t, label.start_ms) for t in hits.values())
            kind.detect_delays_ms.append(first - label.start_ms)
        raised = [ts for device_id, ts in alerts if device_id == label.device_id and label.start_ms <= ts < end]
        if raised:
            kind.alerted += 1
            kind.alert_delays_ms.append(min(raised) - label.start_ms)
    false_by_reason: dict[str, int] = defaultdict(int)
    for i, detection in enumerate(detections):
        if i not in touched:
            for reason in detection.reasons:
                false_by_reason[reason] += 1
    return Scorecard(city, len(labels), len(detections), len(touched), dict(by_kind), dict(false_by_reason), nab)


def nab_score(
    series: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]],
    labels: list[Label],
    nab_window_ms: int = 30 * MINUTE_MS,
) -> scoring.CorpusScore | None:
    """series: (device, metric) → (event times ms, the detectors' score at each, 0 where none)."""
    files = []
    for (device_id, metric), (times, scores) in sorted(series.items()):
        windows = []
        for label in sorted(labels, key=lambda x: x.start_ms):
            if label.device_id != device_id or label.metric not in (None, metric):
                continue
            first = int(np.searchsorted(times, label.start_ms))
            last = int(np.searchsorted(times, max(label.end_ms, label.start_ms + nab_window_ms))) - 1
            if first <= last:
                windows.append((first, last))
        if windows:
            files.append(scoring.prepare(f"{device_id}/{metric}", scores, windows))
    return scoring.corpus_score(files) if files else None


def without_the_end(signals: list[Any], end_from_ms: int) -> list[Any]:
    """Signals (device, metric, ms, reason) less the dropouts dated at or after `end_from_ms`: once a
    simulation or replay stops, every series falls silent, and the processor's timer rightly says so,
    dated at each series' last reading. The stream's own end is not an anomaly, and neither is a
    silence that began too near it to have lasted a dropout's length (`dropout_factor` intervals)
    before it: a series whose last reading or two happened not to arrive ends a little early."""
    return [x for x in signals if not (str(x[3]).endswith("dropout") and int(x[2]) >= end_from_ms)]


# -- the database side --------------------------------------------------------------------------------
def load(
    dsn: str,
    document: dict[str, Any],
    *,
    merge_gap_ms: int = 15 * MINUTE_MS,
    grace_ms: int = 30 * MINUTE_MS,
    dropout_factor: float = 5.0,
) -> Scorecard:
    """The scorecard of a simulated or replayed city from the database. `dropout_factor`: the
    processor's (silent for this many usual intervals is a dropout), for the stream's end."""
    labels = labels_from(document)
    city, start, end = document["city"], int(document["start_ms"]), int(document["end_ms"]) + grace_ms
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT a.device_id, a.metric, (extract(epoch FROM a.ts) * 1000)::bigint, a.reason FROM anomalies a "
            "JOIN devices d USING (device_id) WHERE d.city = %s AND a.ts >= to_timestamp(%s / 1000.0) "
            "AND a.ts < to_timestamp(%s / 1000.0)",
            (city, start, end),
        ).fetchall()
        alerts = conn.execute(
            "SELECT device_id, metric, (extract(epoch FROM first_ts) * 1000)::bigint, 'alert:' || alert_type "
            "FROM alerts WHERE city = %s "
            "AND first_ts >= to_timestamp(%s / 1000.0) AND first_ts < to_timestamp(%s / 1000.0)",
            (city, start, end),
        ).fetchall()
        series = {}
        for device_id, metric in sorted({(x.device_id, x.metric) for x in labels if x.metric}):
            points = conn.execute(
                "SELECT (extract(epoch FROM r.ts) * 1000)::bigint, coalesce(max(a.score), 0) FROM readings r "
                "LEFT JOIN anomalies a ON a.device_id = r.device_id AND a.metric = r.metric AND a.ts = r.ts "
                "WHERE r.device_id = %s AND r.metric = %s AND r.ts >= to_timestamp(%s / 1000.0) "
                "AND r.ts < to_timestamp(%s / 1000.0) GROUP BY r.ts ORDER BY r.ts",
                (device_id, metric, start, end),
            ).fetchall()
            if points:
                series[(device_id, metric)] = (np.array([p[0] for p in points]), np.array([p[1] for p in points]))
    interval = int(document.get("interval_ms") or 0)
    end_from = int(document["end_ms"]) - interval - int(dropout_factor * interval)
    rows, alerts = without_the_end(rows, end_from), without_the_end(alerts, end_from)
    signals = [(d, m, int(t), r) for d, m, t, r in rows + alerts]
    detections = group_detections(signals, merge_gap_ms) if signals else []
    return score(
        labels,
        detections,
        [(d, int(t)) for d, _, t, _ in alerts],
        city=city,
        grace_ms=grace_ms,
        nab=nab_score(series, labels),
    )


def report(card: Scorecard) -> str:
    def minutes(values: list[int]) -> str:
        return f"{statistics.median(values) / MINUTE_MS:7.1f}" if values else "      -"

    lines = [
        f"Scorecard for {card.city}: {card.labels} labelled anomalies, {card.detections} detections",
        f"precision {card.precision:.3f}   recall {card.recall:.3f}   F1 {card.f1:.3f}",
    ]
    if card.nab is not None:
        lines.append(
            f"NAB standard profile {card.nab.score:.1f} (threshold {card.nab.threshold:.3f}; "
            f"TP {card.nab.tp}, FP {card.nab.fp}, FN {card.nab.fn})"
        )
    lines += [
        "",
        f"{'kind':<18} {'labels':>6} {'found':>6} {'recall':>7} {'alerted':>8} "
        f"{'min to detect':>14} {'min to alert':>13}",
    ]
    for kind, k in sorted(card.by_kind.items()):
        lines.append(
            f"{kind:<18} {k.labels:>6} {k.detected:>6} {k.recall:>7.2f} {k.alerted:>8} "
            f"{minutes(k.detect_delays_ms):>14} {minutes(k.alert_delays_ms):>13}"
        )
    lines.append("(minutes are medians, event time from the anomaly's start)")
    if card.false_by_reason:
        lines += [
            "",
            "detections outside every label, by reason: "
            + ", ".join(f"{r} {n}" for r, n in sorted(card.false_by_reason.items())),
        ]
    return "\n".join(lines) + "\n"


def picture(dsn: str, document: dict[str, Any], device_id: str, path: Path) -> None:
    """The device's labelled series (or its metrics), label windows shaded, anomalies and alerts marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    labels = [x for x in labels_from(document) if x.device_id == device_id]
    start, end = int(document["start_ms"]), int(document["end_ms"])
    with psycopg.connect(dsn) as conn:
        metrics = sorted({x.metric for x in labels if x.metric}) or [
            m
            for (m,) in conn.execute(
                "SELECT DISTINCT metric FROM readings WHERE device_id = %s ORDER BY 1 LIMIT 3", (device_id,)
            )
        ]
        fig, axes = plt.subplots(len(metrics) or 1, 1, figsize=(12, 3 * max(len(metrics), 1)), squeeze=False)
        for ax, metric in zip(axes[:, 0], metrics, strict=False):
            where = (device_id, metric, start, end)
            points = conn.execute(
                "SELECT ts, value FROM readings WHERE device_id = %s AND metric = %s AND ts >= "
                "to_timestamp(%s / 1000.0) AND ts < to_timestamp(%s / 1000.0) ORDER BY ts",
                where,
            ).fetchall()
            found = conn.execute(
                "SELECT a.ts, r.value FROM anomalies a JOIN readings r USING (device_id, metric, ts) "
                "WHERE a.device_id = %s AND a.metric = %s AND a.ts >= to_timestamp(%s / 1000.0) "
                "AND a.ts < to_timestamp(%s / 1000.0)",
                where,
            ).fetchall()
            raised = conn.execute(
                "SELECT first_ts FROM alerts WHERE device_id = %s AND metric = %s AND first_ts "
                ">= to_timestamp(%s / 1000.0) AND first_ts < to_timestamp(%s / 1000.0)",
                where,
            ).fetchall()
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], lw=0.8, color="#1f4e79", label=metric)
            for label in labels:
                if label.metric in (None, metric):
                    ax.axvspan(
                        np.datetime64(label.start_ms, "ms"),
                        np.datetime64(label.end_ms, "ms"),
                        color="#f4b183",
                        alpha=0.4,
                        label=label.kind,
                    )
            if found:
                ax.scatter(
                    [f[0] for f in found],
                    [f[1] for f in found],
                    marker="x",
                    color="#c00000",
                    s=18,
                    label="anomaly",
                    zorder=3,
                )
            for (ts,) in raised:
                ax.axvline(ts, color="#7030a0", ls="--", lw=1)
            ax.set_title(f"{device_id} {metric}" + (f" ({len(raised)} alert(s), dashed)" if raised else ""))
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%d %H:%M"))  # type: ignore[no-untyped-call]
            handles, names = ax.get_legend_handles_labels()
            unique = dict(zip(names, handles, strict=False))
            ax.legend(unique.values(), unique.keys(), loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
