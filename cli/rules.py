"""`kota rules`: a city's alert rules from the command line (docs/rules.md), the same versions, checks
and audit entries as the API's /api/v1/cities/{city}/rules, and the same preview."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import json
import sys
import time
from pathlib import Path
from typing import Any

from cli.common import say
from kota.settings import StackSettings


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _load_json(text: str) -> Any:
    """A JSON document given inline, as @FILE, or as - (standard input)."""
    if text == "-":
        return json.load(sys.stdin)
    if text.startswith("@"):
        return json.loads(Path(text[1:]).read_text())
    return json.loads(text)


def _at(ms: int | None) -> str:
    return "-" if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")


async def _run(args: argparse.Namespace) -> int:
    import psycopg
    from pydantic import ValidationError

    from processing import rulebook
    from processing.rulebook import CustomRule, RuleSet

    async with await psycopg.AsyncConnection.connect(StackSettings().postgres_dsn, autocommit=True) as conn:
        city: str = args.city
        if args.action in ("list", "show"):
            found = await rulebook.city_version(conn, city, getattr(args, "version", None))
            if found is None:
                say(f"{city} has no version {args.version}")
                return 1
            if args.action == "show":
                print(json.dumps(found.rules.model_dump(mode="json"), indent=2))
                return 0
            say(f"{city} rules version {found.version} by {found.author}: {found.comment}")
            for r in found.rules.rules:
                scope = ", ".join(f"{k}={v}" for k, v in r.scope.model_dump(exclude_none=True).items()) or "city"
                rate = f"/h over {r.window_s} s" if r.kind == "rate" else ""
                print(
                    f"  {r.id}: {r.metric} {r.op} {r.value:g}{rate} for {r.for_s} s, deadband {r.deadband:g}, "
                    f"{r.severity}, scope {scope}"
                )
            ispu = ", ".join(f"{k}={v}" for k, v in found.rules.ispu.items())
            print(f"  ISPU alerts: {ispu or 'none'}")
            gate = found.rules.flood.default
            print(
                f"  flood gates: default Siaga 3/2/1 at {gate.siaga3_cm:g}/{gate.siaga2_cm:g}/{gate.siaga1_cm:g} cm, "
                f"rise {gate.rise_cm_per_h:g} cm/h; {len(found.rules.flood.gates)} gates of their own"
            )
            noise = found.rules.noise
            print(
                f"  noise: default {noise.default_dba:g} dB(A), {len(noise.sensors)} sensors of their own, "
                f"alerts {noise.severity or 'off'}"
            )
            return 0
        if args.action == "history":
            for v in await rulebook.city_versions(conn, city):
                back = f" (rollback to {v.rolled_back_to})" if v.rolled_back_to is not None else ""
                when = v.created_at.strftime("%Y-%m-%d %H:%M:%S") if v.created_at else "-"
                print(f"  v{v.version}  {when}  {v.author}: {v.comment}{back}  [{len(v.rules.rules)} custom rules]")
            return 0
        try:
            if args.action == "set":
                current = await rulebook.city_version(conn, city)
                assert current is not None
                if args.file is not None:
                    rules = RuleSet.model_validate(_load_json(args.file))
                else:
                    kept = [r for r in current.rules.rules if r.id not in set(args.remove_rule or ())]
                    added = [CustomRule.model_validate(_load_json(text)) for text in args.add_rule or ()]
                    kept = [r for r in kept if r.id not in {a.id for a in added}] + added
                    rules = current.rules.model_copy(update={"rules": kept})
                    rules = RuleSet.model_validate(rules.model_dump(mode="json"))
                rolled_back_to = None
                expected = args.expected_version if args.expected_version is not None else current.version
            elif args.action == "rollback":
                older = await rulebook.city_version(conn, city, args.version)
                if older is None:
                    say(f"{city} has no version {args.version}")
                    return 1
                rules, rolled_back_to, expected = older.rules, args.version, None
                args.comment = args.comment or f"rollback to version {args.version}"
            else:  # preview
                if not 0 < args.days <= 31:
                    say("error: --days must be more than 0 and at most 31")
                    return 1
                rule = CustomRule.model_validate(_load_json(args.rule))
                if foreign := await rulebook.foreign_devices(conn, city, RuleSet(rules=[rule])):
                    say(f"error: not devices of {city}: {', '.join(foreign)}")
                    return 1
                since_ms = int((time.time() - args.days * 86_400) * 1000)
                judged, found_episodes = await rulebook.preview(conn, city, rule, since_ms)
                devices = sorted({e.device_id for e in found_episodes})
                say(
                    f"{rule.id} over {args.days:g} days: {len(found_episodes)} alerts on {len(devices)} of "
                    f"{len(judged)} devices"
                )
                for e in found_episodes:
                    print(
                        f"  {e.device_id}  {_at(e.raised_ms)} .. {_at(e.cleared_ms)}  {e.minutes} minutes, "
                        f"worst {e.worst:g}"
                    )
                return 0
        except (ValidationError, ValueError) as exc:
            say(f"error: {exc}")
            return 1
        if foreign := await rulebook.foreign_devices(conn, city, rules):
            say(f"error: not devices of {city}: {', '.join(foreign)}")
            return 1
        try:
            version = await rulebook.save_version(
                conn,
                city,
                rules,
                author=_actor(),
                comment=args.comment,
                expected_version=expected,
                rolled_back_to=rolled_back_to,
            )
        except rulebook.RulesConflict as exc:
            say(f"error: {exc}; run it again")
            return 1
        say(f"{city} rules version {version} saved; the processor applies it from its next batch")
        return 0


def cmd_rules(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rules = sub.add_parser("rules", help="a city's alert rules: list, show, set, rollback, preview, history")
    actions = rules.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("list", "the current rules, in short"), ("show", "a version's rules as JSON")):
        p = actions.add_parser(name, help=text)
        p.add_argument("city")
        if name == "show":
            p.add_argument("--version", type=int, help="this version (default: the current one)")
    p = actions.add_parser("history", help="every version, with author and comment")
    p.add_argument("city")
    p = actions.add_parser("set", help="save a new version: a whole rule set, or custom rules added or removed")
    p.add_argument("city")
    p.add_argument("--comment", required=True, help="why (kept with the version and in the audit log)")
    p.add_argument("--file", help="the whole rule set as JSON: @FILE, - for standard input, or inline")
    p.add_argument("--add-rule", action="append", metavar="JSON", help="add or replace a custom rule (by id)")
    p.add_argument("--remove-rule", action="append", metavar="ID", help="remove a custom rule")
    p.add_argument("--expected-version", type=int, help="refuse if the rules are no longer at this version")
    p = actions.add_parser("rollback", help="save an older version's rules as a new version")
    p.add_argument("city")
    p.add_argument("version", type=int)
    p.add_argument("--comment", default="", help="why (default: rollback to version N)")
    p = actions.add_parser("preview", help="what a custom rule would have raised over the last days")
    p.add_argument("city")
    p.add_argument("rule", help="the rule as JSON: inline, @FILE or -")
    p.add_argument("--days", type=float, default=7.0, help="days back (default 7, at most 31)")
    rules.set_defaults(func=cmd_rules)
