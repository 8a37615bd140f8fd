"""`kota down` then `kota up` keeps stored data, and the pipeline comes back by itself.

It stops and starts the whole test stack with the real commands, and leaves it as the session's
fixtures made it: services up, gateway, processor and API running (under the same accounts), the
registry and stored data kept. So it needs no place in the order: the tests after it find the same stack.
"""

import os
import subprocess
import sys
import time

import pytest

from deploy.components import component_env
from tests.helpers import provision, send, stored_readings, wait_for

pytestmark = pytest.mark.stack


def kota(stack, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **component_env(stack)},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_kota_down_then_up_keeps_data_and_the_pipeline_resumes(pipeline):
    light = provision(pipeline, "street_light")
    now = int(time.time() * 1000)
    send(pipeline, light, {"ts": now - 5000, "values": {"powerState": 1, "powerConsumption": 118.0}})
    wait_for(lambda: len(stored_readings(pipeline, light.device_id)) == 2, what="readings before restart")

    down = kota(pipeline, "down")
    assert "postgres stopped" in down and "kafka stopped" in down and "processor stopped" in down
    up = kota(pipeline, "up", "--no-simulator")
    assert "postgres started" in up and "up in" in up

    assert len(stored_readings(pipeline, light.device_id)) == 2
    send(pipeline, light, {"ts": now, "values": {"powerState": 0, "powerConsumption": 0.0}})
    wait_for(
        lambda: len(stored_readings(pipeline, light.device_id)) == 4, timeout_s=90, what="new readings after kota up"
    )
    assert stored_readings(pipeline, light.device_id)[-2:] == [(now, "powerConsumption", 0.0), (now, "powerState", 0.0)]
    assert "already running" in kota(pipeline, "up", "--no-simulator")  # idempotent
