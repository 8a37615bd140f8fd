"""The broker's access: `kota broker-access` (a sidecar's), `broker-guard`, `rotate-ingest-password`."""

from __future__ import annotations

import argparse
import signal
import threading

from cli.common import say
from kota.settings import StackSettings


def cmd_broker_guard(_args: argparse.Namespace) -> int:
    from deploy import mqtt_access

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    mqtt_access.guard_ingest(StackSettings(), stop=stop)
    return 0


def cmd_rotate_ingest_password(_args: argparse.Namespace) -> int:
    from deploy import components

    try:
        components.rotate_ingest_password(StackSettings(), say)
    except TimeoutError as exc:
        say(str(exc))
        return 1
    return 0


def cmd_broker_access(args: argparse.Namespace) -> int:
    from pathlib import Path

    from commander.settings import CommanderSettings
    from deploy import mqtt_access
    from ingest.settings import GatewaySettings

    secret = GatewaySettings().mqtt_password
    commander_secret = CommanderSettings().mqtt_password
    if secret is None:
        say("broker-access needs KOTA_GATEWAY_MQTT_PASSWORD: the password the gateways log in with")
        return 2
    mqtt_access.serve_broker_access(
        StackSettings(),
        Path(args.folder),
        Path(args.broker_pid_file),
        ingest_secret=secret.get_secret_value(),
        every_s=args.every,
        once=args.once,
        commander_secret=commander_secret.get_secret_value() if commander_secret else None,
    )
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ba = sub.add_parser(
        "broker-access",
        help="keep a remote broker's password and ACL files in step with the "
        "registry (a sidecar in deploy/compose and deploy/k8s; `kota up` does this itself)",
    )
    ba.add_argument("--folder", required=True, help="where the broker reads passwd and acl")
    ba.add_argument("--broker-pid-file", required=True, help="the broker's pid_file, signalled after each change")
    ba.add_argument("--every", type=float, default=5.0, help="seconds between registry checks")
    ba.add_argument("--once", action="store_true", help="write the files once and exit")
    ba.set_defaults(func=cmd_broker_access)

    bg = sub.add_parser(
        "broker-guard",
        help="lock devices out of the local broker whenever no ingest gateway "
        "session is subscribed (`kota up` runs it beside Mosquitto)",
    )
    bg.set_defaults(func=cmd_broker_guard)

    rip = sub.add_parser(
        "rotate-ingest-password",
        help="give the local ingest gateways a new broker password: "
        "devices are locked out, the gateway restarted with it, then devices let in again",
    )
    rip.set_defaults(func=cmd_rotate_ingest_password)
