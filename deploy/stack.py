"""The local stack as a whole: start, stop and report its services.

    Mosquitto      Debian package `mosquitto`          state/mosquitto/   port mqtt_port
    PostgreSQL 15  Debian package `postgresql-15`      state/postgres/    port postgres_port (own cluster)
    Apache Kafka   Maven Central via deploy/kafka/pom  state/kafka/       port kafka_port (KRaft, one node)

Every start is idempotent: a service already running is reported and left alone. Health checks
wait until the service really answers (a CONNACK, a query, a metadata response).
"""

from __future__ import annotations

import asyncio

from deploy import procs
from deploy.components import COMPONENTS
from deploy.install import install_missing
from deploy.kafka import kafka_answers, start_kafka
from deploy.mosquitto import mqtt_answers, start_mosquitto
from deploy.postgres import postgres_answers, postgres_running, start_postgres, stop_postgres
from deploy.procs import Say
from kota.settings import StackSettings


def start_services(stack: StackSettings, say: Say, *, open_devices: bool = True) -> None:
    install_missing(stack, say)
    start_mosquitto(stack, say, open_devices=open_devices)
    start_postgres(stack, say)
    start_kafka(stack, say)


def stop_services(stack: StackSettings, say: Say) -> None:
    if procs.stop(stack, "kafka", timeout_s=60):
        say("kafka stopped")
    if stop_postgres(stack):
        say("postgres stopped")
    procs.stop(stack, "broker-guard")
    if procs.stop(stack, "mosquitto"):
        say("mosquitto stopped")


def status_rows(stack: StackSettings) -> list[tuple[str, str, str]]:
    rows = [
        (
            "mosquitto",
            _state(procs.running_pid(stack, "mosquitto"), mqtt_answers(stack.mqtt_port)),
            f"mqtt://127.0.0.1:{stack.mqtt_port}",
        ),
        (
            "postgres",
            "running" if postgres_running(stack) and postgres_answers(stack) else "stopped",
            f"postgresql://{stack.postgres_user}@127.0.0.1:{stack.postgres_port}/{stack.database}",
        ),
        (
            "kafka",
            _state(
                procs.running_pid(stack, "kafka"),
                bool(procs.running_pid(stack, "kafka")) and asyncio.run(kafka_answers(stack)),
            ),
            stack.kafka_bootstrap,
        ),
    ]
    for name in sorted({*COMPONENTS, *(p.stem for p in stack.run_dir.glob("*.pid"))} - {"mosquitto", "kafka"}):
        pid = procs.running_pid(stack, name)
        rows.append((name, f"running (pid {pid})" if pid else "stopped", str(procs.log_file(stack, name))))
    return rows


def _state(pid: int | None, answers: bool) -> str:
    if pid and answers:
        return f"running (pid {pid})"
    if pid:
        return f"starting or not answering (pid {pid})"
    return "stopped"
