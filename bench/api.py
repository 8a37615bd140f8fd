"""Ops API benchmark: query latency at 50 concurrent clients, and live-feed lag at 200 WebSocket clients.

    .venv/bin/python -m bench.api [--clients 50] [--seconds 20] [--ws-clients 200] [--rate 5000]

Against the real bench stack (.kota-bench/, ports +200) with gateway, processor and API running:
- Latency p50/p90/p99 for the latest values of one device among 10,000, for a day of 1-minute
  series (200 pages asked for over and over, as a command centre does: the API keeps them,
  ops_api/series_cache.py), for day pages each asked for once (the cost with nothing kept), and
  for the whole 10,000-device city map, each against `/api/v1/me` in the same run (auth and
  framework only, no query): the floor a query endpoint cannot beat on this machine. The load comes
  from wrk (Debian's, installed if missing): 50 connections, each sending its next request as soon
  as the last is answered. Beside each: CPU per request of the API, PostgreSQL and wrk.
- Live-feed lag (client receive time minus gateway receive time) at 200 WebSocket clients while a
  simulated city publishes about 5,000 readings/s, against one client on the same feed; and the API
  process's memory before and after the clients connect.
Goals (issue #6): p99 under 50 ms for the queries, feed lag under 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
import websockets

from bench import start_bench_stack
from bench.e2e import component_pids, cpu_by_component
from deploy import components, install, mosquitto, procs
from kota.registry import new_device, upsert_devices
from kota.settings import StackSettings
from ops_api import accounts
from ops_api.settings import ApiSettings

CITY = "benchkota"
LIVE_CITY = "benchlive"


def say(message: str) -> None:
    print(f"bench.api: {message}", flush=True)


def seed(stack: StackSettings, devices: int) -> tuple[str, list[str]]:
    """10,000 devices with latest values, and 1-minute aggregates up to now for 200 of them (a day and more)."""
    ids = [f"{CITY}-aq-{i:05d}" for i in range(devices)]
    now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    with psycopg.connect(stack.postgres_dsn) as conn:
        known = conn.execute("SELECT count(*) FROM devices WHERE city = %s", (CITY,)).fetchone()
        if not known or known[0] < devices:
            say(f"seeding {devices} devices and their latest values")
            rng = np.random.default_rng(7)
            upsert_devices(
                conn,
                [
                    new_device(
                        d,
                        CITY,
                        "air_quality",
                        district=f"d{i % 30}",
                        lat=-6.9 + rng.normal(0, 0.05),
                        lon=107.6 + rng.normal(0, 0.05),
                    )
                    for i, d in enumerate(ids)
                ],
            )
            with conn.cursor().copy("COPY latest_values (device_id, metric, ts, value, unit) FROM STDIN") as copy:
                for d in ids:
                    for metric in ("pm25", "pm10", "no2"):
                        copy.write_row((d, metric, now, float(rng.uniform(5, 80)), "ug/m3"))
        # The series case asks for the day up to now: top up the minutes since the last run's seeding.
        # (Writing the whole day again set autovacuum going on agg_1m during the measurement.)
        newest = conn.execute(
            "SELECT max(bucket) FROM agg_1m WHERE device_id = %s AND metric = 'pm25'", (ids[0],)
        ).fetchone()
        since = max(newest[0] if newest and newest[0] else now - dt.timedelta(days=1), now - dt.timedelta(days=1))
        minutes = int((now - since) / dt.timedelta(minutes=1))
        if minutes > 0:
            say(f"seeding {minutes} minutes of 1-minute aggregates up to now for 200 devices")
            rng = np.random.default_rng(8 + minutes)
            with conn.cursor().copy(
                "COPY agg_1m (device_id, metric, bucket, n, sum, sum_sq, min, max, first_ts, "
                "first_value, last_ts, last_value) FROM STDIN"
            ) as copy:
                for d in ids[:200]:
                    for minute in range(minutes):
                        bucket = now - dt.timedelta(minutes=minute)
                        v = float(rng.uniform(5, 80))
                        copy.write_row((d, "pm25", bucket, 1, v, v * v, v, v, bucket, v, bucket, v))
            conn.execute("ANALYZE agg_1m")
        user = accounts.User("bench-operator", "operator", (CITY, LIVE_CITY))
        accounts.upsert_user(conn, user, actor="bench")
        token = accounts.issue_token(conn, user.user_id, label="bench.api", actor="bench")
    return token, ids


WRK_SCRIPT = Path(__file__).parent / "wrk" / "paths.lua"


def latency(stack: StackSettings, token: str, clients: int, seconds: float, paths: list[str]) -> dict[str, float]:
    """wrk (C, one thread) holding `clients` connections busy for `seconds`, each request a random
    path from `paths`: p50/p90/p99/max in ms, requests/s, and the CPU (ms) per request of the API, the
    database and wrk. A load generator in Python took more CPU than the API it measured (httpx:
    1.3 ms of client CPU per request), which is what it then timed."""
    if shutil.which("wrk") is None:
        install.install_packages(["wrk"], say)
    pids = component_pids(stack, [])
    pids = {"api": pids["api"], "postgres": pids["postgres"]}
    cpu0, wrk0 = cpu_by_component(pids), resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as listing:
        listing.write("\n".join(paths) + "\n")
        listing.flush()
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{clients}",
                f"-d{seconds:.0f}s",
                "--timeout",
                "30s",
                "-s",
                str(WRK_SCRIPT),
                "-H",
                f"Authorization: Bearer {token}",
                stack.api_url,
                "--",
                listing.name,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    cpu1, wrk1 = cpu_by_component(pids), resource.getrusage(resource.RUSAGE_CHILDREN)
    result: dict[str, float] = json.loads(out[out.index("JSON ") + 5 :].splitlines()[0])
    result["per_s"] = result["requests"] / result["seconds"]
    for name in pids:
        result[f"{name}_ms"] = (cpu1[name] - cpu0[name]) * 1000 / result["requests"]
    result["wrk_ms"] = (wrk1.ru_utime + wrk1.ru_stime - wrk0.ru_utime - wrk0.ru_stime) * 1000 / result["requests"]
    return result


def quantiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times) or [float("nan")]
    return (ordered[len(ordered) // 2] * 1000, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000)


def rss_mib(pid: int) -> float:
    """Resident memory of `kota api` and its worker processes."""
    total = 0.0
    for member in procs.group_pids(pid):
        for line in open(f"/proc/{member}/status").read().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


async def feed_lag(
    stack: StackSettings, token: str, ws_clients: int, seconds: float, api_pid: int
) -> tuple[list[float], int, float, float, int]:
    """Lags (s) seen by `ws_clients` clients over `seconds`; readings seen by one client; RSS before and after."""
    lags: list[float] = []
    readings_seen = [0]
    dropped = [0]
    url = f"ws://127.0.0.1:{stack.api_port}/api/v1/live?city={LIVE_CITY}&type=readings&token={token}"
    rss_before = rss_mib(api_pid)
    stop_at = time.monotonic() + seconds + 3
    # Counted: readings the gateway received once every client had connected and was reading.
    # Each client reads from the moment it connects; what it catches up on before then is not counted.
    count_from_ms = (time.time() + 3) * 1000

    async def client(index: int) -> None:
        async with websockets.connect(url, max_size=None, compression=None) as ws:
            while time.monotonic() < stop_at:
                try:
                    frame = await asyncio.wait_for(ws.recv(), timeout=max(0.1, stop_at - time.monotonic()))
                except TimeoutError:
                    break
                except websockets.ConnectionClosed as closed:
                    dropped[0] += 1
                    say(f"client {index} closed: {closed}")
                    return
                now_ms = time.time() * 1000
                # The frame's oldest event (the first) has waited longest: its lag stands for the frame.
                # Read just that number, so 200 clients in one Python process can keep up with the feed.
                text = frame if isinstance(frame, str) else frame.decode()
                at = text.index('"received_ms":') + 14
                received_ms = int(text[at : text.index(",", at)])
                if received_ms < count_from_ms:
                    continue
                lags.append((now_ms - received_ms) / 1000)
                if index == 0:  # one client decodes everything, to count what reached it
                    readings_seen[0] += sum(len(event["readings"]) for event in json.loads(frame))

    tasks = [asyncio.create_task(client(i)) for i in range(ws_clients)]
    await asyncio.sleep(4)
    rss_connected = rss_mib(api_pid)
    await asyncio.gather(*tasks)
    say(
        f"API memory: {rss_before:.0f} MiB before, {rss_connected:.0f} MiB with {ws_clients} clients, "
        f"{rss_mib(api_pid):.0f} MiB at the end"
    )
    return lags, readings_seen[0], rss_before, rss_connected, dropped[0]


def start_simulated_city(stack: StackSettings, readings_per_s: int) -> None:
    """`kota simulate` in its own process (not a thread here: it would share this process's GIL with the clients)."""
    devices = max(10, int(readings_per_s / 3.6))  # the simulator's mix averages about 3.6 readings per device
    components.start_component(
        stack, "simulate", "--devices", str(devices), "--interval", "1", "--city", LIVE_CITY, instance="simulator"
    )
    say(f"simulated city {LIVE_CITY}: {devices} devices publishing every second")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--ws-clients", type=int, default=200)
    parser.add_argument("--rate", type=int, default=5_000, help="simulated readings per second")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--only", choices=("latency", "live"))
    args = parser.parse_args()

    stack = start_bench_stack(say)
    for name in ("gateway", "processor", "api"):
        components.start_component(stack, name)
    mosquitto.open_devices_when_ingest_subscribed(stack, say)
    procs.wait_until(lambda: components.api_healthy(stack), "api", stack, timeout_s=60)
    token, ids = seed(stack, args.devices)
    series_ids = ids[:200]
    start = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

    cases = {
        "floor: /api/v1/me (auth only)": ["/api/v1/me"],
        f"latest values, 1 of {args.devices} devices": [f"/api/v1/devices/{d}/latest" for d in ids],
        "1-minute series, one day (1440 points)": [
            f"/api/v1/devices/{d}/series?metric=pm25&resolution=1m&start={start}" for d in series_ids
        ],
        # Each request a page of its own (its start a few seconds apart): what the series costs when
        # the API has kept nothing of it (ops_api/series_cache.py), as for the first operator to open it.
        "  the same, pages not asked before": [
            f"/api/v1/devices/{d}/series?metric=pm25&resolution=1m&start={start[:-3]}{s:02d}Z"
            for d in series_ids
            for s in range(60)
        ],
        f"city map, {args.devices} devices (GeoJSON)": [f"/api/v1/devices?city={CITY}"],
    }
    if args.only != "live":
        query_latency(stack, token, args.clients, args.seconds, cases)
    if args.only != "latency":
        live_feed_lag(stack, token, args)


def query_latency(stack: StackSettings, token: str, clients: int, seconds: float, cases: dict[str, list[str]]) -> None:
    say(
        f"latency at {clients} concurrent clients (wrk, {seconds:.0f} s each), "
        f"{ApiSettings().workers} API worker processes:"
    )
    floor_p99 = None
    for name, paths in cases.items():
        # Warm up just before: every worker's pool filled, every statement prepared, and what the API
        # keeps of these pages kept (a case run in between would have pushed it out).
        latency(stack, token, clients, 3, paths)
        r = latency(stack, token, clients, seconds, paths)
        floor_p99 = floor_p99 or r["p99_ms"]
        say(
            f"  {name:<42} p50 {r['p50_ms']:7.1f} ms  p90 {r['p90_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
            f"({r['p99_ms'] / floor_p99:4.1f}x floor p99)  {r['per_s']:6.0f} req/s  CPU ms/request: "
            f"api {r['api_ms']:.2f}, postgres {r['postgres_ms']:.2f}, wrk {r['wrk_ms']:.2f}"
            + (f"  ({r['errors']:.0f} socket errors, {r['non2xx']:.0f} not 200)" if r["errors"] or r["non2xx"] else "")
        )


def live_feed_lag(stack: StackSettings, token: str, args: argparse.Namespace) -> None:
    start_simulated_city(stack, args.rate)
    try:
        api_pid = procs.running_pid(stack, "api")
        assert api_pid is not None
        time.sleep(3)
        one, seen_one, *_ = asyncio.run(feed_lag(stack, token, 1, args.seconds, api_pid))
        simulator = procs.running_pid(stack, "simulator")
        pids = {**component_pids(stack, [simulator] if simulator else []), "bench clients": [os.getpid()]}
        cpu0, began = cpu_by_component(pids), time.monotonic()
        many, seen, before, connected, dropped = asyncio.run(
            feed_lag(stack, token, args.ws_clients, args.seconds, api_pid)
        )
        cpu1, elapsed = cpu_by_component(pids), time.monotonic() - began
    finally:
        procs.stop(stack, "simulator")
    if not many:
        many = [float("nan")]
    for label, lags, readings in (("1 client (baseline)", one, seen_one), (f"{args.ws_clients} clients", many, seen)):
        p50, p99 = quantiles(lags)
        say(
            f"live feed, {label:<22} lag p50 {p50 / 1000:5.2f} s  p99 {p99 / 1000:5.2f} s  max "
            f"{max(lags):5.2f} s  ({readings / args.seconds:,.0f} readings/s reached a client; "
            f"mean {statistics.fmean(lags):.2f} s)"
        )
    say(f"dropped clients: {dropped}; API memory {before:.0f} → {connected:.0f} MiB with {args.ws_clients} clients")
    say(
        f"CPU with {args.ws_clients} clients (share of one core): "
        + ", ".join(f"{name} {(cpu1[name] - cpu0[name]) / elapsed:.0%}" for name in cpu0)
    )


if __name__ == "__main__":
    main()
