"""The `kota` command: one entry point for every part of the platform.

    kota up / down / status        the whole local stack with a simulated city
    kota install                   what `kota up` installs, without starting anything
    kota gateway / processor / api the components, in the foreground
    kota simulate                  a simulated city publishing over MQTT
    kota migrate                   apply database migrations
    kota devices add/list/disable  the device registry
    kota deadletters               rejected input, with reasons
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from kota.settings import StackSettings

if TYPE_CHECKING:
    import datetime as dt

    from kota.registry import Device


def _setup_logging() -> None:
    from kota.logs import setup_logging

    setup_logging()


def _say(message: str) -> None:
    print(f"kota: {message}", flush=True)


def _run_until_signalled(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        def stopping(sig: signal.Signals) -> None:
            logging.getLogger("kota").info("%s received: stopping", sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping, sig)
        await main(stop)

    asyncio.run(runner())


# -- stack -------------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from deploy import mqtt_access
    from deploy import stack as local
    from kota.schema import migrate

    settings = StackSettings()
    started = time.monotonic()
    _say(f"state folder {settings.state_dir}")
    try:
        local.start_services(settings, _say, open_devices=False)
        backend, applied = migrate(settings.postgres_dsn)
        _say(f"database schema up to date ({backend}{', applied ' + str(applied) if applied else ''})")
        mqtt_access.sync(settings)
        if mqtt_access.ingest_held(local.mosquitto_dir(settings)):  # ingest.secret replaced by hand
            mqtt_access.restart_gateway_and_accept(settings, _say)
        for name in ("gateway", "processor", "api"):
            local.start_component(settings, name)
        local.open_devices_when_ingest_subscribed(settings, _say)
        if not args.no_simulator:
            local.start_component(settings, "simulate", "--devices", str(args.devices), "--interval",
                                  str(args.interval), "--city", args.city, instance="simulator")
        local.wait_until(lambda: local.api_healthy(settings), "api", settings, timeout_s=60)
        token = ensure_demo_operator(settings, args.city)
    except local.StackError as exc:
        _say(f"error: {exc}")
        return 1
    _say(f"up in {time.monotonic() - started:.0f} s")
    _say(f"API           {settings.api_url}/api/v1/devices   (OpenAPI: {settings.api_url}/docs)")
    _say(f"command page  {settings.api_url}/#token={token}")
    _say(f"demo operator token (city {args.city}): {token}")
    _say(f"health        {settings.api_url}/health")
    _say(f"logs          {settings.logs_dir}")
    return 0


def cmd_install(_args: argparse.Namespace) -> int:
    from deploy import stack as local

    try:
        local.install_missing(StackSettings(), _say)
    except local.StackError as exc:
        _say(f"error: {exc}")
        return 1
    _say("system packages and Kafka libraries present")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from deploy import procs
    from deploy import stack as local

    settings = StackSettings()
    for name in sorted(p.stem for p in settings.run_dir.glob("*.pid")):
        if name not in ("mosquitto", "kafka") and procs.stop(settings, name):
            _say(f"{name} stopped")
    if not args.keep_services:
        local.stop_services(settings, _say)
    _say(f"down; data kept in {settings.state_dir}")
    return 0


def cmd_status(_args: argparse.Namespace) -> int:
    from deploy import stack as local

    settings = StackSettings()
    rows = local.status_rows(settings)
    width = max(len(name) for name, _, _ in rows)
    for name, state, where in rows:
        print(f"{name:<{width}}  {state:<32}  {where}")
    return 0 if all(state.startswith("running") for name, state, _ in rows[:3]) else 1


def cmd_migrate(args: argparse.Namespace) -> int:
    from kota.schema import migrate

    stack = StackSettings()
    backend, applied = migrate(stack.postgres_dsn)
    _say(f"schema up to date on {backend}; applied now: {applied or 'nothing'}")
    if args.kafka_topics:
        from deploy.stack import create_topics

        asyncio.run(create_topics(stack))
        _say(f"kafka topics present on {stack.kafka_bootstrap} ({stack.kafka_partitions} readings partitions)")
    return 0


# -- components --------------------------------------------------------------------------------
def cmd_gateway(args: argparse.Namespace) -> int:
    from pydantic import SecretStr

    from deploy.mqtt_access import existing_ingest_password
    from deploy.stack import mosquitto_dir
    from ingest.gateway import run_gateway
    from ingest.settings import GatewaySettings

    _setup_logging()
    stack, settings = StackSettings(), GatewaySettings()
    if settings.mqtt_password is None and (secret := existing_ingest_password(mosquitto_dir(stack))):
        settings = settings.model_copy(update={"mqtt_password": SecretStr(secret)})  # run by hand beside `kota up`
    if args.drain:
        # A gateway scaled away for good: the broker may still hold (and keep routing to) its
        # persistent session's share of the subscription. Forward that, unsubscribe, exit.
        settings = settings.model_copy(update={"client_id": args.drain, "metrics_enabled": False})
    _run_until_signalled(lambda stop: run_gateway(stack, settings, stop, drain=bool(args.drain)))
    return 0


def cmd_processor(_args: argparse.Namespace) -> int:
    from kota.logs import setup_logging
    from processing.processor import run_processor
    from processing.settings import ProcessorSettings
    from processing.workers import run_workers, stop_when_orphaned, worker_number

    number = worker_number()
    setup_logging(f"worker {number}" if number else None)
    stack, settings = StackSettings(), ProcessorSettings()
    if settings.workers > 1:
        return run_workers(stack, settings.workers, settings.metrics_enabled)

    async def run(stop: asyncio.Event) -> None:
        watch = asyncio.create_task(stop_when_orphaned(stop)) if number else None
        try:
            await run_processor(stack, settings, stop)
        finally:
            if watch is not None:
                watch.cancel()

    _run_until_signalled(run)
    return 0


def cmd_api(_args: argparse.Namespace) -> int:
    import uvicorn

    from ops_api.main import create_app
    from ops_api.settings import ApiSettings

    _setup_logging()
    stack, settings = StackSettings(), ApiSettings()
    # No permessage-deflate on the live feed: it compresses each client's copy of every frame
    # separately, so 200 clients on one busy city cost 200 compressions of the same bytes.
    serve = {"host": stack.bind_host, "port": stack.api_port, "log_level": "warning", "access_log": False,
             "ws_per_message_deflate": False}
    if settings.workers <= 1:
        uvicorn.run(create_app(stack, settings), **serve)  # type: ignore[arg-type]
        return 0
    # Worker processes count into one set of Prometheus files, so /metrics adds them all up
    # whichever worker answers. Set before the workers start, and emptied: old files are old counts.
    metrics_dir = stack.run_dir / "api-metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    uvicorn.run("ops_api.main:create_app", factory=True, workers=settings.workers, **serve)  # type: ignore[arg-type]
    return 0


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


def _register_behind_gateway(stack: StackSettings, gateway_id: str, city: str, devices: list[Device],
                             device_passwords: dict[str, str] | None = None) -> str:
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
    from simulators.anomalies import Injector, label_entries, plan, write_labels
    from simulators.city import build_city
    from simulators.publisher import run
    from simulators.stream import FORMS, CityStream, device_forms

    _setup_logging()
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
    write_labels(labels, city=city.city, seed=city.seed, start_ms=plan_start, end_ms=plan_end,
                 interval_ms=interval_ms, labels=label_entries(anomalies))

    forms_of = device_forms(city, forms, args.single_devices)
    device_passwords = {d: new_password() for d, form in forms_of.items() if form == "single"}
    gateway_password = _register_behind_gateway(stack, city.gateway_id, city.city, city.devices, device_passwords)
    logins = {city.gateway_id: MqttLogin(stack.mqtt_port, city.gateway_id, gateway_password, host=stack.mqtt_host)}
    logins |= {d: MqttLogin(stack.mqtt_port, d, p, host=stack.mqtt_host) for d, p in device_passwords.items()}
    pace = (f"{args.rate:g} readings/s" if args.rate else "as fast as the broker acknowledges" if start_ms
            else f"every {args.interval:g} s")
    logging.getLogger("kota.simulator").info(
        "city %s: %d devices (%s), %d anomalies planned (labels: %s); publishing %s", city.city,
        len(city.devices), ", ".join(f"{n} {form}" for form, n in Counter(forms_of.values()).items()),
        len(anomalies), labels, pace)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        run(CityStream(city, Injector(anomalies), forms_of), logins=logins, stop=stop, interval_ms=interval_ms,
            start_ms=start_ms, max_ticks=ticks, rate=args.rate, count_log=Path(args.counts) if args.counts else None)
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
    kind, mapping = replay.mapping_for(path, args.format, metric=args.metric,
                                       mapping_file=Path(args.mapping) if args.mapping else None)
    parsed = replay.parse(path, mapping, since_ms=_parse_time(args.since) if args.since else None,
                          until_ms=_parse_time(args.until) if args.until else None)
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
            "(KOTA_GATEWAY_MAX_AGE_MS), so some would be refused. Replay part of it with --since/--until.")
    gateway_id = f"{args.city}-replay-gateway"
    devices = replay.devices_for(parsed, mapping, args.city, gateway_id)
    password = _register_behind_gateway(stack, gateway_id, args.city, list(devices.values()))
    skipped = sum(parsed.skipped.values())
    times = f"shifted by {shift / 86_400_000:.2f} days" if shift else "as recorded"
    print(f"{path.name} ({kind}): {len(parsed.rows)} rows, {parsed.readings} readings from {len(devices)} device(s) "
          f"to city {args.city}; {skipped} empty or invalid values and {sum(parsed.bad_rows.values())} unreadable "
          f"rows left out; times {times}")
    if kind == "nab":
        windows = path.parent.parent / "combined_windows.json"
        labels_path = Path(args.labels or stack.state_dir / f"replay-{args.city}-labels.json")
        [device] = devices.values()
        metric = next(iter(device.metrics))
        labels = [x for x in (replay.nab_labels(path, windows, device, metric, shift) if windows.exists() else [])
                  if x["end_ms"] >= first + shift and x["start_ms"] <= last + shift]  # the replayed part's
        write_labels(labels_path, city=args.city, seed=None, start_ms=first + shift, end_ms=last + shift + 1,
                     interval_ms=None, labels=labels)
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
    print(f"sent {sent.readings} readings in {sent.messages} messages, {sent.acknowledged_readings} acknowledged by "
          f"the broker, in {time.monotonic() - began:.1f} s")
    for reason, count in sorted((parsed.skipped + parsed.bad_rows).items()):
        print(f"  left out: {count} {reason}")
    if args.counts:
        Path(args.counts).write_text(json.dumps({"rows": len(parsed.rows), "readings": sent.readings,
                                                 "acknowledged_readings": sent.acknowledged_readings,
                                                 "skipped": dict(parsed.skipped), "bad_rows": dict(parsed.bad_rows)}))
    return 0 if sent.acknowledged_readings == parsed.readings else 1


def cmd_score(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simulators import scorecard
    from simulators.anomalies import read_labels

    stack = StackSettings()
    labels_path = Path(args.labels or stack.state_dir / f"simulator-{args.city}-labels.json")
    if not labels_path.exists():
        raise SystemExit(f"no labels file at {labels_path}: run `kota simulate` (or `kota replay`) first, or "
                         "pass --labels")
    document = read_labels(labels_path)
    card = scorecard.load(stack.postgres_dsn, document)
    text = scorecard.report(card)
    out = Path(args.out or stack.state_dir / "scorecards")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{document['city']}-scorecard.txt").write_text(text)
    print(text, end="")
    labels = document["labels"]
    device = args.device or next((x["device_id"] for x in labels if x["kind"] == "flood_wave"),
                                 labels[0]["device_id"] if labels else None)
    if device:
        png = out / f"{device}.png"
        scorecard.picture(stack.postgres_dsn, document, device, png)
        print(f"report: {out / (document['city'] + '-scorecard.txt')}\npicture of {device}: {png}")
    return 0


# -- registry ----------------------------------------------------------------------------------
def cmd_devices(args: argparse.Namespace) -> int:
    from pathlib import Path

    import psycopg

    from deploy import mqtt_access, pki
    from kota import accounts
    from kota.contract import device_telemetry_topic, gateway_telemetry_topic
    from kota.registry import (
        Gateway,
        load_devices,
        load_gateways,
        new_device,
        new_password,
        set_enabled,
        set_mqtt_password,
        set_rate_limit,
        upsert_devices,
        upsert_gateway,
    )

    stack = StackSettings()
    if args.action == "cert":
        try:
            pair = pki.issue_device_certificate(stack, args.device_id, Path(args.out))
        except ValueError as exc:
            _say(f"error: {exc}")
            return 1
        ca = pki.ensure_ca(stack)
        _say(f"certificate {pair.cert}, key {pair.key} (CN={args.device_id}); CA certificate {ca.cert}")
        _say(f"connect with TLS to port {stack.mqtt_mtls_port}: the certificate is the device's identity")
        return 0
    with psycopg.connect(stack.postgres_dsn) as conn:
        if args.action in ("add", "add-gateway"):
            password = args.password or new_password()
            try:
                if args.action == "add":
                    device = new_device(args.device_id, args.city, args.type, district=args.district, lat=args.lat,
                                        lon=args.lon, gateway_id=args.gateway)
                    upsert_devices(conn, [device], {device.device_id: password})
                    topic = device_telemetry_topic(device.city, device.domain, device.device_id)
                    accounts.record(conn, _cli_actor(), "device.created", "device", device.device_id, device.city,
                                    {"device_type": device.device_type, "district": device.district})
                    _say(f"device {device.device_id} ({device.device_type}) registered in {device.city}/"
                         f"{device.domain}; metrics: {', '.join(device.metrics)}")
                else:
                    upsert_gateway(conn, Gateway(args.device_id, args.city), password)
                    topic = gateway_telemetry_topic(args.city, args.device_id)
                    _say(f"gateway {args.device_id} registered in {args.city}")
            except (ValueError, psycopg.errors.ForeignKeyViolation, psycopg.errors.UniqueViolation) as exc:
                _say(f"error: {str(exc).splitlines()[0]}")
                return 1
            _say(f"MQTT username {args.device_id}  password {password}  (shown once; only its hash is kept)")
            _say(f"publish to {topic} on port {stack.mqtt_port} (TLS: {stack.mqtt_tls_port})")
        elif args.action == "list":
            for d in load_devices(conn, args.city).values():
                state = "enabled" if d.enabled else "DISABLED"
                via = f"via {d.gateway_id}" if d.gateway_id else ""
                print(f"{d.device_id:<36} {d.city:<12} {d.domain:<12} {d.device_type:<18} {state:<9} {via}")
            for g in load_gateways(conn).values():
                if args.city in (None, g.city):
                    print(f"{g.gateway_id:<36} {g.city:<12} {'gateway':<12} {'gateway':<18} "
                          f"{'enabled' if g.enabled else 'DISABLED'}")
        elif args.action == "password":
            password = args.password or new_password()
            if not set_mqtt_password(conn, args.device_id, password):
                _say(f"error: no device or gateway {args.device_id!r}")
                return 1
            accounts.record(conn, _cli_actor(), "device.password_changed", "device", args.device_id, None, {})
            _say(f"MQTT username {args.device_id}  new password {password}  (shown once; the old one no longer "
                 "works once the broker has reloaded, which this command waits for)")
        elif args.action == "rate":
            per_s = None if args.per_s == "default" else float(args.per_s)
            try:
                found = set_rate_limit(conn, args.device_id, per_s)
            except ValueError as exc:
                _say(f"error: {exc}")
                return 1
            if not found:
                _say(f"error: no device or gateway {args.device_id!r}")
                return 1
            accounts.record(conn, _cli_actor(), "device.changed", "device", args.device_id, None,
                            {"rate_limit_per_s": per_s})
            shown = "the gateway's default" if per_s is None else "no limit" if per_s == 0 else f"{per_s:g} messages/s"
            _say(f"{args.device_id}: rate limit {shown} (the gateways read it within 10 s)")
        else:
            if not set_enabled(conn, args.device_id, args.action == "enable"):
                _say(f"error: no device or gateway {args.device_id!r}")
                return 1
            accounts.record(conn, _cli_actor(), "device.changed", "device", args.device_id, None,
                            {"enabled": args.action == "enable"})
            _say(f"{args.device_id} {args.action}d")
    mqtt_access.sync(stack)
    return 0


def _cli_actor() -> str:
    """Who the audit log names for a command-line change: the machine account that ran it."""
    import getpass

    return f"cli:{getpass.getuser()}"


def cmd_users(args: argparse.Namespace) -> int:
    import psycopg

    from kota import accounts

    stack = StackSettings()
    with psycopg.connect(stack.postgres_dsn) as conn:
        try:
            if args.action == "add":
                user = accounts.User(args.user_id, args.role, tuple(args.city or ()), args.name)
                accounts.upsert_user(conn, user, actor=_cli_actor())
                scope = "every city" if user.role == "admin" else ", ".join(user.cities)
                _say(f"user {user.user_id} saved: {user.role} for {scope}")
                if not args.no_token:
                    token = accounts.issue_token(conn, user.user_id, label="created with the user", actor=_cli_actor(),
                                                 lifetime=args.expires)
                    _say(f"API token (shown once; only its hash is kept; {_expiry(conn, token)}): {token}")
            elif args.action == "token":
                token = accounts.issue_token(conn, args.user_id, label=args.label, actor=_cli_actor(),
                                             lifetime=args.expires)
                _say(f"API token for {args.user_id} (shown once; only its hash is kept; {_expiry(conn, token)}): "
                     f"{token}")
            elif args.action == "revoke":
                _say(f"{accounts.revoke_tokens(conn, args.user_id, actor=_cli_actor())} token(s) revoked")
            else:
                for user, tokens in accounts.list_users(conn):
                    scope = "*" if user.role == "admin" else ",".join(user.cities)
                    expiry = "-" if not tokens.live else \
                        f"{tokens.next_expiry:%Y-%m-%d %H:%M %Z}" if tokens.next_expiry else "never"
                    print(f"{user.user_id:<24} {user.role:<11} {tokens.live:>2} token(s)  expires {expiry:<20}  "
                          f"{scope}")
        except (ValueError, LookupError) as exc:
            _say(f"error: {exc}")
            return 1
    return 0


def _token_lifetime(text: str) -> dt.timedelta | None:
    """`--expires`: days (a positive number), or `never`; `default` is accounts.DEFAULT_TOKEN_LIFETIME."""
    import datetime as dt

    from kota.accounts import DEFAULT_TOKEN_LIFETIME

    if text == "default":
        return DEFAULT_TOKEN_LIFETIME
    if text.strip().lower() == "never":
        return None
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of days, or never") from None
    if not 0 < days <= 36_500:
        raise argparse.ArgumentTypeError(f"{text!r}: more than 0 days and at most 36500, or never")
    return dt.timedelta(days=days)


def _expiry(conn: Any, token: str) -> str:
    from kota import accounts

    expires_at = accounts.token_expiry(conn, token)
    return f"expires {expires_at:%Y-%m-%d %H:%M %Z}" if expires_at else "never expires"


def ensure_demo_operator(stack: StackSettings, city: str) -> str:
    """The local stack's demo operator for the simulated city, and a token for it (kept in the state
    folder, so `kota up` prints the same one each time until it is revoked)."""
    import psycopg

    from kota import accounts

    token_file = stack.state_dir / "demo-operator.token"
    with psycopg.connect(stack.postgres_dsn) as conn:
        known = accounts.get_user(conn, "demo-operator")
        if known is None or city not in known.cities:  # keep the cities of earlier runs, add this one
            cities = tuple(sorted({city, *(known.cities if known else ())}))
            accounts.upsert_user(conn, accounts.User("demo-operator", "operator", cities, "Demo operator"),
                                 actor="kota-up")
        if token_file.exists() and accounts.token_is_live(conn, token := token_file.read_text().strip()):
            return token
        token = accounts.issue_token(conn, "demo-operator", label="kota up", actor="kota-up")
    token_file.write_text(token)
    token_file.chmod(0o600)
    return token


def cmd_broker_guard(_args: argparse.Namespace) -> int:
    from deploy import mqtt_access

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    mqtt_access.guard_ingest(StackSettings(), stop=stop)
    return 0


def cmd_rotate_ingest_password(_args: argparse.Namespace) -> int:
    from deploy import mqtt_access

    try:
        mqtt_access.rotate_ingest_password(StackSettings(), _say)
    except TimeoutError as exc:
        _say(str(exc))
        return 1
    return 0


def cmd_broker_access(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deploy import mqtt_access
    from ingest.settings import GatewaySettings

    secret = GatewaySettings().mqtt_password
    if secret is None:
        _say("broker-access needs KOTA_GATEWAY_MQTT_PASSWORD: the password the gateways log in with")
        return 2
    mqtt_access.serve_broker_access(StackSettings(), Path(args.folder), Path(args.broker_pid_file),
                                    ingest_secret=secret.get_secret_value(),
                                    every_s=args.every, once=args.once)
    return 0


def cmd_deadletters(args: argparse.Namespace) -> int:
    from ingest.deadletters import read_dead_letters
    from kota.contract import escaped

    stack = StackSettings()

    def show(letter: dict[str, Any]) -> None:
        # Everything here came from a device: escaped, so it cannot forge lines or drive the terminal.
        topic = escaped(str(letter["topic"]), 200)
        for rejection in letter["rejections"]:
            print(f"{escaped(str(rejection['reason']), 40):<20} {topic}  {escaped(str(rejection['message']))}",
                  flush=True)
        more = int(letter["rejections_total"]) - len(letter["rejections"])
        if more > 0:
            counts = ", ".join(f"{escaped(str(reason), 40)} {n}" for reason, n in letter["reasons"].items())
            print(f"{'':<20} {topic}  ... and {more} more rejection(s) in this message ({counts})", flush=True)

    since_ms = int((time.time() - args.since) * 1000)
    seen = asyncio.run(read_dead_letters(stack.kafka_client_options(), device=args.device, since_ms=since_ms,
                                         wait_for=args.wait_for, follow=args.follow, timeout_s=args.timeout,
                                         show=show))
    if args.wait_for and not seen:
        _say(f"no {args.wait_for} rejection within {args.timeout:.0f} s")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kota.registry import DEVICE_TYPES

    parser = argparse.ArgumentParser(prog="kota", description="kotacerdas: smart-city sensor platform")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="install what is missing, start the stack and a simulated city")
    up.add_argument("--devices", type=int, default=36, help="simulated devices (default 36)")
    up.add_argument("--interval", type=float, default=5.0, help="seconds between readings (default 5)")
    up.add_argument("--city", default="bandung", help="simulated city id (default bandung)")
    up.add_argument("--no-simulator", action="store_true", help="start the platform without a simulated city")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop everything; stored data stays")
    down.add_argument("--keep-services", action="store_true", help="stop only the project's processes")
    down.set_defaults(func=cmd_down)

    sub.add_parser("install", help="install missing system packages and the Kafka broker, start nothing"
                   ).set_defaults(func=cmd_install)
    sub.add_parser("status", help="show each service and project process").set_defaults(func=cmd_status)
    mig = sub.add_parser("migrate", help="apply database migrations")
    mig.add_argument("--kafka-topics", action="store_true",
                     help="also create the Kafka topics (`kota up` does; a deployment's init job asks for it)")
    mig.set_defaults(func=cmd_migrate)
    gwp = sub.add_parser("gateway", help="run the MQTT → Kafka gateway in the foreground")
    gwp.add_argument("--drain", metavar="CLIENT_ID",
                     help="after scaling gateways down: forward what the departed gateway CLIENT_ID's broker session "
                          "still holds, take it out of the shared subscription, and exit")
    gwp.set_defaults(func=cmd_gateway)
    sub.add_parser("processor", help="run the stream processor in the foreground").set_defaults(func=cmd_processor)
    sub.add_parser("api", help="run the ops API and page in the foreground").set_defaults(func=cmd_api)

    sim = sub.add_parser("simulate", help="run a simulated city publishing over MQTT")
    sim.add_argument("--devices", type=int, default=36)
    sim.add_argument("--interval", type=float, default=5.0, help="seconds between readings")
    sim.add_argument("--city", default="bandung")
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--ticks", type=int, default=None, help="stop after this many rounds")
    sim.add_argument("--start", help="simulate from this time (ISO, local WIB without a zone, or today/yesterday) "
                                     "instead of the clock; sends as fast as the broker takes it unless --rate")
    sim.add_argument("--hours", type=float, default=None,
                     help="simulated span (default: 24 with --start; without --start it runs until stopped)")
    sim.add_argument("--rate", type=float, default=None, help="at most this many readings per second")
    sim.add_argument("--forms", default="batch,senml,single",
                     help="message forms the devices use, round-robin: batch (gateway JSON), senml (gateway "
                          "SenML), single (the device's own topic and login)")
    sim.add_argument("--single-devices", type=int, default=12,
                     help="at most this many devices publish for themselves (one MQTT connection each)")
    sim.add_argument("--anomalies-per-day", type=int, default=None,
                     help="single-sensor anomalies per simulated day (default: one per six devices, at least 6)")
    sim.add_argument("--labels", help="where to write the ground truth (default: STATE_DIR/simulator-CITY-labels.json)")
    sim.add_argument("--counts", help="write what was sent and acknowledged here (JSON) when the run ends")
    sim.set_defaults(func=cmd_simulate)

    rp = sub.add_parser("replay", help="replay a recorded file through MQTT as its devices (NAB, Beijing air "
                                       "quality, Jakarta ISPU, or any CSV with a mapping)")
    rp.add_argument("file")
    rp.add_argument("--format", default="auto", choices=["auto", "nab", "beijing", "jakarta", "csv"])
    rp.add_argument("--mapping", help="JSON mapping of a CSV's columns to devices and metrics "
                                      "(docs/testing_streams.md)")
    rp.add_argument("--metric", help="the metric a NAB file's value is (default from its name: speed, occupancy, "
                                     "TravelTime)")
    rp.add_argument("--city", default="replay", help="city the replayed devices belong to")
    rp.add_argument("--speed", type=float, default=None,
                    help="1 = real time, 60 = a minute a second; default: as fast as the broker takes it")
    rp.add_argument("--times", choices=["shift", "original"], default="shift",
                    help="shift: the last row lands now, spacing kept (default); original: as recorded")
    rp.add_argument("--since", help="only rows at or after this time (ISO; WIB when no zone)")
    rp.add_argument("--until", help="only rows before this time")
    rp.add_argument("--labels", help="where a NAB replay writes its shifted windows "
                                     "(default: STATE_DIR/replay-CITY-labels.json)")
    rp.add_argument("--counts", help="write rows, readings sent and acknowledged here (JSON)")
    rp.set_defaults(func=cmd_replay)

    sc = sub.add_parser("score", help="compare what the platform detected with a labels file: precision, recall, "
                                      "F1, NAB score, time to detect and to alert per anomaly kind")
    sc.add_argument("--city", default="bandung", help="whose simulator labels to read (default file)")
    sc.add_argument("--labels", help="labels file (default: STATE_DIR/simulator-CITY-labels.json)")
    sc.add_argument("--out", help="folder for the report and picture (default: STATE_DIR/scorecards)")
    sc.add_argument("--device", help="draw this device (default: the first flood-wave gate)")
    sc.set_defaults(func=cmd_score)

    ba = sub.add_parser("broker-access", help="keep a remote broker's password and ACL files in step with the "
                        "registry (a sidecar in deploy/compose and deploy/k8s; `kota up` does this itself)")
    ba.add_argument("--folder", required=True, help="where the broker reads passwd and acl")
    ba.add_argument("--broker-pid-file", required=True, help="the broker's pid_file, signalled after each change")
    ba.add_argument("--every", type=float, default=5.0, help="seconds between registry checks")
    ba.add_argument("--once", action="store_true", help="write the files once and exit")
    ba.set_defaults(func=cmd_broker_access)

    bg = sub.add_parser("broker-guard", help="lock devices out of the local broker whenever no ingest gateway "
                        "session is subscribed (`kota up` runs it beside Mosquitto)")
    bg.set_defaults(func=cmd_broker_guard)

    rip = sub.add_parser("rotate-ingest-password", help="give the local ingest gateways a new broker password: "
                         "devices are locked out, the gateway restarted with it, then devices let in again")
    rip.set_defaults(func=cmd_rotate_ingest_password)

    dl = sub.add_parser("deadletters", help="show rejected input with its reason (the dead-letter topic)")
    dl.add_argument("--device", help="only rejections naming this device or gateway")
    dl.add_argument("--since", type=float, default=3600, help="seconds back to look (default 3600)")
    dl.add_argument("--follow", action="store_true", help="keep showing new rejections")
    dl.add_argument("--wait-for", metavar="REASON", help="wait until a rejection with this reason appears")
    dl.add_argument("--timeout", type=float, default=30, help="seconds to wait with --wait-for (default 30)")
    dl.set_defaults(func=cmd_deadletters)

    dev = sub.add_parser("devices", help="manage the device registry")
    dev_sub = dev.add_subparsers(dest="action", required=True)
    add = dev_sub.add_parser("add", help="register a device and print its MQTT password")
    add.add_argument("device_id")
    add.add_argument("--city", required=True)
    add.add_argument("--type", required=True, choices=sorted(DEVICE_TYPES))
    add.add_argument("--gateway", help="gateway allowed to publish for this device")
    add.add_argument("--password", help="MQTT password (default: a random one, printed once)")
    add.add_argument("--district")
    add.add_argument("--lat", type=float)
    add.add_argument("--lon", type=float)
    gw = dev_sub.add_parser("add-gateway", help="register a gateway device and print its MQTT password")
    gw.add_argument("device_id", metavar="gateway_id")
    gw.add_argument("--city", required=True)
    gw.add_argument("--password", help="MQTT password (default: a random one, printed once)")
    cert = dev_sub.add_parser("cert", help="issue a client certificate (CN = device id) from the local CA")
    cert.add_argument("device_id")
    cert.add_argument("--out", required=True, help="folder for <device>.crt and <device>.key")
    lst = dev_sub.add_parser("list", help="list devices")
    lst.add_argument("--city")
    for action in ("disable", "enable"):
        p = dev_sub.add_parser(action, help=f"{action} a device")
        p.add_argument("device_id")
    pw = dev_sub.add_parser("password", help="give a device or gateway a new MQTT password (printed once)")
    pw.add_argument("device_id")
    pw.add_argument("--password", help="the new password (default: a random one)")
    rate = dev_sub.add_parser("rate", help="a device's or gateway's own message rate limit")
    rate.add_argument("device_id")
    rate.add_argument("per_s", help="messages per second, 0 for no limit, or 'default'")
    dev.set_defaults(func=cmd_devices)

    users = sub.add_parser("users", help="ops accounts and API tokens")
    users_sub = users.add_subparsers(dest="action", required=True)
    uadd = users_sub.add_parser("add", help="create or update an account and print a token for it")
    uadd.add_argument("user_id")
    uadd.add_argument("--role", required=True, choices=["operator", "integrator", "admin"])
    uadd.add_argument("--city", action="append", help="a city in scope (repeat for a province user)")
    uadd.add_argument("--name", help="display name")
    uadd.add_argument("--no-token", action="store_true", help="do not issue a token now")
    utok = users_sub.add_parser("token", help="issue another API token for an account")
    utok.add_argument("user_id")
    utok.add_argument("--label", help="what the token is for")
    for p in (uadd, utok):
        p.add_argument("--expires", type=_token_lifetime, default="default", metavar="DAYS|never",
                       help="the token works for this many days, or until revoked (never); default 90")
    urev = users_sub.add_parser("revoke", help="revoke every token of an account")
    urev.add_argument("user_id")
    users_sub.add_parser("list", help="list accounts")
    users.set_defaults(func=cmd_users)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
