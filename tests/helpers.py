"""Small helpers for tests against the real stack."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import psycopg

from deploy import components, mqtt_access, procs
from kota.contract import device_telemetry_topic
from kota.mqtt import MqttLogin, connect
from kota.registry import Device, Gateway, new_device, new_password, upsert_devices, upsert_gateway
from kota.settings import StackSettings

T = TypeVar("T")


def start_second_processor(stack: StackSettings, instance: str, env: dict[str, str] | None = None) -> None:
    """Start another processor as `instance` and wait until Kafka has given it partitions of its own.
    Only what its log gained since this start counts: the log is appended to, and an earlier test's
    instance of the same name left "assigned partitions [0, 2]" in it (CI: the wait passed at once,
    the second city was stored before the new instance joined, and it stored nothing)."""
    log = procs.log_file(stack, instance)
    start = log.stat().st_size if log.exists() else 0
    components.start_component(stack, "processor", instance=instance, env=env)

    def has_partitions() -> bool:
        with open(log, "rb") as f:
            f.seek(start)
            assignments = [
                line for line in f.read().decode(errors="replace").splitlines() if "assigned partitions [" in line
            ]
        return bool(assignments) and "assigned partitions []" not in assignments[-1]

    wait_for(has_partitions, timeout_s=60, what=f"{instance} to get partitions")


def free_port() -> int:
    """A TCP port nothing listens on now, for a second instance of something."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_for(check: Callable[[], T], *, timeout_s: float = 30.0, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail with `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    last: T = check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(0.2)
        last = check()
    return last


PASSWORDS: dict[str, str] = {}  # what the tests' integrators were told at provisioning


def provision(stack: StackSettings, device_type: str, city: str = "testkota", **kwargs: object) -> Device:
    """Register a device with a fresh password, as `kota devices add` does, and reload the broker."""
    device = new_device(unique_id(device_type.replace("_", "-")), city, device_type, **kwargs)
    PASSWORDS[device.device_id] = new_password()
    with psycopg.connect(stack.postgres_dsn) as conn:
        upsert_devices(conn, [device], {device.device_id: PASSWORDS[device.device_id]})
    mqtt_access.sync(stack)
    return device


def provision_gateway(stack: StackSettings, city: str = "testkota") -> Gateway:
    gateway = Gateway(unique_id("gw"), city)
    PASSWORDS[gateway.gateway_id] = new_password()
    with psycopg.connect(stack.postgres_dsn) as conn:
        upsert_gateway(conn, gateway, PASSWORDS[gateway.gateway_id])
    mqtt_access.sync(stack)
    return gateway


def mqtt_client(
    stack: StackSettings, username: str, *, client_id: str | None = None, clean_session: bool = True
) -> mqtt.Client:
    """A real MQTT client logged in as `username` with the password it was provisioned with."""
    return connect(
        MqttLogin(stack.mqtt_port, username, PASSWORDS[username]),
        client_id or unique_id("test"),
        clean_session=clean_session,
    )


def publish(client: mqtt.Client, device: Device, payload: object, *, topic: str | None = None) -> None:
    """Publish at QoS 1 and wait until the broker has acknowledged it."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    info = client.publish(topic or device_telemetry_topic(device.city, device.domain, device.device_id), body, qos=1)
    info.wait_for_publish(timeout=10)
    assert info.is_published(), "broker did not acknowledge the publish"


def send(stack: StackSettings, device: Device, payload: object) -> None:
    """Connect as the device, publish one message at QoS 1 (acknowledged), disconnect."""
    client = mqtt_client(stack, device.device_id)
    try:
        publish(client, device, payload)
    finally:
        client.disconnect()


def stored_readings(stack: StackSettings, device_id: str) -> list[tuple[int, str, float]]:
    """(epoch ms, metric, value) of every stored reading of a device, oldest first."""
    with psycopg.connect(stack.postgres_dsn) as conn:
        rows = conn.execute(
            "SELECT (extract(epoch FROM ts) * 1000)::bigint, metric, value FROM readings "
            "WHERE device_id = %s ORDER BY ts, metric",
            (device_id,),
        ).fetchall()
    return [(int(ts), metric, value) for ts, metric, value in rows]


def stored_count_in_city(stack: StackSettings, city: str) -> int:
    """How many readings are stored for the devices of one city."""
    [(n,)] = query(stack, "SELECT count(*) FROM readings r JOIN devices d USING (device_id) WHERE d.city = %s", (city,))
    return int(n)


def aggregated_count_in_city(stack: StackSettings, city: str) -> int:
    """How many readings the one-minute aggregates of a city's devices count. The processor writes them
    in the transaction that stores the readings, from exactly the rows it added, so this equals
    stored_count_in_city at every moment; it is what tests poll, being cheap: counting the readings
    themselves took 20-140 ms a poll on the test database, CPU taken from the stack under test."""
    [(n,)] = query(
        stack, "SELECT coalesce(sum(a.n), 0) FROM agg_1m a JOIN devices d USING (device_id) WHERE d.city = %s", (city,)
    )
    return int(n)


def wait_for_stored(stack: StackSettings, city: str, at_least: int, *, timeout_s: float, what: str) -> int:
    """Poll (cheaply) until `at_least` readings of `city` are stored; then count the readings themselves."""
    wait_for(lambda: aggregated_count_in_city(stack, city) >= at_least, timeout_s=timeout_s, what=what)
    return stored_count_in_city(stack, city)


def kota_command(
    stack: StackSettings, *argv: str, env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `kota ARGV...` against the test stack."""
    return (
        [sys.executable, "-m", "cli", *argv],
        {
            **os.environ,
            "KOTA_STATE_DIR": str(stack.state_dir),
            "KOTA_PORT_OFFSET": str(stack.port_offset),
            **(env or {}),
        },
    )


