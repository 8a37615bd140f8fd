"""Benchmarks. Those that need the real services share one stack (.kota-bench/, ports shifted by
200), left running between runs; `KOTA_STATE_DIR=.kota-bench KOTA_PORT_OFFSET=200 kota down` stops it."""

from __future__ import annotations

from collections.abc import Callable

from kota.settings import PROJECT_ROOT, StackSettings


def bench_stack() -> StackSettings:
    return StackSettings(state_dir=PROJECT_ROOT / ".kota-bench", port_offset=200)


def start_bench_stack(say: Callable[[str], None]) -> StackSettings:
    """Start (or reuse) the benchmarks' Mosquitto, PostgreSQL and Kafka, with the schema migrated."""
    from deploy.stack import start_services
    from kota.schema import migrate

    stack = bench_stack()
    start_services(stack, say, open_devices=False)
    migrate(stack.postgres_dsn)
    return stack
