"""Faults under a steady simulated stream, counted by the simulator itself.

Each test runs the tests' standard simulated city (tests.helpers.simulate: 24 devices, three
simulated hours, all three message forms, paced at a few thousand readings/s so the fault lands
mid-stream), breaks one component while it runs, and then checks three things against a clean
run of the same seed. Every reading the broker acknowledged is stored, once. The readings
are the clean run's. The minute aggregates equal the clean run's.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable

import pytest

from deploy import components, kafka, mosquitto, postgres, procs
from kota.settings import StackSettings
from tests.helpers import aggregated_count_in_city, city_result, simulate, unique_id, wait_for

pytestmark = pytest.mark.stack

RATE = 4000  # readings/s: the standard city (~29k readings) then takes about 7 s


@pytest.fixture(scope="module")
def start() -> dt.datetime:
    return (dt.datetime.now(dt.UTC) - dt.timedelta(hours=4)).replace(second=0, microsecond=0)


@pytest.fixture(scope="module")
def clean_run(pipeline: StackSettings, start: dt.datetime, tmp_path_factory: pytest.TempPathFactory) -> dict:
    city = unique_id("clean")
    simulate(pipeline, city, start, tmp_path_factory.mktemp("clean"), rate=RATE)
    return city_result(pipeline, city)


def after_first_readings(stack: StackSettings, city: str, fault: Callable[[], None]) -> Callable[[], None]:
    """A `during` for simulate(): wait until the stream is under way, then break something."""

    def during() -> None:
        wait_for(lambda: aggregated_count_in_city(stack, city) > 2000, timeout_s=60, what="the stream to be under way")
        fault()

    return during


def run_with_fault(stack: StackSettings, start: dt.datetime, folder, clean: dict, fault: Callable[[], None]) -> None:
    city = unique_id("fault")
    sent = simulate(stack, city, start, folder, rate=RATE, during=after_first_readings(stack, city, fault))
    stored = city_result(stack, city)
    assert len(stored["readings"]) == sent == len(clean["readings"]), "every acknowledged reading, once"
    assert stored["readings"] == clean["readings"]
    assert stored["minutes"] == clean["minutes"], "minute aggregates differ from a clean run"


@pytest.mark.parametrize("component", ["gateway", "processor"])
def test_kill_minus_9(pipeline, start, tmp_path, clean_run, component):
    def fault() -> None:
        assert procs.stop(pipeline, component, hard=True)
        time.sleep(1.0)
        components.start_component(pipeline, component)

    run_with_fault(pipeline, start, tmp_path, clean_run, fault)


def test_restart_of_kafka(pipeline, start, tmp_path, clean_run):
    def fault() -> None:
        assert procs.stop(pipeline, "kafka", timeout_s=60)
        kafka.start_kafka(pipeline, lambda m: None)

    run_with_fault(pipeline, start, tmp_path, clean_run, fault)


def test_restart_of_mosquitto(pipeline, start, tmp_path, clean_run):
    def fault() -> None:
        assert procs.stop(pipeline, "mosquitto")
        mosquitto.start_mosquitto(pipeline, lambda m: None)

    run_with_fault(pipeline, start, tmp_path, clean_run, fault)


def test_restart_of_postgresql(pipeline, start, tmp_path, clean_run):
    def fault() -> None:
        assert postgres.stop_postgres(pipeline)
        postgres.start_postgres(pipeline, lambda m: None)

    run_with_fault(pipeline, start, tmp_path, clean_run, fault)


def test_database_down_for_a_while_makes_the_processor_wait_and_retry(pipeline, start, tmp_path, clean_run):
    """Down for longer than the stream lasts: the processor holds its batch and retries until the
    database is back, then stores everything."""
    log = procs.log_file(pipeline, "processor")
    log_size = log.stat().st_size
    done = threading.Event()

    def fault() -> None:
        assert postgres.stop_postgres(pipeline)
        time.sleep(12.0)
        postgres.start_postgres(pipeline, lambda m: None)
        done.set()

    run_with_fault(pipeline, start, tmp_path, clean_run, fault)
    assert done.is_set()
    with log.open() as f:
        f.seek(log_size)
        assert "database unavailable" in f.read(), "the processor said it was waiting for the database"
    assert procs.running_pid(pipeline, "processor"), "and it did not exit"


def test_the_api_answers_from_its_first_request_after_a_postgresql_restart(pipeline, api):
    for _ in range(3):  # fill the API's pool with connections that the restart will break
        assert api.get("/api/v1/cities").status_code == 200
    assert postgres.stop_postgres(pipeline)
    postgres.start_postgres(pipeline, lambda m: None)
    answers = [api.get("/api/v1/cities").status_code for _ in range(10)]
    assert answers == [200] * 10, answers
    assert api.get("/health").status_code == 200
