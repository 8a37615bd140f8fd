"""`python -m processing` (`kota processor`): the processor as worker processes, one component.

One processor process and its database backend take turns: while a batch is written, the
processor waits; while it decodes and scores the next, the database waits, so one of two cores
sits idle. Two workers in the one consumer group share the readings partitions, each with its own
detectors, connection and transactions, as two `kota processor` instances do (the exactly-once
design already holds for them: tests/test_processor_scale.py), and keep both cores busy (the
figures are in docs/processing.md). The API serves with two worker processes for the same reason.

The parent does no stream work. It serves the workers' Prometheus counters on the processor's
metrics port (added up, multiprocess mode: one address for the API's health and for Prometheus
whatever the number of workers), starts the workers again if one dies, and stops them when told
to stop. A worker whose parent is gone stops too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from types import FrameType

from kota.logs import setup_logging
from kota.process import alive, run_until_signalled
from kota.settings import StackSettings
from processing.processor import run_processor
from processing.settings import ProcessorSettings

log = logging.getLogger("kota.processor")

WORKER_ENV = "KOTA_PROCESSOR_WORKER"  # set in a worker: its number, from 1
RESTART_WAIT_S = 1.0


def main() -> int:
    """The processor component: its workers when it has several (this process watches them), else
    the processor itself, until SIGTERM or SIGINT; the exit code."""
    number = worker_number()
    setup_logging(f"worker {number}" if number else None)
    stack, settings = StackSettings(), ProcessorSettings()
    if settings.workers > 1:
        return run_workers(stack, settings.workers, settings.metrics_enabled)

    async def run(stop: asyncio.Event) -> None:
        watch = asyncio.create_task(stop_when_orphaned(stop)) if number else None
        try:
            await run_processor(stack, settings, stop)
        finally:
            if watch is not None:
                watch.cancel()

    run_until_signalled(run)
    return 0


def run_workers(stack: StackSettings, workers: int, metrics_enabled: bool) -> int:
    """Run `workers` processor processes until SIGTERM or SIGINT; the exit code."""
    # Counters of every worker go to one folder of files, which /metrics adds up (a worker started
    # again writes a file of its own; the stopped one's counts stay). One folder for each processor
    # process: a second processor on this machine (tests/test_scale_out.py) emptied a shared one,
    # and the first processor's counts vanished from its /metrics. Folders of processors no longer
    # running are an earlier run's counts, and go.
    metrics_root = stack.run_dir / "processor-metrics"
    metrics_root.mkdir(parents=True, exist_ok=True)
    for old in metrics_root.iterdir():
        if old.name.isdigit() and alive(int(old.name)):
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    metrics_dir = metrics_root / str(os.getpid())
    metrics_dir.mkdir()
    if metrics_enabled:
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
        start_http_server(stack.processor_metrics_port, addr=stack.bind_host, registry=registry)

    def start(number: int) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            WORKER_ENV: str(number),
            "KOTA_PROCESSOR_WORKERS": "1",
            "KOTA_PROCESSOR_METRICS_ENABLED": "false",
        }
        return subprocess.Popen([sys.executable, "-m", "processing"], env=env)

    stopping: list[signal.Signals] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signal.Signals(signum))

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    running = {number: start(number) for number in range(1, workers + 1)}
    log.info("%d processor workers started (pids %s)", workers, [p.pid for p in running.values()])
    while not stopping:
        for number, proc in list(running.items()):
            code = proc.poll()
            if code is not None and not stopping:
                log.error(
                    "processor worker %d (pid %d) ended with %s; starting it again",
                    number,
                    proc.pid,
                    f"signal {-code}" if code < 0 else f"exit code {code}",
                )
                time.sleep(RESTART_WAIT_S)
                running[number] = start(number)
        time.sleep(0.2)
    log.info("%s received: stopping the processor workers", stopping[0].name)
    for proc in running.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    failed = 0
    for proc in running.values():
        failed |= proc.wait() not in (0, -signal.SIGTERM)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return int(failed)


def worker_number() -> int | None:
    """This process's worker number, or None when it is not one of run_workers' workers."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value else None


async def stop_when_orphaned(stop_event: asyncio.Event, every_s: float = 1.0) -> None:
    """Set `stop_event` once this worker's parent is gone (a kill -9 of the parent alone): a worker
    left behind would go on consuming beside the parent's replacement."""
    parent = os.getppid()
    while not stop_event.is_set():
        if os.getppid() != parent:
            log.warning("the processor's parent process %d is gone: stopping", parent)
            stop_event.set()
            return
        await asyncio.sleep(every_s)
