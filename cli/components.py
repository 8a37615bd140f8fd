"""The platform's components in the foreground: `kota gateway`, `processor`, `api`, `notifier`."""

from __future__ import annotations

import argparse
import os
import shutil
from typing import TYPE_CHECKING

from cli.common import setup_logging
from kota.process import run_until_signalled
from kota.settings import StackSettings

if TYPE_CHECKING:
    from fastapi import FastAPI


def cmd_gateway(args: argparse.Namespace) -> int:
    from pydantic import SecretStr

    from deploy.folders import mosquitto_dir
    from deploy.mqtt_access import existing_ingest_password
    from ingest.gateway import run_gateway
    from ingest.settings import GatewaySettings

    setup_logging()
    stack, settings = StackSettings(), GatewaySettings()
    if settings.mqtt_password is None and (secret := existing_ingest_password(mosquitto_dir(stack))):
        settings = settings.model_copy(update={"mqtt_password": SecretStr(secret)})  # run by hand beside `kota up`
    if args.drain:
        # A gateway scaled away for good: the broker may still hold (and keep routing to) its
        # persistent session's share of the subscription. Forward that, unsubscribe, exit.
        settings = settings.model_copy(update={"client_id": args.drain, "metrics_enabled": False})
    run_until_signalled(lambda stop: run_gateway(stack, settings, stop, drain=bool(args.drain)))
    return 0


def cmd_processor(_args: argparse.Namespace) -> int:
    from processing import workers

    return workers.main()


def api_app() -> FastAPI:
    """The ops API as `kota api` serves it: a registry change made through it reaches the local
    broker at once. Under compose and k8s no broker runs beside the API (no pid file in its state
    folder), so the hook does nothing: the broker-access sidecar keeps that broker in step."""
    from deploy import mqtt_access, procs
    from ops_api.main import create_app

    stack = StackSettings()

    def sync_local_broker() -> None:
        if procs.running_pid(stack, "mosquitto") is not None:
            mqtt_access.sync(stack)

    return create_app(stack, on_registry_change=sync_local_broker)


def cmd_api(_args: argparse.Namespace) -> int:
    import uvicorn

    from ops_api.settings import ApiSettings

    setup_logging()
    stack, settings = StackSettings(), ApiSettings()
    # No permessage-deflate on the live feed: it compresses each client's copy of every frame
    # separately, so 200 clients on one busy city cost 200 compressions of the same bytes.
    serve = {
        "host": stack.bind_host,
        "port": stack.api_port,
        "log_level": "warning",
        "access_log": False,
        "ws_per_message_deflate": False,
    }
    if settings.workers <= 1:
        uvicorn.run(api_app(), **serve)  # type: ignore[arg-type]
        return 0
    # Worker processes count into one set of Prometheus files, so /metrics adds them all up
    # whichever worker answers. Set before the workers start, and emptied: old files are old counts.
    metrics_dir = stack.run_dir / "api-metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    uvicorn.run("cli.components:api_app", factory=True, workers=settings.workers, **serve)  # type: ignore[arg-type]
    return 0


def cmd_notifier(_args: argparse.Namespace) -> int:
    from notifier.delivery import run_notifier
    from notifier.settings import NotifierSettings

    setup_logging()
    stack, settings = StackSettings(), NotifierSettings()
    run_until_signalled(lambda stop: run_notifier(stack, settings, stop))
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gwp = sub.add_parser("gateway", help="run the MQTT → Kafka gateway in the foreground")
    gwp.add_argument(
        "--drain",
        metavar="CLIENT_ID",
        help="after scaling gateways down: forward what the departed gateway CLIENT_ID's broker session "
        "still holds, take it out of the shared subscription, and exit",
    )
    gwp.set_defaults(func=cmd_gateway)
    sub.add_parser("processor", help="run the stream processor in the foreground").set_defaults(func=cmd_processor)
    sub.add_parser("api", help="run the ops API and page in the foreground").set_defaults(func=cmd_api)
    sub.add_parser(
        "notifier", help="deliver alert notifications (webhook, email, Telegram) in the foreground"
    ).set_defaults(func=cmd_notifier)