def run_kota(
    stack: StackSettings, *argv: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`kota ARGV...` against the test stack, as a user would run it."""
    command, full_env = kota_command(stack, *argv, env=env)
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=timeout)


def kota_ok(stack: StackSettings, *argv: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """`kota ARGV...` that must succeed: what it printed."""
    result = run_kota(stack, *argv, env=env, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


AGG_COLUMNS = "bucket, n, sum, sum_sq, min, max, first_ts, first_value, last_ts, last_value"


def stored_minute_aggregates(stack: StackSettings, device_id: str, table: str = "agg_1m") -> list[tuple]:
    """The partials of a device in an aggregate table (agg_1m, agg_1h or agg_1d), rounded for comparison."""
    with psycopg.connect(stack.postgres_dsn) as conn:
        rows = conn.execute(
            f"SELECT metric, {AGG_COLUMNS} FROM {table} WHERE device_id = %s "  # noqa: S608
            "ORDER BY metric, bucket",
            (device_id,),
        ).fetchall()
    return [_rounded(r) for r in rows]


def minute_aggregates_from_readings(stack: StackSettings, device_id: str, width: str = "1 minute") -> list[tuple]:
    """The same partials computed from scratch from the stored raw readings: what a clean run gives."""
    with psycopg.connect(stack.postgres_dsn) as conn:
        rows = conn.execute(
            """SELECT metric, date_bin(%s::interval, ts, timestamptz 'epoch') AS bucket, count(*), sum(value),
                      sum(value * value), min(value), max(value), min(ts), (array_agg(value ORDER BY ts))[1],
                      max(ts), (array_agg(value ORDER BY ts DESC))[1]
               FROM readings WHERE device_id = %s GROUP BY metric, bucket ORDER BY metric, bucket""",
            (width, device_id),
        ).fetchall()
    return [_rounded(r) for r in rows]


def _rounded(row: tuple) -> tuple:
    return tuple(round(v, 6) if isinstance(v, float) else v for v in row)


def query(stack: StackSettings, sql: str, params: tuple | dict | None = None) -> list[tuple]:
    with psycopg.connect(stack.postgres_dsn) as conn:
        return conn.execute(sql.encode(), params).fetchall()


def publish_series(
    stack: StackSettings, device: Device, metric: str, points: list[tuple[int, float]], per_message: int = 100
) -> None:
    """Publish (epoch ms, value) points of one metric, `per_message` to a message, in order."""
    client = mqtt_client(stack, device.device_id)
    try:
        for start in range(0, len(points), per_message):
            publish(
                client, device, [{"ts": ts, "values": {metric: v}} for ts, v in points[start : start + per_message]]
            )
    finally:
        client.disconnect()


# -- simulated cities, for scale-out and fault tests -------------------------------------------
SIMULATION = ("--devices", "24", "--seed", "5", "--hours", "3", "--interval", "30")


def simulate(
    stack: StackSettings,
    city: str,
    start: dt.datetime,
    folder: Path,
    *,
    rate: int | None = None,
    during: Callable[[], None] | None = None,
    extra: tuple[str, ...] = (),
) -> int:
    """`kota simulate` of the tests' standard city (3 simulated hours from `start`) under the name
    `city`; `during` breaks something while it runs. Wait until every acknowledged reading is
    stored; return how many that is (from the simulator's own count)."""
    counts = folder / f"{city}-counts.json"
    pace = ("--rate", str(rate)) if rate else ()
    argv, env = kota_command(
        stack,
        "simulate",
        "--city",
        city,
        *SIMULATION,
        "--start",
        start.isoformat(),
        "--labels",
        str(folder / f"{city}-labels.json"),
        "--counts",
        str(counts),
        *pace,
        *extra,
    )
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as sim:
        if during is not None:
            during()
        output = sim.communicate(timeout=600)[0]
    assert sim.returncode == 0, output[-3000:]
    sent = json.loads(counts.read_text())
    assert sent["acknowledged_readings"] == sent["readings"], sent
    # Only the cheap poll: callers compare the readings themselves (city_result) afterwards.
    wait_for(
        lambda: aggregated_count_in_city(stack, city) >= sent["readings"],
        timeout_s=240,
        what=f"every acknowledged reading of {city}",
    )
    time.sleep(1.0)  # would anything arrive twice?
    return int(sent["readings"])


def city_result(stack: StackSettings, city: str) -> dict[str, list[tuple]]:
    """What a city stored, with the city's name taken out of device ids: comparable across runs."""
    cut = len(city) + 2
    readings = query(
        stack,
        "SELECT substr(device_id, %s), metric, ts, value FROM readings r "
        "JOIN devices d USING (device_id) WHERE d.city = %s",
        (cut, city),
    )
    minutes = query(
        stack,
        "SELECT substr(device_id, %s), metric, bucket, n, round(sum::numeric, 6), min, max, "
        "first_ts, last_ts FROM agg_1m a JOIN devices d USING (device_id) WHERE d.city = %s",
        (cut, city),
    )
    # Dropout anomalies depend on wall-clock silence, not on the stream: not comparable between runs.
    anomalies = query(
        stack,
        "SELECT substr(device_id, %s), metric, ts, reason FROM anomalies a "
        "JOIN devices d USING (device_id) WHERE d.city = %s AND reason <> 'dropout'",
        (cut, city),
    )
    return {"readings": sorted(readings), "minutes": sorted(minutes), "anomalies": sorted(anomalies)}


def record_page_errors(page: Any, errors: list[str]) -> None:
    """Collect into `errors` a browser page's script errors and what the API's
    Content-Security-Policy refused it (the policy must allow everything the page does)."""
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
