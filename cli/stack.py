"""The whole local stack: `kota up`, `down`, `status`, `install`, `migrate`."""

from __future__ import annotations

import argparse
import asyncio
import time

from cli.common import say
from kota.settings import StackSettings


def cmd_up(args: argparse.Namespace) -> int:
    from deploy import components, folders, mosquitto, mqtt_access, procs
    from deploy.stack import start_services
    from kota.schema import migrate

    settings = StackSettings()
    started = time.monotonic()
    say(f"state folder {settings.state_dir}")
    try:
        start_services(settings, say, open_devices=False)
        backend, applied = migrate(settings.postgres_dsn)
        say(f"database schema up to date ({backend}{', applied ' + str(applied) if applied else ''})")
        mqtt_access.sync(settings)
        if mqtt_access.ingest_held(folders.mosquitto_dir(settings)):  # ingest.secret replaced by hand
            components.restart_gateway_and_accept(settings, say)
        for name in ("gateway", "processor", "api", "notifier", "commander"):
            components.start_component(settings, name)
        mosquitto.open_devices_when_ingest_subscribed(settings, say)
        if not args.no_simulator:
            components.start_component(
                settings,
                "simulate",
                "--devices",
                str(args.devices),
                "--interval",
                str(args.interval),
                "--city",
                args.city,
                instance="simulator",
            )
        procs.wait_until(lambda: components.api_healthy(settings), "api", settings, timeout_s=60)
        token = ensure_demo_operator(settings, args.city)
    except procs.StackError as exc:
        say(f"error: {exc}")
        return 1
    say(f"up in {time.monotonic() - started:.0f} s")
    say(f"API           {settings.api_url}/api/v1/devices   (OpenAPI: {settings.api_url}/docs)")
    say(f"command page  {settings.api_url}/#token={token}")
    say(f"demo operator token (city {args.city}): {token}")
    say(f"health        {settings.api_url}/health")
    say(f"logs          {settings.logs_dir}")
    return 0


def cmd_install(_args: argparse.Namespace) -> int:
    from deploy import install, procs

    try:
        install.install_missing(StackSettings(), say)
    except procs.StackError as exc:
        say(f"error: {exc}")
        return 1
    say("system packages and Kafka libraries present")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from deploy import procs
    from deploy.stack import stop_services

    settings = StackSettings()
    for name in sorted(p.stem for p in settings.run_dir.glob("*.pid")):
        if name not in ("mosquitto", "kafka") and procs.stop(settings, name):
            say(f"{name} stopped")
    if not args.keep_services:
        stop_services(settings, say)
    say(f"down; data kept in {settings.state_dir}")
    return 0


def cmd_status(_args: argparse.Namespace) -> int:
    from deploy.stack import status_rows

    settings = StackSettings()
    rows = status_rows(settings)
    width = max(len(name) for name, _, _ in rows)
    for name, state, where in rows:
        print(f"{name:<{width}}  {state:<32}  {where}")
    return 0 if all(state.startswith("running") for name, state, _ in rows[:3]) else 1


def cmd_migrate(args: argparse.Namespace) -> int:
    from kota.schema import migrate

    stack = StackSettings()
    backend, applied = migrate(stack.postgres_dsn)
    say(f"schema up to date on {backend}; applied now: {applied or 'nothing'}")
    if args.kafka_topics:
        from deploy.kafka import create_topics

        asyncio.run(create_topics(stack))
        say(f"kafka topics present on {stack.kafka_bootstrap} ({stack.kafka_partitions} readings partitions)")
    return 0


def ensure_demo_operator(stack: StackSettings, city: str) -> str:
    """The local stack's demo operator for the simulated city, and a token for it (kept in the state
    folder, so `kota up` prints the same one each time until it is revoked)."""
    import psycopg

    from ops_api import accounts

    token_file = stack.state_dir / "demo-operator.token"
    with psycopg.connect(stack.postgres_dsn) as conn:
        known = accounts.get_user(conn, "demo-operator")
        if known is None or city not in known.cities:  # keep the cities of earlier runs, add this one
            cities = tuple(sorted({city, *(known.cities if known else ())}))
            accounts.upsert_user(
                conn, accounts.User("demo-operator", "operator", cities, "Demo operator"), actor="kota-up"
            )
        if token_file.exists() and accounts.token_is_live(conn, token := token_file.read_text().strip()):
            return token
        token = accounts.issue_token(conn, "demo-operator", label="kota up", actor="kota-up")
    token_file.write_text(token)
    token_file.chmod(0o600)
    return token


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser("up", help="install what is missing, start the stack and a simulated city")
    up.add_argument("--devices", type=int, default=36, help="simulated devices (default 36)")
    up.add_argument("--interval", type=float, default=5.0, help="seconds between readings (default 5)")
    up.add_argument("--city", default="bandung", help="simulated city id (default bandung)")
    up.add_argument("--no-simulator", action="store_true", help="start the platform without a simulated city")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop everything; stored data stays")
    down.add_argument("--keep-services", action="store_true", help="stop only the project's processes")
    down.set_defaults(func=cmd_down)

    sub.add_parser("install", help="install missing system packages and the Kafka broker, start nothing").set_defaults(
        func=cmd_install
    )
    sub.add_parser("status", help="show each service and project process").set_defaults(func=cmd_status)
    mig = sub.add_parser("migrate", help="apply database migrations")
    mig.add_argument(
        "--kafka-topics",
        action="store_true",
        help="also create the Kafka topics (`kota up` does; a deployment's init job asks for it)",
    )
    mig.set_defaults(func=cmd_migrate)
