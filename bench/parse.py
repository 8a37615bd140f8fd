"""The gateway's payload checks alone: microseconds per message for a device's message of 8 values and
a gateway batch of 1,600, against decoding the same bytes with orjson (the floor any check starts from);
then what an account's rate limits add to each message: the message bucket alone (the budgets in
bytes and readings off) against all three, for 1,000 limited accounts in batches of 500.

    .venv/bin/python -m bench.parse

No services needed. Medians and ranges of five runs, each the best of three timeit repeats.
"""

from __future__ import annotations

import json
import statistics
import timeit
from collections.abc import Callable

import orjson

from ingest.parse import ParseLimits, parse_message
from ingest.ratelimit import AccountBudgets, RateLimit
from kota.contract import device_telemetry_topic, gateway_telemetry_topic
from kota.registry import Gateway, new_device

NOW = 1_795_000_000_000


def _cases() -> list[tuple[str, str, bytes, dict, dict]]:
    single = new_device("aq-1", "bandung", "air_quality")
    bound = [new_device(f"d-{i}", "bandung", "air_quality", gateway_id="gw-1") for i in range(100)]
    devices = {d.device_id: d for d in [single, *bound]}
    gateways = {"gw-1": Gateway("gw-1", "bandung")}
    one = json.dumps({"ts": NOW - 1000, "values": {m: 10.5 for m in single.metrics}}).encode()
    batch = json.dumps(
        {d.device_id: [{"ts": NOW - 1000 * k, "values": {m: 10.5 for m in d.metrics}} for k in (1, 2)] for d in bound}
    ).encode()
    return [
        ("device message, 8 values", device_telemetry_topic("bandung", "environment", "aq-1"), one, devices, gateways),
        ("gateway batch, 1,600 values", gateway_telemetry_topic("bandung", "gw-1"), batch, devices, gateways),
    ]


def _micros(work: Callable[[], object], number: int) -> list[float]:
    return [min(timeit.repeat(work, number=number, repeat=3)) / number * 1e6 for _ in range(5)]


def main() -> None:
    limits = ParseLimits()
    print(f"{'payload':<30} {'orjson.loads us':>18} {'parse_message us':>22} {'ratio':>6}")
    for name, topic, payload, devices, gateways in _cases():
        number = 2000 if "device" in name else 30
        floor = _micros(lambda p=payload: orjson.loads(p), number)
        full = _micros(
            lambda t=topic, p=payload, d=devices, g=gateways: parse_message(
                t, p, devices=d, gateways=g, received_ms=NOW, limits=limits
            ),
            number,
        )
        print(
            f"{name:<30} {statistics.median(floor):>8.1f} [{min(floor):.1f}-{max(floor):.1f}] "
            f"{statistics.median(full):>10.1f} [{min(full):.1f}-{max(full):.1f}] "
            f"{statistics.median(full) / statistics.median(floor):>6.1f}x"
        )

    print(f"\n{'rate limits per message':<30} {'messages only us':>18} {'+ bytes, readings us':>22} {'ratio':>6}")
    alone, all_three = ([t / LIMITS_MESSAGES for t in _micros(_limits_run(budgets=on), 1)] for on in (False, True))
    print(
        f"{'1,000 accounts, batches of 500':<30} {statistics.median(alone):>8.2f} "
        f"[{min(alone):.2f}-{max(alone):.2f}] {statistics.median(all_three):>10.2f} "
        f"[{min(all_three):.2f}-{max(all_three):.2f}] {statistics.median(all_three) / statistics.median(alone):>6.1f}x"
    )


LIMITS_MESSAGES = 100_000


def _limits_run(*, budgets: bool) -> Callable[[], None]:
    """LIMITS_MESSAGES of the gateway's checks for a device's message of 200 bytes and 8 readings,
    the clock moving once a batch as the gateway's does."""
    per_message = 1.0 if budgets else 0.0
    senders = [f"dev-{i}" for i in range(1000)]

    def run() -> None:
        limit = RateLimit.of(20, 60)
        buckets = AccountBudgets(
            bytes_per_message=16_384 * per_message,
            readings_per_message=10 * per_message,
            volume_burst_s=3600,
            largest_payload=262_144,
            most_readings=10_000,
        )
        for i in range(LIMITS_MESSAGES):
            now, sender = (i // 500) * 0.05, senders[i % 1000]
            if buckets.admit(sender, limit, 200, now) is None:
                buckets.admit_readings(sender, limit, 8, now)

    return run


if __name__ == "__main__":
    main()
