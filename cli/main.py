"""The `kota` command's parser: each command group adds its own subcommands."""

from __future__ import annotations

import argparse
import sys

from cli import broker, city, commands, components, deadletters, notifications, registry, rules, stack


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kota", description="kotacerdas: smart-city sensor platform")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (stack, components, city, broker, deadletters, registry, notifications, commands, rules):
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
