"""The simulated city's detection, without the stack: how soon each kind of anomaly is found.

    .venv/bin/python -m bench.city_offline [--seeds 1 2 3] [--hours 157] [--devices 36] [--batch-ticks 5]

`kota simulate` then `kota score` judge the whole path (gateway, Kafka, processor, rules, alerts)
and take minutes a simulated week. This runs only the processor's detectors (`new_detectors` with
the default `ProcessorSettings`) over the same readings the simulator would publish (same seeds,
same values, same missing readings, in batches of `--batch-ticks` ticks), in seconds, and scores
them with the scorecard's own matching (simulators/scorecard.py). What it cannot see: the rules'
alerts (ISPU, Siaga, leaks), and dropouts, which the processor finds between batches; so those
kinds read lower here than in `kota score`. Its use is iterating on a detector: each kind's recall,
its delay (median and slowest) and the false detections by reason, per seed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
from collections.abc import Iterator

import numpy as np

from processing import kernels
from processing.detect import PlainReading
from processing.processor import new_detectors
from processing.settings import ProcessorSettings
from simulators import scorecard
from simulators.anomalies import Injector, label_entries, plan, weather_labels
from simulators.city import SimulatedCity, build_city, values_at
from simulators.stream import MISSING_SHARE

MINUTE_MS = 60_000
# Saturday 06:00 WIB (UTC+7), as the documented weeks (docs/testing_streams.md)
DEFAULT_START = dt.datetime(2026, 11, 28, 6, tzinfo=dt.timezone(dt.timedelta(hours=7)))


def city_readings(
    city: SimulatedCity, injector: Injector, start_ms: int, ticks: int, interval_ms: int
) -> Iterator[tuple[int, list[tuple[str, str, float]]]]:
    """(event time, [(device, metric, value)]) tick by tick: what `CityStream.tick` publishes (the
    same random draws, so the same values and the same missing readings), without device commands."""
    for tick in range(ticks):
        ts_ms = start_ms + tick * interval_ms
        rng = np.random.default_rng([city.seed, tick])
        readings = []
        for device in city.devices:
            clean = values_at(device, ts_ms, rng, city.seed)
            missing = rng.random() < MISSING_SHARE
            values = injector.apply(device, ts_ms, clean)
            if values is None or missing:
                continue
            readings += [(device.device_id, metric, round(value, 3)) for metric, value in values.items()]
        yield ts_ms, readings


def detect_city(
    seed: int,
    hours: float,
    devices: int,
    batch_ticks: int,
    start_ms: int,
    interval_ms: int = MINUTE_MS,
    missed: list[dict[str, object]] | None = None,
) -> tuple[scorecard.Scorecard, list[dict[str, object]]]:
    """The scorecard of the processor's detectors over a simulated city, and its labels; the labels
    no detection touched are appended to `missed` if given."""
    city = build_city(f"offline{seed}", devices, seed=seed)
    end_ms = start_ms + int(hours * 3_600_000)
    anomalies = plan(city, start_ms, end_ms, interval_ms)
    labels = label_entries(anomalies) + weather_labels(city, start_ms, end_ms, interval_ms)
    ranges = {(d.device_id, m): (spec.low, spec.high) for d in city.devices for m, spec in d.metrics.items()}
    settings = ProcessorSettings()
    detectors = new_detectors(settings, range_of=lambda key: ranges.get(key, (-np.inf, np.inf)))
    signals: list[tuple[str, str, int, str]] = []
    pending: list[PlainReading] = []

    def flush() -> None:
        # The processor's entry point (score_readings), so relations between metrics are judged too.
        _, scores, reasons, _ = detectors.score_readings(pending, now_ms=pending[-1].ts_ms)
        for i in np.flatnonzero((scores >= settings.anomaly_threshold) & (reasons != kernels.REPEAT)):
            r = pending[i]
            signals.append((r.device_id, r.metric, r.ts_ms, kernels.REASONS[int(reasons[i])]))
        pending.clear()

    ticks = int((end_ms - start_ms) // interval_ms)
    for tick, (ts_ms, readings) in enumerate(city_readings(city, Injector(anomalies), start_ms, ticks, interval_ms)):
        pending += [PlainReading(d, m, ts_ms, v) for d, m, v in readings]
        if (tick + 1) % batch_ticks == 0:
            flush()
    if pending:
        flush()
    document = {"labels": labels}
    detections = scorecard.group_detections(signals, 15 * MINUTE_MS) if signals else []
    card = scorecard.score(scorecard.labels_from(document), detections, [], city=city.city)
    if missed is not None:
        for label in labels:
            end = int(label["end_ms"]) + 30 * MINUTE_MS  # the scorecard's grace
            if not any(
                d.device_id == label["device_id"] and d.first_ms < end and d.last_ms >= int(label["start_ms"])
                for d in detections
            ):
                missed.append(label)
    return card, labels


def minutes(delays_ms: list[int]) -> str:
    if not delays_ms:
        return "-"
    return f"median {statistics.median(delays_ms) / MINUTE_MS:.0f} min, slowest {max(delays_ms) / MINUTE_MS:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--hours", type=float, default=157.0)
    parser.add_argument("--devices", type=int, default=36)
    parser.add_argument("--batch-ticks", type=int, default=5)
    parser.add_argument(
        "--start", default=DEFAULT_START.isoformat(), help="ISO time of the first tick (WIB without a zone)"
    )
    args = parser.parse_args()
    start = dt.datetime.fromisoformat(args.start)
    start = start if start.tzinfo else start.replace(tzinfo=DEFAULT_START.tzinfo)  # WIB, as kota simulate
    start_ms = int(start.timestamp() * 1000)
    for seed in args.seeds:
        card, _ = detect_city(seed, args.hours, args.devices, args.batch_ticks, start_ms)
        print(
            f"bench.city_offline: seed {seed}: {card.detections} detections, precision {card.precision:.3f}, "
            f"recall {card.recall:.3f}",
            flush=True,
        )
        for kind, k in sorted(card.by_kind.items()):
            print(f"  {kind:18s} {k.detected:3d}/{k.labels:<3d} {minutes(k.detect_delays_ms)}")
        false = ", ".join(f"{reason} {n}" for reason, n in sorted(card.false_by_reason.items())) or "none"
        print(f"  false detections by reason: {false}")


if __name__ == "__main__":
    main()
