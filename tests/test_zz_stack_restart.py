"""`kota down` then `kota up` keeps stored data, and the pipeline resumes on its own.

Runs last (file name): it restarts the services under the running gateway and processor.
"""

import time

import pytest

from deploy import stack as local
from tests.helpers import mqtt_client, provision, publish, stored_readings, wait_for

pytestmark = pytest.mark.stack


def test_services_restart_keeps_data_and_pipeline_reconnects(pipeline):
    light = provision(pipeline, "street_light")
    now = int(time.time() * 1000)
    client = mqtt_client(pipeline)
    publish(client, light, {"ts": now - 5000, "values": {"powerState": 1, "powerConsumption": 118.0}})
    client.disconnect()
    wait_for(lambda: len(stored_readings(pipeline, light.device_id)) == 2, what="readings before restart")

    local.stop_services(pipeline, lambda m: None)
    local.start_services(pipeline, lambda m: None)

    assert len(stored_readings(pipeline, light.device_id)) == 2
    client = mqtt_client(pipeline)
    publish(client, light, {"ts": now, "values": {"powerState": 0, "powerConsumption": 0.0}})
    client.disconnect()
    wait_for(lambda: len(stored_readings(pipeline, light.device_id)) == 4, timeout_s=90,
             what="gateway and processor to reconnect and store new readings")
    assert stored_readings(pipeline, light.device_id)[-2:] == [(now, "powerConsumption", 0.0), (now, "powerState", 0.0)]
