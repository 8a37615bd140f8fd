"""The project's own processes on the local stack (gateway, processor, API, simulator), and restarting
the gateway with a new broker password."""

from __future__ import annotations

import sys
import time

from deploy import kafka_access, mqtt_access, postgres_access, procs
from deploy.folders import mosquitto_dir
from deploy.procs import Say
from kota.settings import PROJECT_ROOT, StackSettings, ensure_secret

COMPONENTS = ("gateway", "processor", "api", "notifier", "simulator", "commander")


def component_env(stack: StackSettings, component: str | None = None) -> dict[str, str]:
    """Children see exactly the stack this process sees, whatever set it, and the ingest account;
    a `component` (gateway, processor, api) also its own Kafka user (deploy/kafka_access.py)."""
    env = {
        "KOTA_STATE_DIR": str(stack.state_dir),
        "KOTA_PORT_OFFSET": str(stack.port_offset),
        "KOTA_GATEWAY_MQTT_PASSWORD": mqtt_access.ingest_password(stack, mosquitto_dir(stack)),
        "PYTHONUNBUFFERED": "1",
    }
    if component in kafka_access.COMPONENT_USERS:
        user = kafka_access.COMPONENT_USERS[component]
        env |= {
            "KOTA_KAFKA_USERNAME": user,
            "KOTA_KAFKA_PASSWORD": ensure_secret(stack.state_dir, kafka_access.password_file(user)),
        }
    if component == "commander":  # its own broker account (deploy/mqtt_access.py)
        env["KOTA_COMMANDER_MQTT_PASSWORD"] = mqtt_access.commander_password(mosquitto_dir(stack))
    # Its own PostgreSQL role too (deploy/postgres_access.py); the others are kota_owner.
    env |= postgres_access.component_env(stack, component)
    return env


def start_component(
    stack: StackSettings, name: str, *args: str, instance: str | None = None, env: dict[str, str] | None = None
) -> int:
    """Start `kota <name> <args>` in the background unless it already runs; return its pid."""
    proc_name = instance or name
    pid = procs.running_pid(stack, proc_name)
    if pid:
        return pid
    argv = [sys.executable, "-m", "cli", name, *args]
    return procs.spawn(stack, proc_name, argv, env={**component_env(stack, name), **(env or {})}, cwd=PROJECT_ROOT)


def api_healthy(stack: StackSettings) -> bool:
    """The ops API answers /health with 200: it runs and every dependency answers it."""
    import httpx

    try:
        return httpx.get(f"{stack.api_url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def rotate_ingest_password(stack: StackSettings, say: Say = print, timeout_s: float = 60.0) -> None:
    """On the local stack: a new ingest password, without acknowledging a reading into nowhere.

    Devices are locked out in the same reload that changes the password (it breaks the gateways'
    sessions until they log in again), the gateway is restarted with the new one, and once it has
    logged in the new password is the accepted one: the guard lets devices in again."""
    mqtt_access.new_ingest_password(stack)
    say("ingest password changed; devices locked out until the gateway has logged in with it")
    restart_gateway_and_accept(stack, say, timeout_s)


def restart_gateway_and_accept(stack: StackSettings, say: Say = print, timeout_s: float = 60.0) -> None:
    """After the ingest password changed (`ingest_held`): restart the local gateway with it and, once
    it has logged in, make it the accepted one, so the guard lets devices in again."""
    log = procs.log_file(stack, "gateway")
    procs.stop(stack, "gateway")
    start = log.stat().st_size if log.exists() else 0
    start_component(stack, "gateway")
    deadline = time.monotonic() + timeout_s
    while b"MQTT connected" not in (log.read_bytes()[start:] if log.exists() else b""):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway did not log in within {timeout_s:.0f} s; devices stay locked out")
        time.sleep(0.2)
    mqtt_access.accept_ingest_password(mosquitto_dir(stack))
    say("the gateway logged in with the new password; the broker guard lets devices in again")
