"""Commands to devices: `kota commander` (the dispatcher) and `kota commands send|list|approve`
(through the ops API, as the operator whose token is given: the API checks role and city)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from cli.common import setup_logging
from kota.settings import StackSettings


def cmd_commander(_args: argparse.Namespace) -> int:
    import signal
    import threading

    from pydantic import SecretStr

    from commander.dispatcher import run_commander
    from commander.settings import CommanderSettings
    from deploy.folders import mosquitto_dir
    from deploy.mqtt_access import COMMANDER_CREDENTIAL_FILE

    setup_logging()
    stack, settings = StackSettings(), CommanderSettings()
    local_secret = mosquitto_dir(stack) / COMMANDER_CREDENTIAL_FILE
    if settings.mqtt_password is None and local_secret.exists():  # run by hand beside `kota up`
        settings = settings.model_copy(update={"mqtt_password": SecretStr(local_secret.read_text().strip())})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_commander(stack, settings, stop)
    return 0


def _api(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    import httpx

    token = args.token or os.environ.get("KOTA_API_TOKEN")
    if not token:
        raise SystemExit("give an API token: --token, or KOTA_API_TOKEN (`kota users token NAME`)")
    url = args.api_url or StackSettings().api_url
    answer = httpx.request(method, f"{url}{path}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    if answer.status_code >= 400:
        detail = (
            answer.json().get("detail")
            if answer.headers.get("content-type", "").startswith("application/json")
            else answer.text
        )
        print(f"refused ({answer.status_code}): {json.dumps(detail)}", file=sys.stderr)
        raise SystemExit(1)
    return answer.json()


def _line(c: dict[str, Any]) -> str:
    params = json.dumps(c["params"], separators=(",", ":")) if c["params"] else ""
    who = c["requested_by"] + (f", approved by {c['approved_by']}" if c["approved_by"] else "")
    outcome = json.dumps(c["result"]) if c["result"] else c["error"] or ""
    return f"{c['command_id']}  {c['created_at'][:19]}  {c['command']}{params}  {c['status']}  ({who})  {outcome}"


def cmd_send(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    for pair in args.param:
        name, _, value = pair.partition("=")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    body: dict[str, Any] = {"command": args.name, "params": params}
    if args.ttl:
        body["ttl_s"] = args.ttl
    made = _api(args, "POST", f"/api/v1/devices/{args.device}/commands", body)
    print(_line(made))
    if made["status"] == "awaiting_approval":
        print(f"critical: another operator approves it with `kota commands approve {args.device} {made['command_id']}`")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    listing = _api(args, "GET", f"/api/v1/devices/{args.device}/commands?limit={args.limit}")
    print("obeys: " + ", ".join(s["command"] + (" (critical)" if s["critical"] else "") for s in listing["catalogue"]))
    for c in listing["commands"]:
        print(_line(c))
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    print(_line(_api(args, "POST", f"/api/v1/devices/{args.device}/commands/{args.command_id}/approve")))
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser(
        "commander", help="run the command dispatcher in the foreground (publishes device commands, records replies)"
    ).set_defaults(func=cmd_commander)
    cmds = sub.add_parser("commands", help="send commands to devices and follow them (through the ops API)")
    csub = cmds.add_subparsers(dest="commands_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--token", help="API token (default: KOTA_API_TOKEN)")
        p.add_argument("--api-url", help="default: the local stack's API")
        return p

    send = common(csub.add_parser("send", help="send DEVICE the command NAME [--param k=v ...]"))
    send.add_argument("device")
    send.add_argument("name")
    send.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="e.g. --param level=40")
    send.add_argument("--ttl", type=float, help="seconds before it expires without a result")
    send.set_defaults(func=cmd_send)
    lst = common(csub.add_parser("list", help="a device's commands, newest first, and what it obeys"))
    lst.add_argument("device")
    lst.add_argument("--limit", type=int, default=20)
    lst.set_defaults(func=cmd_list)
    approve = common(csub.add_parser("approve", help="approve a critical command (not your own)"))
    approve.add_argument("device")
    approve.add_argument("command_id")
    approve.set_defaults(func=cmd_approve)
