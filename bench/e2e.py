"""End-to-end benchmark: the whole stack on this machine, fed by simulated cities at rising rates.

    .venv/bin/python -m bench.e2e [--rates 5000,10000,20000,35000,50000] [--seconds 20] [--simulators 2]

For each offered rate, `--simulators` processes of `kota simulate` publish live (event time = now)
through Mosquitto → gateway → Kafka → processor → PostgreSQL, with the API's live feed open. Over
a window of `--seconds` it measures:

- throughput: readings the gateway sent to Kafka and the processor newly stored, per second
  (their Prometheus counters);
- latency from a reading's event time to queryable in the database (polled every 0.25 s on a
  few probe devices) and to delivery on the live feed (one WebSocket client on the same devices).
  Event time is the simulator's tick start: a tick of 0.2 s is published over up to 0.2 s, which
  is included;
- CPU share of each component (user + system seconds over the window, of all cores).

A rate is sustained when at least 90 % of it reaches the gateway (the simulators' pacing runs a
few % short), the processor stores at least 95 % of what the gateway forwards, and the p99 to the
database is under 2 s; the highest such rate is the result. Baseline, measured in the same run:
the generator's ceiling, the same simulators publishing as fast as the broker acknowledges (their
own count of PUBACKs per second) with the whole pipeline running. The ratio of the sustained rate
to it says how much of what this machine can offer the platform keeps up with; absolute figures
vary with the machine.

Runs on the benchmarks' stack (.kota-bench/, ports shifted by 200), left running afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psycopg
import websockets

from bench import start_bench_stack
from deploy import components, procs
from deploy.folders import postgres_paths
from kota.settings import PROJECT_ROOT, StackSettings
from ops_api import accounts
from ops_api.metrics import scrape

READINGS_PER_DEVICE_TICK = 3.6  # the simulator's device mix averages about this many readings per device and tick
TICK_S = 0.2
PROBES = 12  # devices whose readings the latency probes follow
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(message: str) -> None:
    print(f"bench.e2e: {message}", flush=True)


# -- CPU per component, from /proc ---------------------------------------------------------------
def _cpu_s(pid: int, *, with_children: bool = False) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if with_children else 0)
    return ticks / CLK_TCK


def component_pids(stack: StackSettings, simulators: list[int]) -> dict[str, list[int]]:
    pids = {
        name: procs.group_pids(pid)
        for name in ("mosquitto", "kafka", "gateway", "processor", "api")
        if (pid := procs.running_pid(stack, name))
    }  # the group: `kota api` runs worker processes
    postmaster = int(postgres_paths(stack).data.joinpath("postmaster.pid").read_text().split()[0])
    pids["postgres"] = [postmaster, *procs.children(postmaster)]
    pids["simulators"] = simulators
    return pids


def cpu_by_component(pids: dict[str, list[int]]) -> dict[str, float]:
    return {
        name: sum(_cpu_s(p, with_children=(name == "postgres" and i == 0)) for i, p in enumerate(ps))
        for name, ps in pids.items()
    }


# -- counters ----------------------------------------------------------------------------------
def pipeline_counts(stack: StackSettings) -> tuple[float, float]:
    """Readings the gateway has sent to Kafka and the processor has newly stored, since they started."""
    return (
        scrape(stack.gateway_metrics_port).get("kota_gateway_readings_out_total", 0.0),
        scrape(stack.processor_metrics_port).get("kota_processor_readings_stored_total", 0.0),
    )


# -- latency probes ------------------------------------------------------------------------------
@dataclass
class Probes:
    devices: list[str]
    db_lags: list[float] = field(default_factory=list)
    db_weights: list[int] = field(default_factory=list)
    live_lags: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def poll_database(self, stack: StackSettings) -> None:
        newest = time.time() - 1  # only readings made from now on
        with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                rows = conn.execute(
                    "SELECT extract(epoch FROM ts)::float8, count(*) FROM readings WHERE device_id = ANY(%s) "
                    "AND ts > to_timestamp(%s) GROUP BY ts",
                    (self.devices, newest),
                ).fetchall()
                now = time.time()
                for ts, n in rows:
                    self.db_lags.append(now - ts)
                    self.db_weights.append(n)
                    newest = max(newest, ts)
                self.stop.wait(0.25)

    def follow_live_feed(self, stack: StackSettings, token: str) -> None:
        query = "&".join(f"device_id={d}" for d in self.devices)
        url = f"ws://127.0.0.1:{stack.api_port}/api/v1/live?type=readings&{query}&token={token}"

        async def follow() -> None:
            async with websockets.connect(url, max_size=None) as ws:
                while not self.stop.is_set():
                    try:
                        frame = await asyncio.wait_for(ws.recv(), timeout=0.5)
                    except TimeoutError:
                        continue
                    now_ms = time.time() * 1000
                    self.live_lags += [
                        (now_ms - r["ts"]) / 1000 for event in json.loads(frame) for r in event["readings"]
                    ]

        asyncio.run(follow())


def weighted_percentile(values: list[float], weights: list[int] | None, q: float) -> float:
    if not values:
        return float("nan")
    order = np.argsort(values)
    v = np.asarray(values)[order]
    w = np.asarray(weights if weights is not None else [1] * len(values))[order].cumsum()
    return float(v[np.searchsorted(w, q / 100 * w[-1])])


# -- one step --------------------------------------------------------------------------------------
@dataclass
class Step:
    label: str
    offered: float | None
    gateway_rate: float
    stored_rate: float
    db: tuple[float, float]
    live: tuple[float, float]
    cpu: dict[str, float]
    drain_s: float
    acknowledged_rate: float  # what the broker acknowledged to the simulators, per second of their run

    @property
    def sustained(self) -> bool:
        """The offered load got in (the simulators' pacing runs a few % short), the processor stored
        what the gateway forwarded, and the database p99 stayed under 2 s."""
        assert self.offered is not None
        return (
            self.gateway_rate >= 0.9 * self.offered
            and self.stored_rate >= 0.95 * self.gateway_rate
            and self.db[1] < 2.0
        )


def counts_file(stack: StackSettings, k: int) -> Path:
    return stack.state_dir / f"bench-e2e-simulator-{k}.json"


def start_simulators(stack: StackSettings, rate: float | None, count: int, devices: int) -> list[subprocess.Popen]:
    env = {**os.environ, **components.component_env(stack)}
    sims = []
    for k in range(count):
        counts_file(stack, k).unlink(missing_ok=True)
        # The same city at every rate, its devices a superset of the last rate's (simulators.city
        # numbers each kind of device from 1): a city's series, not every rate's, in the detectors.
        argv = [
            sys.executable,
            "-m",
            "cli",
            "simulate",
            "--city",
            f"e2e{k}",
            "--devices",
            str(devices),
            "--interval",
            str(TICK_S),
            "--seed",
            str(k + 1),
            "--anomalies-per-day",
            "0",
            "--counts",
            str(counts_file(stack, k)),
        ]
        if rate:
            argv += ["--rate", str(int(rate / count))]
        else:
            argv += ["--rate", "10000000"]  # as fast as the broker acknowledges
        sims.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return sims


def last_change(read: Callable[[], object], still_s: float, timeout_s: float = 600) -> float:
    """Poll `read` until its value has stayed the same for `still_s`; when it last changed (monotonic)."""
    started = value_since = time.monotonic()
    value = read()
    while time.monotonic() - value_since < still_s and time.monotonic() - started < timeout_s:
        time.sleep(0.25)
        if (now := read()) != value:
            value, value_since = now, time.monotonic()
    return value_since


def run_step(stack: StackSettings, token: str, rate: float | None, args: argparse.Namespace) -> Step:
    last_change(lambda: pipeline_counts(stack), still_s=2.0)  # no backlog from before: nothing moves for 2 s
    per_sim = (rate or 50_000) / args.simulators
    devices = max(PROBES, int(per_sim * TICK_S / READINGS_PER_DEVICE_TICK))
    sims = start_simulators(stack, rate, args.simulators, devices)
    probes = Probes(
        [f"e2e0-{kind}-{i:03d}" for kind in ("air-quality", "noise", "water-level") for i in range(1, PROBES // 3 + 1)]
    )
    try:
        _, stored0 = pipeline_counts(stack)
        deadline = time.monotonic() + 120
        while pipeline_counts(stack)[1] - stored0 < per_sim and time.monotonic() < deadline:
            time.sleep(0.5)  # the simulators have registered their devices and are publishing
        time.sleep(3)  # past the start-up transient
        threads = [
            threading.Thread(target=probes.poll_database, args=(stack,), daemon=True),
            threading.Thread(target=probes.follow_live_feed, args=(stack, token), daemon=True),
        ]
        for t in threads:
            t.start()
        pids = component_pids(stack, [s.pid for s in sims])
        cpu0, (out0, stored0), began = cpu_by_component(pids), pipeline_counts(stack), time.monotonic()
        time.sleep(args.seconds)
        cpu1, (out1, stored1), elapsed = cpu_by_component(pids), pipeline_counts(stack), time.monotonic() - began
        probes.stop.set()
    finally:
        stopped = time.monotonic()
        for s in sims:
            s.send_signal(signal.SIGTERM)
        for s in sims:
            s.wait(60)
    # Drain: how long after the simulators stop until the processor has stored the backlog: its
    # count unchanged for 3 s (one batch can take over a second to commit under load).
    drain_s = max(0.0, last_change(lambda: pipeline_counts(stack)[1], still_s=3.0) - stopped)
    cores = os.cpu_count() or 1
    return Step(
        label=f"{rate:,.0f}/s" if rate else "ceiling",
        offered=rate,
        gateway_rate=(out1 - out0) / elapsed,
        stored_rate=(stored1 - stored0) / elapsed,
        db=(
            weighted_percentile(probes.db_lags, probes.db_weights, 50),
            weighted_percentile(probes.db_lags, probes.db_weights, 99),
        ),
        live=(weighted_percentile(probes.live_lags, None, 50), weighted_percentile(probes.live_lags, None, 99)),
        cpu={name: (cpu1[name] - cpu0[name]) / (elapsed * cores) for name in cpu0},
        drain_s=drain_s,
        acknowledged_rate=sum(_acknowledged_rate(counts_file(stack, k)) for k in range(args.simulators)),
    )


def _acknowledged_rate(path: Path) -> float:
    sent = json.loads(path.read_text())
    seconds = (sent["last_ts_ms"] - sent["first_ts_ms"]) / 1000  # live mode: event time is wall time
    return sent["acknowledged_readings"] / seconds if seconds > 0 else 0.0


def report(step: Step) -> None:
    verdict = "" if step.offered is None else ("  sustained" if step.sustained else "  NOT sustained")
    say(
        f"{step.label:>10}  broker acks {step.acknowledged_rate:8,.0f}/s  gateway {step.gateway_rate:8,.0f}/s  "
        f"stored {step.stored_rate:8,.0f}/s  to DB p50 {step.db[0]:5.2f} s p99 {step.db[1]:5.2f} s  "
        f"live p50 {step.live[0]:5.2f} s p99 {step.live[1]:5.2f} s  drain {step.drain_s:4.1f} s{verdict}"
    )
    say("            CPU share of 2 cores: " + ", ".join(f"{k} {v:.0%}" for k, v in step.cpu.items()))


def forget_detector_state(stack: StackSettings) -> None:
    """Stop the processor and drop its detectors' checkpoints: it starts learning again from the next
    record, holding the series of this run's cities only. Carried over, the benchmark stack's state
    held every earlier benchmark's series (100,000 and more, 50 MB a partition), checkpointed every
    30 s inside the timed windows: what a city of that many devices costs, not the one simulated."""
    from processing.settings import ProcessorSettings

    procs.stop(stack, "processor")
    with psycopg.connect(stack.postgres_dsn) as conn:
        conn.execute("DELETE FROM detector_checkpoints WHERE consumer_group = %s", (ProcessorSettings().group_id,))


def ensure_components(stack: StackSettings) -> None:
    for name in ("gateway", "processor", "api"):
        components.start_component(stack, name)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            pipeline_counts(stack)
            if httpx.get(f"{stack.api_url}/health", timeout=5).status_code in (200, 503):
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("the gateway, processor or API did not come up; see .kota-bench/logs")


def operator_token(stack: StackSettings) -> str:
    with psycopg.connect(stack.postgres_dsn) as conn:
        user = accounts.User("bench-e2e", "admin", ())
        accounts.upsert_user(conn, user, actor="bench")
        return accounts.issue_token(conn, user.user_id, label="bench.e2e", actor="bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rates", default="5000,10000,20000,35000,50000", help="offered readings/s, comma-separated, in rising order"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring window per rate")
    parser.add_argument("--simulators", type=int, default=2, help="simulator processes")
    args = parser.parse_args()

    stack = start_bench_stack(say)
    from deploy import mqtt_access

    mqtt_access.unlock_devices(stack)
    forget_detector_state(stack)
    ensure_components(stack)
    token = operator_token(stack)
    say(
        f"{os.cpu_count()} cores; Mosquitto, Kafka, PostgreSQL, gateway, processor, API and "
        f"{args.simulators} simulators all on this machine"
    )
    steps = []
    for rate in [float(r) for r in args.rates.split(",")]:
        step = run_step(stack, token, rate, args)
        report(step)
        steps.append(step)
        if not step.sustained and step.stored_rate < 0.8 * step.gateway_rate:
            say("far behind: higher rates skipped")
            break
    ceiling = run_step(stack, token, None, args)
    report(ceiling)
    best = max((s for s in steps if s.sustained), key=lambda s: s.offered or 0, default=None)
    if best is None:
        say("no rate was sustained")
        return
    say(
        f"highest sustained rate: {best.offered:,.0f} readings/s (p99 to DB {best.db[1]:.2f} s, to live feed "
        f"{best.live[1]:.2f} s); baseline, the simulators' ceiling (broker acknowledgements as fast as they "
        f"come, same run): {ceiling.acknowledged_rate:,.0f}/s; sustained / ceiling = "
        f"{(best.offered or 0) / max(ceiling.acknowledged_rate, 1):.2f}"
    )
    say("goal: 50,000 readings/s with p99 under 2 s (ThingsBoard's published run: 33,333/s on 36 vCPUs)")


if __name__ == "__main__":
    sys.argv[0] = str(Path(PROJECT_ROOT, "bench", "e2e.py"))
    main()
