"""deploy/compose and deploy/k8s cannot run here (no Docker engine, no cluster): these tests keep
them parseable and consistent with the code and the local stack instead.

What they catch: a KOTA_* variable no settings class reads (a typo runs silently with the default),
a command kota does not have, a probe on a port or path nothing serves, topics or versions that
drifted from kota/contract.py and deploy/kafka/pom.xml, and broker-access pointed at files the
broker does not read.
"""

from __future__ import annotations

import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from deploy.stack import postgres_bin
from ingest.gateway import GatewaySettings
from kota.cli import build_parser
from kota.contract import DEADLETTER_TOPIC, READINGS_TOPIC
from kota.settings import PROJECT_ROOT, StackSettings
from ops_api.settings import ApiSettings
from processing.processor import ProcessorSettings

DEPLOY = PROJECT_ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "k8s"
SETTINGS: tuple[type[BaseSettings], ...] = (StackSettings, GatewaySettings, ProcessorSettings, ApiSettings)


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def k8s_env() -> dict[str, str]:
    (config,) = [d for d in k8s_documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kota-env"]
    return config["data"]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"] if "template" in doc.get("spec", {}) else {}
    return spec.get("initContainers", []) + spec.get("containers", [])


def kota_containers() -> list[tuple[str, dict[str, str], list[str], dict[str, Any]]]:
    """(name, environment, kota argv, container) for every container running the project image."""
    shared = k8s_env()
    found = []
    for doc in k8s_documents():
        for c in containers(doc):
            if c["image"].startswith("kotacerdas:"):
                env = {**shared, **{e["name"]: e.get("value", "<secret>") for e in c.get("env", [])}}
                found.append((f"k8s {doc['metadata']['name']}/{c['name']}", env, c["args"], c))
    for name, service in compose()["services"].items():
        if service.get("image", "").startswith("kotacerdas:"):
            found.append((f"compose {name}", service["environment"], service["command"], service))
    return found


def settings_for(env: dict[str, str]) -> dict[type[BaseSettings], BaseSettings]:
    values = {k: v for k, v in env.items() if "${" not in v and v != "<secret>"}
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in __import__("os").environ if k.startswith("KOTA_")]:
            mp.delenv(key)
        for key, value in values.items():
            mp.setenv(key, value)
        return {cls: cls() for cls in SETTINGS}


def test_every_file_parses_and_kustomization_lists_every_manifest():
    assert compose()["services"]
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert listed == on_disk
    kinds = {d["kind"] for d in k8s_documents()}
    assert {"Kafka", "KafkaNodePool", "KafkaTopic", "StatefulSet", "Deployment", "Job", "Service"} <= kinds
    # Placeholder secrets must never be applied with the rest.
    assert "Secret" not in kinds


def test_every_kota_variable_is_read_by_a_settings_class():
    known = {f"{cls.model_config['env_prefix']}{name}".upper() for cls in SETTINGS for name in cls.model_fields}
    for where, env, _argv, _c in kota_containers():
        unknown = {k for k in env if k.startswith("KOTA_")} - known
        assert not unknown, f"{where}: no settings class reads {sorted(unknown)}"


def test_every_container_command_is_a_kota_command():
    parser = build_parser()
    for where, _env, argv, _c in kota_containers():
        args = parser.parse_args(argv)  # exits (SystemExit) on an unknown command or option
        assert callable(args.func), where


def test_settings_in_containers_point_at_the_services_and_their_ports():
    services = compose()["services"]
    for where, env, _argv, _c in kota_containers():
        stack = settings_for(env)[StackSettings]
        assert stack.bind_host == "0.0.0.0" or where.startswith("compose"), f"{where} listens only on loopback"
        if where.startswith("compose"):
            assert {stack.mqtt_host, stack.kafka_host, stack.postgres_host} <= set(services), where
            assert stack.mqtt_port == 1883 and stack.kafka_port == 9092 and stack.postgres_port == 5432
        else:
            names = {d["metadata"]["name"] for d in k8s_documents() if d["kind"] == "Service"}
            assert {stack.mqtt_host, stack.postgres_host, stack.processor_host} <= names, where
            assert stack.kafka_host == "kota-kafka-bootstrap"  # Strimzi's <cluster>-kafka-bootstrap
    # The image itself listens on all interfaces (deploy/Dockerfile), for compose.
    assert "KOTA_BIND_HOST=0.0.0.0" in (DEPLOY / "Dockerfile").read_text()


def _probe_ports(container: dict[str, Any]) -> dict[str, int]:
    """Paths and ports the probes and health checks ask for."""
    probes: dict[str, int] = {}
    for key in ("readinessProbe", "livenessProbe"):
        probe = container.get(key, {})
        if "httpGet" in probe:
            probes[probe["httpGet"]["path"]] = probe["httpGet"]["port"]
        if "tcpSocket" in probe:
            probes["tcp"] = probe["tcpSocket"]["port"]
    check = " ".join(container.get("healthcheck", {}).get("test", []))
    for port, path in re.findall(r"http://127\.0\.0\.1:(\d+)(/\w+)", check):
        probes[path] = int(port)
    return probes


