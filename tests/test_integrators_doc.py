"""Every shell block of docs/integrators.md runs, in order, against the real stack, and does what it says."""

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.components import component_env
from kota.settings import PROJECT_ROOT
from tests.helpers import query, stored_readings, wait_for
from tests.test_end_to_end import _dead_letters_for

pytestmark = pytest.mark.stack

DOC = PROJECT_ROOT / "docs" / "integrators.md"


def shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_guide_has_examples_for_every_payload_form():
    text = "\n".join(shell_blocks())
    for needle in ("/telemetry", "/senml", "/gateway/", "--cafile", "--cert", "kota deadletters", "/command/reply"):
        assert needle in text


def test_every_example_in_the_integrators_guide_works(pipeline):
    started_ms = int(time.time() * 1000)
    env = {
        **os.environ,
        **component_env(pipeline),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "KOTA_MQTT_PORT": str(pipeline.mqtt_port),
        "KOTA_MQTT_TLS_PORT": str(pipeline.mqtt_tls_port),
        "KOTA_MQTT_MTLS_PORT": str(pipeline.mqtt_mtls_port),
        "KOTA_API": pipeline.api_url,
    }
    script = "set -euo pipefail\n" + "\n".join(shell_blocks())
    result = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"out_of_range\s+kota/bandung/environment/bandung-aq-101/telemetry\s+pm25 = -4", result.stdout)
    # The API's view of the same refusal, for the integrator's token.
    assert '"reasons":{"out_of_range":1}' in result.stdout
    assert '"message":"pm25 = -4 is outside [0, 2000] ug/m3"' in result.stdout

    def since_start(device: str) -> list[tuple[str, float]]:
        return sorted(
            (metric, value) for ts, metric, value in stored_readings(pipeline, device) if ts >= started_ms - 2000
        )

    def when_complete(device: str, count: int):
        return lambda: (got := since_start(device)) and len(got) >= count and got

    assert wait_for(when_complete("bandung-aq-101", 5), what="air-quality values") == [
        ("pm10", 40.0),
        ("pm10", 48.0),
        ("pm25", 31.5),
        ("relativeHumidity", 71.0),
        ("temperature", 27.5),
    ]
    # 92 cm as JSON, and 1.62 m as SenML converted to centimetres
    assert wait_for(when_complete("bandung-gate-101", 2), what="water levels") == [
        ("currentLevel", 92.0),
        ("currentLevel", 162.0),
    ]
    assert wait_for(when_complete("bandung-corridor-101", 2), what="the gateway's device") == [
        ("averageVehicleSpeed", 23.5),
        ("occupancy", 0.61),
    ]
    letters = asyncio.run(
        _dead_letters_for(pipeline, "kota/bandung/environment/bandung-aq-101/telemetry", 1, since_ms=started_ms)
    )
    assert [letter["reason"] for letter in letters] == ["out_of_range"]
    # The street light of section 9 took its command and answered: the platform recorded the result.
    assert wait_for(
        lambda: (
            query(
                pipeline,
                "SELECT status, result FROM device_commands WHERE device_id = 'bandung-light-101' AND command = 'dim' "
                "AND created_at >= to_timestamp(%s / 1000.0) ORDER BY created_at DESC LIMIT 1",
                (started_ms - 2000,),
            )
            == [("succeeded", {"level": 40})]
        ),
        what="the light's command to succeed",
    )
