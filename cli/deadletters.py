"""`kota deadletters`: rejected input with its reason code, from the dead-letter topic; with
`--processor`, the Kafka records the processor could not store (the processor_dead_letters table)."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from cli.common import say
from kota.settings import StackSettings


def show_processor_dead_letters(stack: StackSettings, since_s: float, limit: int) -> int:
    """Print the processor's dead letters of the last `since_s` seconds, newest first; how many."""
    import psycopg

    from kota.contract import escaped

    with psycopg.connect(stack.postgres_dsn) as conn:
        rows = conn.execute(
            'SELECT dead_at, reason, topic, partition, "offset", message, value_length '
            "FROM processor_dead_letters WHERE dead_at >= now() - make_interval(secs => %s) "
            "ORDER BY dead_at DESC LIMIT %s",
            (since_s, limit),
        ).fetchall()
    for dead_at, reason, topic, partition, offset, message, length in rows:
        # The message may quote the record (a device's metric name): escaped like every dead letter.
        print(
            f"{dead_at:%Y-%m-%d %H:%M:%S}  {escaped(reason, 40):<18} {topic}[{partition}]@{offset}  "
            f"{length} bytes  {escaped(message)}",
            flush=True,
        )
    return len(rows)


def cmd_deadletters(args: argparse.Namespace) -> int:
    from ingest.deadletters import read_dead_letters
    from kota.contract import escaped

    stack = StackSettings()
    if args.processor:
        if not show_processor_dead_letters(stack, args.since, args.limit):
            say(f"no processor dead letters in the last {args.since:.0f} s")
        return 0

    def show(letter: dict[str, Any]) -> None:
        # Everything here came from a device: escaped, so it cannot forge lines or drive the terminal.
        topic = escaped(str(letter["topic"]), 200)
        for rejection in letter["rejections"]:
            print(
                f"{escaped(str(rejection['reason']), 40):<20} {topic}  {escaped(str(rejection['message']))}", flush=True
            )
        more = int(letter["rejections_total"]) - len(letter["rejections"])
        if more > 0:
            counts = ", ".join(f"{escaped(str(reason), 40)} {n}" for reason, n in letter["reasons"].items())
            print(f"{'':<20} {topic}  ... and {more} more rejection(s) in this message ({counts})", flush=True)

    since_ms = int((time.time() - args.since) * 1000)
    seen = asyncio.run(
        read_dead_letters(
            stack.kafka_client_options(),
            device=args.device,
            since_ms=since_ms,
            wait_for=args.wait_for,
            follow=args.follow,
            timeout_s=args.timeout,
            show=show,
        )
    )
    if args.wait_for and not seen:
        say(f"no {args.wait_for} rejection within {args.timeout:.0f} s")
        return 1
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dl = sub.add_parser("deadletters", help="show rejected input with its reason (the dead-letter topic)")
    dl.add_argument("--device", help="only rejections naming this device or gateway")
    dl.add_argument("--since", type=float, default=3600, help="seconds back to look (default 3600)")
    dl.add_argument("--follow", action="store_true", help="keep showing new rejections")
    dl.add_argument("--wait-for", metavar="REASON", help="wait until a rejection with this reason appears")
    dl.add_argument("--timeout", type=float, default=30, help="seconds to wait with --wait-for (default 30)")
    dl.add_argument(
        "--processor",
        action="store_true",
        help="the Kafka records the processor could not store (undecodable, out of range, refused), not the gateway's",
    )
    dl.add_argument("--limit", type=int, default=200, help="at most this many, newest first, with --processor")
    dl.set_defaults(func=cmd_deadletters)
