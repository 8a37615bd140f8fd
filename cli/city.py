"""Tools for testers: a simulated city, replays of recorded files, and the scorecard
(`kota simulate`, `replay`, `score`)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from typing import TYPE_CHECKING

from cli.common import setup_logging
from kota.settings import StackSettings

if TYPE_CHECKING:
    from kota.registry import Device


def _parse_time(text: str) -> int:
    """An ISO date or time (local WIB when it has no zone), or `today`/`yesterday`: epoch ms."""
    import datetime as dt

    wib = dt.timezone(dt.timedelta(hours=7))
    midnight = dt.datetime.now(wib).replace(hour=0, minute=0, second=0, microsecond=0)
    named = {"today": midnight, "yesterday": midnight - dt.timedelta(days=1)}
    moment = named.get(text) or dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=wib)
    return int(moment.timestamp() * 1000)


def _register_behind_gateway(
    stack: StackSettings,
    gateway_id: str,
    city: str,
    devices: list[Device],
    device_passwords: dict[str, str] | None = None,
) -> str:
    """Register a gateway with a fresh password and the devices behind it, let the broker know; the password.
    The simulator and replays do this on every run: each is its own integrator. Their accounts have
    no rate limit: they publish recorded or simulated time as fast as the broker takes it."""
    import psycopg

    from deploy import mqtt_access
    from kota.registry import Gateway, new_password, set_rate_limit, upsert_devices, upsert_gateway

    password = new_password()
    with psycopg.connect(stack.postgres_dsn) as conn:
        upsert_gateway(conn, Gateway(gateway_id, city), password)
        upsert_devices(conn, devices, device_passwords)
        for account in [gateway_id, *(device_passwords or {})]:
            set_rate_limit(conn, account, 0)
    mqtt_access.sync(stack)
    return password


def cmd_simulate(args: argparse.Namespace) -> int:
    from collections import Counter
    from pathlib import Path

    from kota.mqtt import MqttLogin
    from kota.registry import new_password
    from simulators.anomalies import Injector, label_entries, plan, weather_labels, write_labels
    from simulators.city import build_city
    from simulators.commands import DeviceCommands
    from simulators.publisher import run
    from simulators.stream import FORMS, CityStream, device_forms

    setup_logging()
    stack = StackSettings()
    city = build_city(args.city, args.devices, args.seed)
    forms = tuple(args.forms.split(","))
    if not forms or set(forms) - set(FORMS):
        raise SystemExit(f"--forms: a comma-separated choice of {', '.join(FORMS)}")
    interval_ms = int(args.interval * 1000)
    start_ms = _parse_time(args.start) if args.start else None
    hours = args.hours if args.hours is not None else 24.0 if start_ms is not None else None
    ticks = args.ticks if args.ticks is not None else int(hours * 3_600_000 // interval_ms) if hours else None
    plan_start = start_ms if start_ms is not None else time.time_ns() // 1_000_000
    # an open-ended live run gets a week of anomalies planned ahead
    plan_end = plan_start + (ticks * interval_ms if ticks is not None else 7 * 86_400_000)
    anomalies = plan(city, plan_start, plan_end, interval_ms, args.anomalies_per_day)
    labels = Path(args.labels or stack.state_dir / f"simulator-{city.city}-labels.json")
    write_labels(
        labels,
        city=city.city,
        seed=city.seed,
        start_ms=plan_start,
        end_ms=plan_end,
        interval_ms=interval_ms,
        labels=label_entries(anomalies) + weather_labels(city, plan_start, plan_end, interval_ms),
    )

    forms_of = device_forms(city, forms, args.single_devices)
    device_passwords = {d: new_password() for d, form in forms_of.items() if form == "single"}
    gateway_password = _register_behind_gateway(stack, city.gateway_id, city.city, city.devices, device_passwords)
    logins = {city.gateway_id: MqttLogin(stack.mqtt_port, city.gateway_id, gateway_password, host=stack.mqtt_host)}
    logins |= {d: MqttLogin(stack.mqtt_port, d, p, host=stack.mqtt_host) for d, p in device_passwords.items()}
    pace = (
        f"{args.rate:g} readings/s"
        if args.rate
        else "as fast as the broker acknowledges"
        if start_ms
        else f"every {args.interval:g} s"
    )
    logging.getLogger("kota.simulator").info(
        "city %s: %d devices (%s), %d anomalies planned (labels: %s); publishing %s",
        city.city,
        len(city.devices),
        ", ".join(f"{n} {form}" for form, n in Counter(forms_of.values()).items()),
        len(anomalies),
        labels,
        pace,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        run(
            CityStream(city, Injector(anomalies), forms_of, commands=DeviceCommands(city.devices)),
            logins=logins,
            stop=stop,
            interval_ms=interval_ms,
            start_ms=start_ms,
            max_ticks=ticks,
            rate=args.rate,
            count_log=Path(args.counts) if args.counts else None,
        )
    except KeyboardInterrupt:
        pass
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    import json
    import threading
    from pathlib import Path

    from tqdm import tqdm

    from ingest.settings import GatewaySettings
    from kota.contract import gateway_telemetry_topic
    from kota.mqtt import MqttLogin
    from simulators import replay
    from simulators.anomalies import write_labels
    from simulators.publisher import Connection, Sent

    stack = StackSettings()
    path = Path(args.file)
    kind, mapping = replay.mapping_for(
        path, args.format, metric=args.metric, mapping_file=Path(args.mapping) if args.mapping else None
    )
    parsed = replay.parse(
        path,
        mapping,
        since_ms=_parse_time(args.since) if args.since else None,
        until_ms=_parse_time(args.until) if args.until else None,
    )
    if not parsed.rows:
        raise SystemExit(f"{path.name}: no rows to replay")
    now = time.time_ns() // 1_000_000
    first, last = parsed.rows[0].ts_ms, parsed.rows[-1].ts_ms
    shift = now - last if args.times == "shift" else 0
    limits = GatewaySettings()
    oldest_age, newest_ahead = now - (first + shift), last + shift - now
    if oldest_age > limits.max_age_ms - 60_000 or newest_ahead > limits.max_future_ms:
        raise SystemExit(
            f"{path.name} spans {(last - first) / 86_400_000:.1f} days ({args.times} times: oldest "
            f"{oldest_age / 86_400_000:.1f} days ago); the gateway takes readings up to "
            f"{limits.max_age_ms / 86_400_000:.0f} days old and {limits.max_future_ms / 60_000:.0f} min ahead "
            "(KOTA_GATEWAY_MAX_AGE_MS), so some would be refused. Replay part of it with --since/--until."
        )
    gateway_id = f"{args.city}-replay-gateway"
    devices = replay.devices_for(parsed, mapping, args.city, gateway_id)
    password = _register_behind_gateway(stack, gateway_id, args.city, list(devices.values()))
    skipped = sum(parsed.skipped.values())
    times = f"shifted by {shift / 86_400_000:.2f} days" if shift else "as recorded"
    print(
        f"{path.name} ({kind}): {len(parsed.rows)} rows, {parsed.readings} readings from {len(devices)} device(s) "
        f"to city {args.city}; {skipped} empty or invalid values and {sum(parsed.bad_rows.values())} unreadable "
        f"rows left out; times {times}"
    )
    if kind == "nab":
        windows = path.parent.parent / "combined_windows.json"
        labels_path = Path(args.labels or stack.state_dir / f"replay-{args.city}-labels.json")
        [device] = devices.values()
        metric = next(iter(device.metrics))
        labels = [
            x
            for x in (replay.nab_labels(path, windows, device, metric, shift) if windows.exists() else [])
            if x["end_ms"] >= first + shift and x["start_ms"] <= last + shift
        ]  # the replayed part's
        write_labels(
            labels_path,
            city=args.city,
            seed=None,
            start_ms=first + shift,
            end_ms=last + shift + 1,
            interval_ms=None,
            labels=labels,
        )
        print(f"{len(labels)} NAB window(s) written to {labels_path} (for kota score)")

    sent, lock, stop = Sent(), threading.Lock(), threading.Event()
    login = MqttLogin(stack.mqtt_port, gateway_id, password, host=stack.mqtt_host)
    connection = Connection(login, f"kota-replay-{args.city}", sent, lock, max_queued=1000)
    topic = gateway_telemetry_topic(args.city, gateway_id)
    began = time.monotonic()
    try:
        with tqdm(total=parsed.readings, unit=" readings", unit_scale=True, smoothing=0.1) as bar:
            for payload, readings, row_ts in replay.batches(parsed.rows, devices, 1 if args.speed else 500, shift):
                if args.speed:  # wait for the first row of this message, replay time
                    time.sleep(max(0.0, began + (row_ts - first) / 1000 / args.speed - time.monotonic()))
                connection.publish(topic, payload, readings, stop)
                bar.update(readings)
    except KeyboardInterrupt:
        print("interrupted")
    finally:
        connection.drain(timeout_s=30)
        connection.close()
    print(
        f"sent {sent.readings} readings in {sent.messages} messages, {sent.acknowledged_readings} acknowledged by "
        f"the broker, in {time.monotonic() - began:.1f} s"
    )
    for reason, count in sorted((parsed.skipped + parsed.bad_rows).items()):
        print(f"  left out: {count} {reason}")
    if args.counts:
        Path(args.counts).write_text(
            json.dumps(
                {
                    "rows": len(parsed.rows),
                    "readings": sent.readings,
                    "acknowledged_readings": sent.acknowledged_readings,
                    "skipped": dict(parsed.skipped),
                    "bad_rows": dict(parsed.bad_rows),
                }
            )
        )
    return 0 if sent.acknowledged_readings == parsed.readings else 1


def cmd_score(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simulators import scorecard
    from simulators.anomalies import read_labels

    stack = StackSettings()
    labels_path = Path(args.labels or stack.state_dir / f"simulator-{args.city}-labels.json")
    if not labels_path.exists():
        raise SystemExit(
            f"no labels file at {labels_path}: run `kota simulate` (or `kota replay`) first, or pass --labels"
        )
    document = read_labels(labels_path)
    from processing.settings import ProcessorSettings

    card = scorecard.load(stack.postgres_dsn, document, dropout_factor=ProcessorSettings().dropout_factor)
    text = scorecard.report(card)
    out = Path(args.out or stack.state_dir / "scorecards")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{document['city']}-scorecard.txt").write_text(text)
    print(text, end="")
    labels = document["labels"]
    device = args.device or next(
        (x["device_id"] for x in labels if x["kind"] == "flood_wave"), labels[0]["device_id"] if labels else None
    )
    if device:
        png = out / f"{device}.png"
        scorecard.picture(stack.postgres_dsn, document, device, png)
        print(f"report: {out / (document['city'] + '-scorecard.txt')}\npicture of {device}: {png}")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sim = sub.add_parser("simulate", help="run a simulated city publishing over MQTT")
    sim.add_argument("--devices", type=int, default=36)
    sim.add_argument("--interval", type=float, default=5.0, help="seconds between readings")
    sim.add_argument("--city", default="bandung")
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--ticks", type=int, default=None, help="stop after this many rounds")
    sim.add_argument(
        "--start",
        help="simulate from this time (ISO, local WIB without a zone, or today/yesterday) "
        "instead of the clock; sends as fast as the broker takes it unless --rate",
    )
    sim.add_argument(
        "--hours",
        type=float,
        default=None,
        help="simulated span (default: 24 with --start; without --start it runs until stopped)",
    )
    sim.add_argument("--rate", type=float, default=None, help="at most this many readings per second")
    sim.add_argument(
        "--forms",
        default="batch,senml,single",
        help="message forms the devices use, round-robin: batch (gateway JSON), senml (gateway "
        "SenML), single (the device's own topic and login)",
    )
    sim.add_argument(
        "--single-devices",
        type=int,
        default=12,
        help="at most this many devices publish for themselves (one MQTT connection each)",
    )
    sim.add_argument(
        "--anomalies-per-day",
        type=int,
        default=None,
        help="single-sensor anomalies per simulated day (default: one per six devices, at least 6)",
    )
    sim.add_argument("--labels", help="where to write the ground truth (default: STATE_DIR/simulator-CITY-labels.json)")
    sim.add_argument("--counts", help="write what was sent and acknowledged here (JSON) when the run ends")
    sim.set_defaults(func=cmd_simulate)

    rp = sub.add_parser(
        "replay",
        help="replay a recorded file through MQTT as its devices (NAB, Beijing air "
        "quality, Jakarta ISPU, or any CSV with a mapping)",
    )
    rp.add_argument("file")
    rp.add_argument("--format", default="auto", choices=["auto", "nab", "beijing", "jakarta", "csv"])
    rp.add_argument(
        "--mapping", help="JSON mapping of a CSV's columns to devices and metrics (docs/testing_streams.md)"
    )
    rp.add_argument(
        "--metric", help="the metric a NAB file's value is (default from its name: speed, occupancy, TravelTime)"
    )
    rp.add_argument("--city", default="replay", help="city the replayed devices belong to")
    rp.add_argument(
        "--speed",
        type=float,
        default=None,
        help="1 = real time, 60 = a minute a second; default: as fast as the broker takes it",
    )
    rp.add_argument(
        "--times",
        choices=["shift", "original"],
        default="shift",
        help="shift: the last row lands now, spacing kept (default); original: as recorded",
    )
    rp.add_argument("--since", help="only rows at or after this time (ISO; WIB when no zone)")
    rp.add_argument("--until", help="only rows before this time")
    rp.add_argument(
        "--labels", help="where a NAB replay writes its shifted windows (default: STATE_DIR/replay-CITY-labels.json)"
    )
    rp.add_argument("--counts", help="write rows, readings sent and acknowledged here (JSON)")
    rp.set_defaults(func=cmd_replay)

    sc = sub.add_parser(
        "score",
        help="compare what the platform detected with a labels file: precision, recall, "
        "F1, NAB score, time to detect and to alert per anomaly kind",
    )
    sc.add_argument("--city", default="bandung", help="whose simulator labels to read (default file)")
    sc.add_argument("--labels", help="labels file (default: STATE_DIR/simulator-CITY-labels.json)")
    sc.add_argument("--out", help="folder for the report and picture (default: STATE_DIR/scorecards)")
    sc.add_argument("--device", help="draw this device (default: the first flood-wave gate)")
    sc.set_defaults(func=cmd_score)