def test_health_probes_ask_the_port_and_path_the_process_serves():
    from ops_api.main import create_app

    api_paths = set(create_app(StackSettings()).openapi()["paths"])
    assert "/health" in api_paths
    unprobed = []
    for where, env, argv, container in kota_containers():
        stack = settings_for(env)[StackSettings]
        serves = {"gateway": {"/metrics": stack.gateway_metrics_port},
                  "processor": {"/metrics": stack.processor_metrics_port},
                  "api": {path: stack.api_port for path in api_paths} | {"tcp": stack.api_port}}.get(argv[0], {})
        probes = _probe_ports(container)
        for path, port in probes.items():
            assert serves.get(path) == port, f"{where}: probe {path} on {port}, but it serves {serves}"
        if serves and not probes:
            unprobed.append(where)
        # k8s: {containerPort: N}; compose: "host:container"
        ports = [p["containerPort"] if isinstance(p, dict) else int(p.split(":")[-1])
                 for p in container.get("ports", [])]
        assert set(ports) <= set(serves.values()), f"{where} exposes {ports}"
    assert not unprobed, f"long-running processes without a health check: {unprobed}"


def test_topics_partitions_and_consumers_agree_with_the_contract():
    topics = {d["spec"]["topicName"]: d["spec"] for d in k8s_documents() if d["kind"] == "KafkaTopic"}
    assert set(topics) == {READINGS_TOPIC, DEADLETTER_TOPIC}
    stack = settings_for(k8s_env())[StackSettings]
    assert topics[READINGS_TOPIC]["partitions"] == stack.kafka_partitions
    assert all(t["replicas"] == stack.kafka_replication for t in topics.values())
    processors = next(d for d in k8s_documents() if d["metadata"]["name"] == "kota-processor")
    assert processors["spec"]["replicas"] <= stack.kafka_partitions, "idle processors: more than partitions"
    kafka_nodes = next(d for d in k8s_documents() if d["kind"] == "KafkaNodePool")["spec"]["replicas"]
    assert stack.kafka_replication <= kafka_nodes
    compose_stack = settings_for(compose()["services"]["gateway"]["environment"])[StackSettings]
    assert compose()["services"]["processor"]["deploy"]["replicas"] <= compose_stack.kafka_partitions


def test_versions_match_the_local_stack():
    pom = ET.parse(DEPLOY / "kafka" / "pom.xml").getroot()
    kafka_version = pom.find("{http://maven.apache.org/POM/4.0.0}properties/"
                             "{http://maven.apache.org/POM/4.0.0}kafka.version").text
    postgres_major = postgres_bin().parent.name  # /usr/lib/postgresql/<major>/bin
    services = compose()["services"]
    assert services["kafka"]["image"] == f"apache/kafka:{kafka_version}"
    assert next(d for d in k8s_documents() if d["kind"] == "Kafka")["spec"]["kafka"]["version"] == kafka_version
    images = [services["timescaledb"]["image"]] + [c["image"] for d in k8s_documents() for c in containers(d)
                                                    if "timescaledb" in c["image"]]
    assert images and all(image.endswith(f"-pg{postgres_major}") for image in images)
    for image in [s["image"] for s in services.values()] + [c["image"] for d in k8s_documents()
                                                             for c in containers(d)]:
        assert ":" in image and not image.endswith(":latest"), f"{image} is not pinned"


def _kafka_properties_of_the_local_stack() -> dict[str, str]:
    from deploy.stack import write_kafka_config

    stack = StackSettings(state_dir=Path("/tmp/kota-deploy-check"))
    text = write_kafka_config(stack).read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_compose_kafka_settings_match_the_local_broker():
    local = _kafka_properties_of_the_local_stack()
    env = compose()["services"]["kafka"]["environment"]
    shared = {k[len("KAFKA_"):].lower().replace("_", "."): v for k, v in env.items()}
    for key in ("auto.create.topics.enable", "message.max.bytes", "log.retention.hours",
                "group.initial.rebalance.delay.ms"):
        assert shared[key] == local[key], key
    strimzi = next(d for d in k8s_documents() if d["kind"] == "Kafka")["spec"]["kafka"]["config"]
    for key in ("message.max.bytes", "log.retention.hours"):
        assert str(strimzi[key]) == local[key], key
    assert str(strimzi["auto.create.topics.enable"]).lower() == local["auto.create.topics.enable"]


def _directives(conf: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in conf.splitlines() if line.strip() and not line.startswith("#"))


