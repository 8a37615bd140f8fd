"""Mosquitto enforces the registry: own topics only, disabled devices refused, TLS and client certificates."""

import threading
import time

import psycopg
import pytest

from deploy import mqtt_access, pki
from deploy.folders import mosquitto_dir
from kota.contract import MQTT_TOPIC_ROOT, device_telemetry_topic
from kota.mqtt import MqttLogin, connect
from kota.registry import set_enabled
from tests.helpers import PASSWORDS, mqtt_client, provision, publish, stored_readings, unique_id, wait_for

pytestmark = pytest.mark.stack


def _platform_listener(pipeline, heard: list[str]):
    """A subscriber on the ingest listener, as the gateways are: what the broker delivers to them."""
    platform = connect(
        MqttLogin(
            pipeline.mqtt_ingest_port,
            mqtt_access.INGEST_USER,
            mqtt_access.ingest_password(pipeline, mosquitto_dir(pipeline)),
        ),
        unique_id("t"),
    )
    platform.on_message = lambda _c, _u, m: heard.append(m.topic)
    platform.subscribe(f"{MQTT_TOPIC_ROOT}/#", qos=1)
    time.sleep(0.5)
    return platform


def test_device_a_cannot_publish_as_device_b(pipeline):
    # MQTT 3.1.1 has no negative PUBACK: Mosquitto 2.0.11 (per_listener_settings) acknowledges a
    # publish its ACL denies and drops it, without disconnecting. What matters: it reaches no one.
    a, b = provision(pipeline, "noise"), provision(pipeline, "noise")
    heard: list[str] = []
    platform = _platform_listener(pipeline, heard)
    client = mqtt_client(pipeline, a.device_id)
    try:
        publish(client, b, {"LAeq": 99.0})  # acknowledged and dropped (ACL)
        publish(client, a, {"LAeq": 51.0})  # the control: A's own topic works
    finally:
        client.disconnect()
    wait_for(lambda: stored_readings(pipeline, a.device_id), what="device A's own reading")
    time.sleep(1.0)
    platform.disconnect()
    assert stored_readings(pipeline, b.device_id) == []
    assert [t for t in heard if a.device_id in t or b.device_id in t] == [
        device_telemetry_topic(a.city, a.domain, a.device_id)
    ]


def test_disabled_device_is_refused_and_enabled_again_accepted(pipeline):
    device = provision(pipeline, "water_meter")
    mqtt_client(pipeline, device.device_id).disconnect()  # works while enabled
    with psycopg.connect(pipeline.postgres_dsn) as conn:
        set_enabled(conn, device.device_id, False)
    mqtt_access.sync(pipeline)
    with pytest.raises(ConnectionError, match="not authori[sz]ed|Not authorized|refused"):
        connect(
            MqttLogin(pipeline.mqtt_port, device.device_id, PASSWORDS[device.device_id]), unique_id("t"), timeout_s=3
        )


def test_wrong_password_and_anonymous_are_refused(pipeline):
    device = provision(pipeline, "noise")
    with pytest.raises(ConnectionError):
        connect(MqttLogin(pipeline.mqtt_port, device.device_id, "not-the-password"), unique_id("t"), timeout_s=3)
    with pytest.raises(ConnectionError):
        connect(MqttLogin(pipeline.mqtt_port), unique_id("t"), timeout_s=3)


def test_nobody_but_the_platform_reads_another_citys_traffic(pipeline):
    spy = provision(pipeline, "traffic_corridor", city="kotaspy")
    victim = provision(pipeline, "traffic_corridor", city="kotavictim")
    heard: dict[str, list[str]] = {"spy": [], "platform": []}
    got_platform = threading.Event()

    spy_client = mqtt_client(pipeline, spy.device_id)
    spy_client.on_message = lambda _c, _u, m: heard["spy"].append(m.topic)
    spy_client.subscribe(f"{MQTT_TOPIC_ROOT}/#", qos=1)
    platform = connect(
        MqttLogin(
            pipeline.mqtt_ingest_port,
            mqtt_access.INGEST_USER,
            mqtt_access.ingest_password(pipeline, mosquitto_dir(pipeline)),
        ),
        unique_id("t"),
    )

    def on_platform(_c, _u, m) -> None:
        heard["platform"].append(m.topic)
        got_platform.set()

    platform.on_message = on_platform
    platform.subscribe(device_telemetry_topic(victim.city, victim.domain, victim.device_id), qos=1)
    time.sleep(0.5)
    victim_client = mqtt_client(pipeline, victim.device_id)
    try:
        publish(victim_client, victim, {"occupancy": 0.3})
        assert got_platform.wait(10), "the control subscriber heard nothing"
        time.sleep(0.5)
    finally:
        for c in (victim_client, spy_client, platform):
            c.disconnect()
    assert heard["spy"] == []


def test_tls_with_password(pipeline):
    device = provision(pipeline, "noise")
    ca = str(pki.ensure_ca(pipeline).cert)
    client = connect(
        MqttLogin(pipeline.mqtt_tls_port, device.device_id, PASSWORDS[device.device_id], ca_file=ca), unique_id("t")
    )
    try:
        publish(client, device, {"LAeq": 62.5})
    finally:
        client.disconnect()
    assert wait_for(lambda: stored_readings(pipeline, device.device_id), what="reading sent over TLS")[0][1:] == (
        "LAeq",
        62.5,
    )


def test_client_certificate_identifies_the_device_and_only_that_device(pipeline, tmp_path):
    a, b = provision(pipeline, "noise"), provision(pipeline, "noise")
    cert = pki.issue(pipeline, a.device_id, tmp_path)
    ca = str(pki.ensure_ca(pipeline).cert)
    login = MqttLogin(pipeline.mqtt_mtls_port, ca_file=ca, cert_file=str(cert.cert), key_file=str(cert.key))
    heard: list[str] = []
    platform = _platform_listener(pipeline, heard)
    client = connect(login, unique_id("t"))
    try:
        publish(client, b, {"LAeq": 99.0})  # as B: acknowledged, and dropped by the ACL of A's identity
        publish(client, a, {"LAeq": 48.0})
    finally:
        client.disconnect()
    wait_for(lambda: stored_readings(pipeline, a.device_id), what="reading sent with A's certificate")
    time.sleep(1.0)
    platform.disconnect()
    assert [t for t in heard if a.device_id in t or b.device_id in t] == [
        device_telemetry_topic(a.city, a.domain, a.device_id)
    ]
    assert [(m, v) for _, m, v in stored_readings(pipeline, a.device_id)] == [("LAeq", 48.0)]
    assert stored_readings(pipeline, b.device_id) == []


def test_mutual_tls_listener_refuses_a_client_without_certificate(pipeline):
    device = provision(pipeline, "noise")
    ca = str(pki.ensure_ca(pipeline).cert)
    with pytest.raises((ConnectionError, OSError)):
        connect(
            MqttLogin(pipeline.mqtt_mtls_port, device.device_id, PASSWORDS[device.device_id], ca_file=ca),
            unique_id("t"),
            timeout_s=3,
        )
