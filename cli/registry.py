"""Who may send and who may read: `kota devices` (the device registry) and `kota users` (ops accounts)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from cli.common import say
from kota.settings import StackSettings

if TYPE_CHECKING:
    import datetime as dt


def cmd_devices(args: argparse.Namespace) -> int:
    from pathlib import Path

    import psycopg

    from deploy import mqtt_access, pki
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
    from ops_api import accounts

    stack = StackSettings()
    if args.action == "cert":
        try:
            pair = pki.issue_device_certificate(stack, args.device_id, Path(args.out))
        except ValueError as exc:
            say(f"error: {exc}")
            return 1
        ca = pki.ensure_ca(stack)
        say(f"certificate {pair.cert}, key {pair.key} (CN={args.device_id}); CA certificate {ca.cert}")
        say(f"connect with TLS to port {stack.mqtt_mtls_port}: the certificate is the device's identity")
        return 0
    with psycopg.connect(stack.postgres_dsn) as conn:
        if args.action in ("add", "add-gateway"):
            password = args.password or new_password()
            try:
                if args.action == "add":
                    device = new_device(
                        args.device_id,
                        args.city,
                        args.type,
                        district=args.district,
                        lat=args.lat,
                        lon=args.lon,
                        gateway_id=args.gateway,
                    )
                    upsert_devices(conn, [device], {device.device_id: password})
                    topic = device_telemetry_topic(device.city, device.domain, device.device_id)
                    accounts.record(
                        conn,
                        _cli_actor(),
                        "device.created",
                        "device",
                        device.device_id,
                        device.city,
                        {"device_type": device.device_type, "district": device.district},
                    )
                    say(
                        f"device {device.device_id} ({device.device_type}) registered in {device.city}/"
                        f"{device.domain}; metrics: {', '.join(device.metrics)}"
                    )
                else:
                    upsert_gateway(conn, Gateway(args.device_id, args.city), password)
                    topic = gateway_telemetry_topic(args.city, args.device_id)
                    say(f"gateway {args.device_id} registered in {args.city}")
            except (ValueError, psycopg.errors.ForeignKeyViolation, psycopg.errors.UniqueViolation) as exc:
                say(f"error: {str(exc).splitlines()[0]}")
                return 1
            say(f"MQTT username {args.device_id}  password {password}  (shown once; only its hash is kept)")
            say(f"publish to {topic} on port {stack.mqtt_port} (TLS: {stack.mqtt_tls_port})")
        elif args.action == "list":
            for d in load_devices(conn, args.city).values():
                state = "enabled" if d.enabled else "DISABLED"
                via = f"via {d.gateway_id}" if d.gateway_id else ""
                print(f"{d.device_id:<36} {d.city:<12} {d.domain:<12} {d.device_type:<18} {state:<9} {via}")
            for g in load_gateways(conn).values():
                if args.city in (None, g.city):
                    print(
                        f"{g.gateway_id:<36} {g.city:<12} {'gateway':<12} {'gateway':<18} "
                        f"{'enabled' if g.enabled else 'DISABLED'}"
                    )
        elif args.action == "password":
            password = args.password or new_password()
            if not set_mqtt_password(conn, args.device_id, password):
                say(f"error: no device or gateway {args.device_id!r}")
                return 1
            accounts.record(conn, _cli_actor(), "device.password_changed", "device", args.device_id, None, {})
            say(
                f"MQTT username {args.device_id}  new password {password}  (shown once; the old one no longer "
                "works once the broker has reloaded, which this command waits for)"
            )
        elif args.action == "rate":
            per_s = None if args.per_s == "default" else float(args.per_s)
            try:
                found = set_rate_limit(conn, args.device_id, per_s)
            except ValueError as exc:
                say(f"error: {exc}")
                return 1
            if not found:
                say(f"error: no device or gateway {args.device_id!r}")
                return 1
            accounts.record(
                conn, _cli_actor(), "device.changed", "device", args.device_id, None, {"rate_limit_per_s": per_s}
            )
            shown = "the gateway's default" if per_s is None else "no limit" if per_s == 0 else f"{per_s:g} messages/s"
            say(f"{args.device_id}: rate limit {shown} (the gateways read it within 10 s)")
        else:
            if not set_enabled(conn, args.device_id, args.action == "enable"):
                say(f"error: no device or gateway {args.device_id!r}")
                return 1
            accounts.record(
                conn,
                _cli_actor(),
                "device.changed",
                "device",
                args.device_id,
                None,
                {"enabled": args.action == "enable"},
            )
            say(f"{args.device_id} {args.action}d")
    mqtt_access.sync(stack)
    return 0


def _cli_actor() -> str:
    """Who the audit log names for a command-line change: the machine account that ran it."""
    import getpass

    return f"cli:{getpass.getuser()}"


def cmd_users(args: argparse.Namespace) -> int:
    import psycopg

    from ops_api import accounts

    stack = StackSettings()
    with psycopg.connect(stack.postgres_dsn) as conn:
        try:
            if args.action == "add":
                user = accounts.User(args.user_id, args.role, tuple(args.city or ()), args.name)
                accounts.upsert_user(conn, user, actor=_cli_actor())
                scope = "every city" if user.role == "admin" else ", ".join(user.cities)
                say(f"user {user.user_id} saved: {user.role} for {scope}")
                if not args.no_token:
                    token = accounts.issue_token(
                        conn, user.user_id, label="created with the user", actor=_cli_actor(), lifetime=args.expires
                    )
                    say(f"API token (shown once; only its hash is kept; {_expiry(conn, token)}): {token}")
            elif args.action == "token":
                token = accounts.issue_token(
                    conn, args.user_id, label=args.label, actor=_cli_actor(), lifetime=args.expires
                )
                say(
                    f"API token for {args.user_id} (shown once; only its hash is kept; {_expiry(conn, token)}): {token}"
                )
            elif args.action == "revoke":
                say(f"{accounts.revoke_tokens(conn, args.user_id, actor=_cli_actor())} token(s) revoked")
            else:
                for user, tokens in accounts.list_users(conn):
                    scope = "*" if user.role == "admin" else ",".join(user.cities)
                    expiry = (
                        "-"
                        if not tokens.live
                        else f"{tokens.next_expiry:%Y-%m-%d %H:%M %Z}"
                        if tokens.next_expiry
                        else "never"
                    )
                    print(
                        f"{user.user_id:<24} {user.role:<11} {tokens.live:>2} token(s)  expires {expiry:<20}  {scope}"
                    )
        except (ValueError, LookupError) as exc:
            say(f"error: {exc}")
            return 1
    return 0


def _token_lifetime(text: str) -> dt.timedelta | None:
    """`--expires`: days (a positive number), or `never`; `default` is accounts.DEFAULT_TOKEN_LIFETIME."""
    import datetime as dt

    from ops_api.accounts import DEFAULT_TOKEN_LIFETIME

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
    from ops_api import accounts

    expires_at = accounts.token_expiry(conn, token)
    return f"expires {expires_at:%Y-%m-%d %H:%M %Z}" if expires_at else "never expires"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from kota.registry import DEVICE_TYPES

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
        p.add_argument(
            "--expires",
            type=_token_lifetime,
            default="default",
            metavar="DAYS|never",
            help="the token works for this many days, or until revoked (never); default 90",
        )
    urev = users_sub.add_parser("revoke", help="revoke every token of an account")
    urev.add_argument("user_id")
    users_sub.add_parser("list", help="list accounts")
    users.set_defaults(func=cmd_users)
