"""What a kill -9 of Mosquitto loses: acknowledged readings that never reach the database.

    .venv/bin/python -m bench.broker_kill [--rounds 3] [--rate 4000] [--gateway-down 2 4 6]

Mosquitto 2.0 acknowledges a QoS 1 publish once the message is in its memory, and writes its
store to disk every `autosave_interval` seconds (5; deploy/mosquitto.py). A message an ingest
gateway has taken is in Kafka or on its way there; one the broker still holds for the gateways'
session lives only in memory until the next save. This measures both sides of that, on a stack of
its own (.kota-brokerkill/, ports shifted by 800), each round a fresh simulated city (the tests'
standard one: 24 devices, three simulated hours, 29,368 readings, at `--rate` readings/s):

- "broker alone": the broker killed with -9 mid-stream while the gateway keeps up, then started;
- "gateway down N s": the gateway killed with -9, the broker killed with -9 N seconds later (the
  gateway's session queue holding what devices sent meanwhile), then both started.

For each, the readings the simulator had acknowledged by the broker, those stored, and the
difference, per round, with the median. Nothing is ever stored twice (also printed). The stack is
left running: `KOTA_STATE_DIR=.kota-brokerkill KOTA_PORT_OFFSET=800 kota down`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from deploy import components, mosquitto, procs
from kota.settings import PROJECT_ROOT, StackSettings

STACK = StackSettings(state_dir=PROJECT_ROOT / ".kota-brokerkill", port_offset=800)
ENV = {**os.environ, "KOTA_STATE_DIR": str(STACK.state_dir), "KOTA_PORT_OFFSET": str(STACK.port_offset)}
CITY = ("--devices", "24", "--seed", "5", "--hours", "3", "--interval", "30")  # tests.helpers.SIMULATION


def say(message: str) -> None:
    print(f"bench.broker_kill: {message}", flush=True)


def stored(city: str) -> tuple[int, int]:
    """Readings of `city` stored, and how many distinct (device, metric, time) among them."""
    with psycopg.connect(STACK.postgres_dsn) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT (device_id, metric, ts)) FROM readings r "
            "JOIN devices d USING (device_id) WHERE d.city = %s",
            (city,),
        ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def settled(city: str, acknowledged: int, timeout_s: float = 120.0) -> tuple[int, int]:
    """What `city` holds once every acknowledged reading is stored, or once nothing more has come
    for 15 s (what was lost does not come)."""
    deadline = time.monotonic() + timeout_s
    last, since = (-1, -1), time.monotonic()
    while time.monotonic() < deadline:
        now = stored(city)
        if now[0] >= acknowledged:
            time.sleep(2.0)  # would anything arrive twice?
            return stored(city)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > 15.0:
            return now
        time.sleep(1.0)
    return stored(city)


def one_round(city: str, rate: int, gateway_down_s: float | None, folder: Path) -> tuple[int, int, int]:
    """Simulate `city` with the fault; return (acknowledged, stored, distinct stored)."""
    counts = folder / f"{city}-counts.json"
    start = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=4)).replace(second=0, microsecond=0)
    argv = [sys.executable, "-m", "cli", "simulate", "--city", city, *CITY, "--start", start.isoformat()]
    argv += ["--rate", str(rate), "--counts", str(counts), "--labels", str(folder / f"{city}-labels.json")]
    with subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as sim:
        deadline = time.monotonic() + 60
        while stored(city)[0] < 2000:  # the stream under way
            if time.monotonic() > deadline:
                raise SystemExit(f"{city}: the stream did not start")
            time.sleep(0.2)
        if gateway_down_s is not None:
            procs.stop(STACK, "gateway", hard=True)
            time.sleep(gateway_down_s)
        procs.stop(STACK, "mosquitto", hard=True)
        time.sleep(0.5)
        mosquitto.start_mosquitto(STACK, lambda m: None)
        if gateway_down_s is not None:
            components.start_component(STACK, "gateway")
        output = sim.communicate(timeout=600)[0]
    if sim.returncode != 0:
        raise SystemExit(f"{city}: kota simulate failed:\n{output[-2000:]}")
    acknowledged = int(json.loads(counts.read_text())["acknowledged_readings"])
    return (acknowledged, *settled(city, acknowledged))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=int, default=4000, help="readings/s the simulator publishes")
    parser.add_argument("--gateway-down", type=float, nargs="*", default=[2.0, 4.0, 6.0])
    args = parser.parse_args()
    say(f"starting the stack in {STACK.state_dir} (ports +{STACK.port_offset})")
    up = subprocess.run([sys.executable, "-m", "cli", "up", "--no-simulator"], env=ENV, capture_output=True, text=True)
    if up.returncode != 0:
        raise SystemExit(f"kota up failed:\n{up.stdout[-2000:]}{up.stderr[-2000:]}")
    folder = Path(tempfile.mkdtemp(prefix="kota-brokerkill-"))
    run = time.strftime("%H%M%S")
    cases: list[tuple[str, float | None]] = [("broker alone", None)]
    cases += [(f"gateway down {down:g} s", down) for down in args.gateway_down]
    for case, (name, down) in enumerate(cases):
        lost, acknowledged_counts = [], []
        for r in range(args.rounds):
            city = f"bk{run}-{case}-{r}"
            acknowledged, count, distinct = one_round(city, args.rate, down, folder)
            lost.append(acknowledged - distinct)
            acknowledged_counts.append(acknowledged)
            doubled = count - distinct
            say(
                f"{name}, round {r + 1}: {acknowledged:,} acknowledged, {distinct:,} stored, lost {lost[-1]:,}"
                f"{f', DOUBLED {doubled:,}' if doubled else ''}"
            )
        say(
            f"{name}: lost median {statistics.median(lost):,.0f} (range {min(lost):,}-{max(lost):,}) of "
            f"{min(acknowledged_counts):,}-{max(acknowledged_counts):,} acknowledged readings, "
            f"published at {args.rate:,} readings/s"
        )


if __name__ == "__main__":
    main()