def test_broker_access_writes_where_the_broker_reads_and_signals_its_pid_file():
    k8s_conf = next(d for d in k8s_documents() if d["metadata"]["name"] == "mosquitto-conf")["data"]["mosquitto.conf"]
    compose_conf = (DEPLOY / "compose" / "mosquitto.conf").read_text()
    assert _directives(k8s_conf) == _directives(compose_conf)
    conf = _directives(compose_conf)
    for where, env, argv, _c in kota_containers():
        if argv[0] != "broker-access":
            continue
        args = build_parser().parse_args(argv)
        assert conf["password_file"] == f"{args.folder}/passwd", where
        assert conf["acl_file"] == f"{args.folder}/acl", where
        assert conf["pid_file"] == args.broker_pid_file, where
        stack = settings_for(env)[StackSettings]
        assert conf["listener"] == str(stack.mqtt_port)
    assert conf["allow_anonymous"] == "false"
    # The local broker's settings that keep readings through a gateway outage hold here too.
    from deploy.stack import mosquitto_dir, write_mosquitto_config

    local = StackSettings(state_dir=Path("/tmp/kota-deploy-check"))
    write_mosquitto_config(local)
    local_conf = _directives((mosquitto_dir(local) / "mosquitto.conf").read_text())
    for key in ("persistence", "max_inflight_messages", "max_queued_messages", "max_queued_bytes",
                "max_packet_size", "per_listener_settings"):
        assert conf[key] == local_conf[key], key


def test_deploy_doc_names_every_file_and_command():
    doc = (PROJECT_ROOT / "docs" / "deploy.md").read_text()
    for path in ["deploy/compose/compose.yaml", "deploy/Dockerfile"] + [
            f"deploy/k8s/{p.name}" for p in K8S.glob("*.yaml")]:
        assert path in doc, path
    commands = re.findall(r"^    (kota .+)$", doc, re.M)  # the indented command lines
    assert commands
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])


# -- the broker-access sidecar against a real Mosquitto run with the compose configuration ------
@pytest.mark.stack
def test_broker_access_sidecar_keeps_a_separate_broker_in_step_with_the_registry(pipeline):
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    import psycopg

    from deploy.stack import component_env
    from kota.mqtt import MqttLogin, connack_code, connect, login_connect
    from kota.registry import registry_version, set_enabled
    from tests.helpers import PASSWORDS, free_port, provision, unique_id, wait_for

    port = free_port()
    # Not pytest's tmp_path: the broker drops to user mosquitto, which may not enter that.
    root = Path(tempfile.mkdtemp(prefix="kota-broker-access-", dir="/tmp"))
    os.chmod(root, 0o755)
    for sub in ("access", "run", "data"):
        (root / sub).mkdir()
        os.chmod(root / sub, 0o777)  # the official image's entrypoint hands /mosquitto to the broker
    conf = (DEPLOY / "compose" / "mosquitto.conf").read_text().replace("/mosquitto/", f"{root}/")
    conf = conf.replace("listener 1883", f"listener {port} 127.0.0.1")
    (root / "mosquitto.conf").write_text(conf + ("user mosquitto\n" if os.geteuid() == 0 else ""))
    # The sidecar reaches its broker as compose's KOTA_MQTT_HOST does: here, this test's broker.
    env = {**os.environ, **component_env(pipeline), "KOTA_GATEWAY_MQTT_PASSWORD": "ingest-secret",
           "KOTA_MQTT_BASE_PORT": str(port - pipeline.port_offset)}
    argv = [sys.executable, "-m", "kota.cli", "broker-access", "--folder", str(root / "access"),
            "--broker-pid-file", str(root / "run" / "mosquitto.pid")]
    subprocess.run(argv + ["--once"], env=env, check=True, timeout=60)  # access-init
    broker = subprocess.Popen(["mosquitto", "-c", str(root / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    sidecar_log = root / "sidecar.log"
    with sidecar_log.open("w") as log:
        sidecar = subprocess.Popen(argv + ["--every", "0.5"], env=env, stdout=log, stderr=subprocess.STDOUT)
    device = None
    try:
        wait_for(lambda: connack_code(port, login_connect(unique_id("c"), "kota-ingest", "ingest-secret")) == 0,
                 what="the broker to accept the ingest account")
        device = provision(pipeline, "noise")  # registered after both started
        login = MqttLogin(port, device.device_id, PASSWORDS[device.device_id])

        def accepted() -> bool:
            return connack_code(port, login_connect(unique_id("c"), login.username, login.password)) == 0

        wait_for(accepted, what="the sidecar to give the new device an account")
        connect(login, unique_id("c")).disconnect()  # paho, as a device would
        with psycopg.connect(pipeline.postgres_dsn) as conn:
            assert set_enabled(conn, device.device_id, False)
            disabled_version = registry_version(conn)
        wait_for(lambda: not accepted(), what="the sidecar to remove the disabled device")
        # The broker may refuse the device before the sidecar has seen its reload through (and said so).
        wait_for(lambda: f"registry version {disabled_version}" in sidecar_log.read_text(),
                 what="the sidecar to report the files for the disabled device")
    finally:
        if device is not None:
            with psycopg.connect(pipeline.postgres_dsn) as conn:
                set_enabled(conn, device.device_id, True)
        sidecar.terminate()
        broker.terminate()
        broker.wait(10)
        sidecar.wait(10)
        output = sidecar_log.read_text()
        shutil.rmtree(root, ignore_errors=True)
    assert output.count("broker access files written") >= 2, output
