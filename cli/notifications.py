"""`kota notifications`: channels, subscriptions, test messages and deliveries, as the API offers them.

Checked by the API's own models (ops_api/api/routes/notifications.py), written as the schema's
owner, in the audit log as `cli:<user>`. A secret is never an argument (it would sit in the shell's
history and in `ps`): it is read from a file, an environment variable or standard input."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from cli.common import say
from kota.settings import StackSettings


def _actor() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


def _secret(args: argparse.Namespace) -> str:
    if args.secret_file:
        with open(args.secret_file) as f:
            return f.read().strip()
    if args.secret_env:
        return os.environ[args.secret_env]
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("secret (webhook key, SMTP password or bot token): ")
    return sys.stdin.readline().strip()


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    say("  ".join(columns))
    for row in rows:
        say("  ".join("-" if row.get(c) is None else str(row.get(c)) for c in columns))


def _record(conn: Any, actor: str, action: str, target_type: str, target_id: str, city: str, details: Any) -> None:
    from psycopg.types.json import Jsonb

    from ops_api.accounts import AUDIT_INSERT

    conn.execute(AUDIT_INSERT, (actor, action, target_type, target_id, city, Jsonb(details)))


def cmd_notifications(args: argparse.Namespace) -> int:
    import psycopg
    from psycopg.rows import dict_row
    from psycopg.types.json import Jsonb
    from pydantic import ValidationError

    from kota.notifications import NotificationKeys
    from ops_api.api.routes.notifications import SUBSCRIPTION_COLUMNS, ChannelIn, SubscriptionIn

    stack = StackSettings()
    keys = NotificationKeys.from_stack(stack)
    with psycopg.connect(stack.postgres_dsn, row_factory=dict_row) as conn:
        try:
            match (args.group, args.action):
                case ("channels", "list"):
                    rows = conn.execute(
                        "SELECT channel_id, city, name, kind, config, secret IS NOT NULL AS has_secret, enabled "
                        "FROM notification_channels WHERE %s::text IS NULL OR city = %s ORDER BY channel_id",
                        (args.city, args.city),
                    ).fetchall()
                    _table(rows, ["channel_id", "city", "name", "kind", "enabled", "has_secret", "config"])
                case ("channels", "add"):
                    channel = ChannelIn(
                        city=args.city,
                        name=args.name,
                        kind=args.kind,
                        config=json.loads(args.config),
                        secret=_secret(args),
                    )
                    with conn.transaction():
                        row = conn.execute(
                            "INSERT INTO notification_channels (city, name, kind, config, secret, created_by) "
                            "VALUES (%s, %s, %s, %s, %s, %s) RETURNING channel_id",
                            (
                                channel.city,
                                channel.name,
                                channel.kind,
                                Jsonb(channel.config),
                                keys.encrypt(channel.secret),
                                _actor(),
                            ),
                        ).fetchone()
                        assert row is not None
                        _record(
                            conn,
                            _actor(),
                            "notification.channel.add",
                            "notification_channel",
                            str(row["channel_id"]),
                            channel.city,
                            {"name": channel.name, "kind": channel.kind, "config": channel.config},
                        )
                    say(f"channel {row['channel_id']} added (secret stored encrypted)")
                case ("channels", "test"):
                    with conn.transaction():
                        row = conn.execute(
                            "INSERT INTO notification_outbox (kind, channel_id, city, body) "
                            "SELECT 'test', channel_id, city, %s FROM notification_channels WHERE channel_id = %s "
                            "RETURNING message_id, city",
                            (Jsonb({"language": args.language, "by": _actor()}), args.channel_id),
                        ).fetchone()
                        if row is None:
                            say(f"error: no channel {args.channel_id}")
                            return 1
                        _record(
                            conn,
                            _actor(),
                            "notification.channel.test",
                            "notification_channel",
                            str(args.channel_id),
                            row["city"],
                            {"message_id": row["message_id"]},
                        )
                    say(f"test message {row['message_id']} queued; see `kota notifications deliveries`")
                case ("subscriptions", "list"):
                    rows = conn.execute(
                        f"SELECT subscription_id, city, {SUBSCRIPTION_COLUMNS} FROM notification_subscriptions "  # noqa: S608
                        "WHERE %s::text IS NULL OR city = %s ORDER BY subscription_id",
                        (args.city, args.city),
                    ).fetchall()
                    _table(
                        rows,
                        [
                            "subscription_id",
                            "city",
                            "channel_id",
                            "tier",
                            "min_severity",
                            "alert_types",
                            "district",
                            "language",
                            "quiet_start",
                            "quiet_end",
                            "digest_limit",
                            "digest_window_s",
                        ],
                    )
                case ("subscriptions", "add"):
                    sub = SubscriptionIn(
                        channel_id=args.channel_id,
                        domain=args.domain,
                        district=args.district,
                        alert_types=args.alert_type or None,
                        min_severity=args.min_severity,
                        language=args.language,
                        tier=args.tier,
                        escalate_after_s=args.escalate_after_s,
                        quiet_start=args.quiet[0] if args.quiet else None,
                        quiet_end=args.quiet[1] if args.quiet else None,
                        digest_limit=args.digest_limit,
                        digest_window_s=args.digest_window_s,
                        timezone=args.timezone,
                    )
                    values = sub.model_dump()
                    with conn.transaction():
                        row = conn.execute(
                            f"INSERT INTO notification_subscriptions (city, created_by, {SUBSCRIPTION_COLUMNS}) "  # noqa: S608
                            f"SELECT city, %s, {', '.join(['%s'] * 14)} FROM notification_channels "
                            "WHERE channel_id = %s RETURNING subscription_id, city",
                            (_actor(), *[values[c.strip()] for c in SUBSCRIPTION_COLUMNS.split(",")], args.channel_id),
                        ).fetchone()
                        if row is None:
                            say(f"error: no channel {args.channel_id}")
                            return 1
                        _record(
                            conn,
                            _actor(),
                            "notification.subscription.add",
                            "notification_subscription",
                            str(row["subscription_id"]),
                            row["city"],
                            sub.model_dump(mode="json"),
                        )
                    say(f"subscription {row['subscription_id']} added")
                case ("subscriptions", "delete"):
                    with conn.transaction():
                        row = conn.execute(
                            "DELETE FROM notification_subscriptions WHERE subscription_id = %s RETURNING city",
                            (args.subscription_id,),
                        ).fetchone()
                        if row is None:
                            say(f"error: no subscription {args.subscription_id}")
                            return 1
                        _record(
                            conn,
                            _actor(),
                            "notification.subscription.delete",
                            "notification_subscription",
                            str(args.subscription_id),
                            row["city"],
                            {},
                        )
                    say(f"subscription {args.subscription_id} deleted")
                case ("deliveries", _):
                    rows = conn.execute(
                        "SELECT message_id, kind, city, channel_id, alert_id, status, attempts, possible_duplicate, "
                        "last_error FROM notification_outbox WHERE (%s::text IS NULL OR city = %s) "
                        "AND (%s::text IS NULL OR status = %s) ORDER BY message_id DESC LIMIT %s",
                        (args.city, args.city, args.status, args.status, args.limit),
                    ).fetchall()
                    _table(
                        rows,
                        [
                            "message_id",
                            "kind",
                            "city",
                            "channel_id",
                            "alert_id",
                            "status",
                            "attempts",
                            "possible_duplicate",
                            "last_error",
                        ],
                    )
        except (ValidationError, json.JSONDecodeError) as exc:
            say(f"error: {exc}")
            return 2
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    top = sub.add_parser("notifications", help="notification channels, subscriptions, test messages, deliveries")
    groups = top.add_subparsers(dest="group", required=True)
    channels = groups.add_parser("channels", help="webhook, email and Telegram channels").add_subparsers(
        dest="action", required=True
    )
    listing = channels.add_parser("list", help="channels (secrets are never shown)")
    listing.add_argument("--city")
    add = channels.add_parser("add", help="add a channel; its secret is read from a file, a variable or stdin")
    add.add_argument("--city", required=True)
    add.add_argument("--name", required=True)
    add.add_argument("--kind", required=True, choices=["webhook", "email", "telegram"])
    add.add_argument(
        "--config",
        required=True,
        help='JSON: webhook {"url"}; email {"host","port","username","from","to":[...]}; telegram {"chat_id"}',
    )
    add.add_argument("--secret-file", help="file holding the webhook key, SMTP password or bot token")
    add.add_argument("--secret-env", help="environment variable holding it (else: standard input)")
    test = channels.add_parser("test", help="queue a test message on a channel")
    test.add_argument("channel_id", type=int)
    test.add_argument("--language", choices=["id", "en"], default="id")
    subs = groups.add_parser("subscriptions", help="which alert events reach which channel").add_subparsers(
        dest="action", required=True
    )
    subs.add_parser("list").add_argument("--city")
    sadd = subs.add_parser("add", help="route a city's alert events to a channel")
    sadd.add_argument("--channel-id", type=int, required=True)
    sadd.add_argument("--domain")
    sadd.add_argument("--district")
    sadd.add_argument("--alert-type", action="append", help="repeat for several; default every type")
    sadd.add_argument("--min-severity", choices=["warning", "minor", "major", "critical"], default="warning")
    sadd.add_argument("--language", choices=["id", "en"], default="id")
    sadd.add_argument("--tier", type=int, default=1)
    sadd.add_argument("--escalate-after-s", type=int, help="tier > 1: seconds unacknowledged before it hears")
    sadd.add_argument("--quiet", nargs=2, metavar=("START", "END"), help="quiet hours, local time, e.g. 22:00 06:00")
    sadd.add_argument("--timezone", default="Asia/Jakarta", help="of the quiet hours (IANA name)")
    sadd.add_argument("--digest-limit", type=int, default=10)
    sadd.add_argument("--digest-window-s", type=int, default=600)
    sdel = subs.add_parser("delete")
    sdel.add_argument("subscription_id", type=int)
    deliveries = groups.add_parser("deliveries", help="messages with their status, attempts and give-up reasons")
    deliveries.add_argument("--city")
    deliveries.add_argument(
        "--status", choices=["pending", "sending", "sent", "failed", "suppressed", "held", "digested"]
    )
    deliveries.add_argument("--limit", type=int, default=50)
    deliveries.set_defaults(action="list")
    top.set_defaults(func=cmd_notifications)
