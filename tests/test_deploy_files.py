"""deploy/compose and deploy/k8s cannot run here (no Docker engine, no cluster): these tests keep
them parseable and consistent with the code and the local stack instead, and hold them to the
hardening of issue 20 (devices reach MQTT only over TLS, every service has its own account and
proves it, network policies refuse what is not needed).

What they catch: a KOTA_* variable no settings class reads (a typo runs silently with the default),
a command kota does not have, a probe on a port or path nothing serves, topics or versions that
drifted from kota/contract.py and deploy/kafka/pom.xml, broker-access pointed at files the broker
does not read, a plain MQTT port published to devices, an unbounded broker queue, a component
logging in as a superuser or with another's password, a Kafka listener without SASL or ACLs, a
pod reachable from where it should not be, and a password written into a manifest.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from cli.main import build_parser
from commander.settings import CommanderSettings
from deploy.install import postgres_bin
from ingest.settings import GatewaySettings
from kota.contract import DEADLETTER_TOPIC, READINGS_TOPIC
from kota.settings import PROJECT_ROOT, StackSettings
from notifier.settings import NotifierSettings
from ops_api.settings import ApiSettings
from processing.settings import ProcessorSettings

DEPLOY = PROJECT_ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
K8S = DEPLOY / "k8s"
SETTINGS: tuple[type[BaseSettings], ...] = (
    StackSettings,
    GatewaySettings,
    ProcessorSettings,
    ApiSettings,
    NotifierSettings,
    CommanderSettings,
)

# Who each project command logs in as: (PostgreSQL role, Kafka user; None: it uses no Kafka).
# broker-access reads the registry as the gateway does. The migrations run as the schema's owner,
# and in compose also create the topics as Kafka's admin (k8s: Strimzi's KafkaTopics).
ACCOUNTS = {
    "gateway": ("kota_gateway", "kota-gateway"),
    "processor": ("kota_processor", "kota-processor"),
    "api": ("kota_api", "kota-api"),
    "notifier": ("kota_notifier", None),
    "broker-access": ("kota_gateway", None),
    "migrate": ("kota_owner", "kota-admin"),
    "commander": ("kota_commander", None),
}
SUPERUSERS = {"postgres", "kota-admin"}
NOTIFICATIONS_KEY = "kota-notifications-key"  # k8s Secret; compose: one value in api.env and notifier.env
PARSER_LIMIT = GatewaySettings().max_payload_bytes
MQTT_OVERHEAD = 1024  # the largest PUBLISH header on top of the parser's payload limit, rounded up
DEVICE_TLS_PORTS = {8883, 8884}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def k8s_doc(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def k8s_env() -> dict[str, str]:
    return k8s_doc("ConfigMap", "kota-env")["data"]


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
        for key in [k for k in os.environ if k.startswith("KOTA_")]:
            mp.delenv(key)
        for key, value in values.items():
            mp.setenv(key, value)
        return {cls: cls() for cls in SETTINGS}


# -- Mosquitto configuration ---------------------------------------------------------------------
# Options that belong to the listener above them; with per_listener_settings true, the
# authentication options too (mosquitto.conf(5)).
LISTENER_OPTIONS = {
    "bind_interface",
    "cafile",
    "capath",
    "certfile",
    "keyfile",
    "ciphers",
    "ciphers_tls1.3",
    "crlfile",
    "dhparamfile",
    "http_dir",
    "max_connections",
    "max_qos",
    "max_topic_alias",
    "mount_point",
    "protocol",
    "psk_hint",
    "require_certificate",
    "socket_domain",
    "tls_version",
    "use_identity_as_username",
    "use_subject_as_username",
    "use_username_as_clientid",
}
REPEATABLE = {"log_dest", "log_type"}
PER_LISTENER_SECURITY = {
    "acl_file",
    "allow_anonymous",
    "allow_zero_length_clientid",
    "auth_plugin",
    "auto_id_prefix",
    "password_file",
    "plugin",
    "psk_file",
}


def mosquitto_conf(text: str) -> tuple[dict[str, str], dict[int, dict[str, str]]]:
    """(global options, {port: that listener's options}) of a mosquitto.conf."""
    lines = [line.split(None, 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    per_listener = any(k == "per_listener_settings" and v.strip() == "true" for k, v in lines)
    scoped = LISTENER_OPTIONS | (PER_LISTENER_SECURITY if per_listener else set())
    general: dict[str, str] = {}
    listeners: dict[int, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for key, value in lines:
        value = value.strip()
        if key == "listener":
            port, *bind = value.split()
            assert int(port) not in listeners, f"listener {port} twice"
            current = listeners[int(port)] = {"bind": bind[0] if bind else ""}
        elif key in scoped:
            assert current is not None, f"{key} before any listener"
            current[key] = value
        elif key in REPEATABLE and key in general:
            general[key] += f" {value}"
        else:
            assert key not in general, f"{key} twice"
            general[key] = value
    if not per_listener:  # the authentication options apply to every listener
        for options in listeners.values():
            options.update({k: v for k, v in general.items() if k in PER_LISTENER_SECURITY})
    return general, listeners


def compose_broker_conf() -> str:
    return (COMPOSE_DIR / "mosquitto.conf").read_text()


def k8s_broker_conf() -> str:
    return k8s_doc("ConfigMap", "mosquitto-conf")["data"]["mosquitto.conf"]


def broker_confs() -> dict[str, str]:
    return {"compose": compose_broker_conf(), "k8s": k8s_broker_conf()}


def ingest_listener(listeners: dict[int, dict[str, str]]) -> int:
    """The listener whose password file holds the ingest account alone."""
    (port,) = [p for p, o in listeners.items() if Path(o.get("password_file", "")).name.startswith("ingest")]
    return port


def device_listeners(listeners: dict[int, dict[str, str]]) -> dict[int, dict[str, str]]:
    ingest = ingest_listener(listeners)
    return {p: o for p, o in listeners.items() if p != ingest}


def local_broker_conf() -> str:
    from deploy.folders import mosquitto_dir
    from deploy.mosquitto import write_mosquitto_config

    local = StackSettings(state_dir=Path("/tmp/kota-deploy-check"))
    write_mosquitto_config(local)
    return (mosquitto_dir(local) / "mosquitto.conf").read_text()


def kafka_properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def compose_kafka_properties() -> dict[str, str]:
    return kafka_properties((COMPOSE_DIR / "kafka.properties").read_text())


def _kafka_properties_of_the_local_stack() -> dict[str, str]:
    from deploy.kafka import write_kafka_config

    stack = StackSettings(state_dir=Path("/tmp/kota-deploy-check"))
    return kafka_properties(write_kafka_config(stack).read_text())


@pytest.fixture(scope="module")
def compose_secrets() -> Iterator[Path]:
    """What deploy/compose/make-secrets.sh makes, in a folder of its own."""
    folder = Path(tempfile.mkdtemp(prefix="kota-compose-secrets-")) / "secrets"
    run = subprocess.run(
        [str(COMPOSE_DIR / "make-secrets.sh"), "mqtt.example.id", "10.1.2.3"],
        env={**os.environ, "KOTA_COMPOSE_SECRETS": str(folder)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    yield folder
    shutil.rmtree(folder.parent, ignore_errors=True)


def test_every_file_parses_and_kustomization_lists_every_manifest():
    assert compose()["services"]
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert listed == on_disk
    kinds = {d["kind"] for d in k8s_documents()}
    assert {
        "Kafka",
        "KafkaNodePool",
        "KafkaTopic",
        "KafkaUser",
        "StatefulSet",
        "Deployment",
        "Job",
        "Service",
        "NetworkPolicy",
    } <= kinds
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


def _in_broker_pod(where: str) -> bool:
    return where.startswith("k8s mosquitto/")


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
            # broker-access reaches the broker in its own pod, past the Service's network policy.
            assert stack.mqtt_host in names or (_in_broker_pod(where) and stack.mqtt_host == "127.0.0.1"), where
            assert {stack.postgres_host, stack.processor_host} <= names, where
            assert stack.kafka_host == "kota-kafka-bootstrap"  # Strimzi's <cluster>-kafka-bootstrap
        _general, listeners = mosquitto_conf(
            compose_broker_conf() if where.startswith("compose") else k8s_broker_conf()
        )
        assert {stack.mqtt_port, stack.mqtt_tls_port, stack.mqtt_mtls_port} <= set(listeners), where
        assert "certfile" not in listeners[stack.mqtt_port] and "certfile" in listeners[stack.mqtt_tls_port]
        assert listeners[stack.mqtt_mtls_port].get("require_certificate") == "true", where
        # The gateways reach the ingest listener (KOTA_MQTT_INGEST_BASE_PORT, kota/settings.py).
        assert int(env["KOTA_MQTT_INGEST_BASE_PORT"]) == ingest_listener(listeners), where
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
        serves = {
            "gateway": {"/metrics": stack.gateway_metrics_port},
            "processor": {"/metrics": stack.processor_metrics_port},
            "api": {path: stack.api_port for path in api_paths} | {"tcp": stack.api_port},
        }.get(argv[0], {})
        probes = _probe_ports(container)
        for path, port in probes.items():
            assert serves.get(path) == port, f"{where}: probe {path} on {port}, but it serves {serves}"
        if serves and not probes:
            unprobed.append(where)
        # k8s: {containerPort: N}; compose: "host:container"
        ports = [
            p["containerPort"] if isinstance(p, dict) else int(p.split(":")[-1]) for p in container.get("ports", [])
        ]
        assert set(ports) <= set(serves.values()), f"{where} exposes {ports}"
    assert not unprobed, f"long-running processes without a health check: {unprobed}"


def test_topics_partitions_and_consumers_agree_with_the_contract():
    topics = {d["spec"]["topicName"]: d["spec"] for d in k8s_documents() if d["kind"] == "KafkaTopic"}
    assert set(topics) == {READINGS_TOPIC, DEADLETTER_TOPIC}
    stack = settings_for(k8s_env())[StackSettings]
    assert topics[READINGS_TOPIC]["partitions"] == stack.kafka_partitions
    assert all(t["replicas"] == stack.kafka_replication for t in topics.values())
    processors = k8s_doc("Deployment", "kota-processor")
    assert processors["spec"]["replicas"] <= stack.kafka_partitions, "idle processors: more than partitions"
    kafka_nodes = next(d for d in k8s_documents() if d["kind"] == "KafkaNodePool")["spec"]["replicas"]
    assert stack.kafka_replication <= kafka_nodes
    compose_stack = settings_for(compose()["services"]["gateway"]["environment"])[StackSettings]
    assert compose()["services"]["processor"]["deploy"]["replicas"] <= compose_stack.kafka_partitions


def test_versions_match_the_local_stack():
    pom = ET.parse(DEPLOY / "kafka" / "pom.xml").getroot()
    kafka_version = pom.find(
        "{http://maven.apache.org/POM/4.0.0}properties/{http://maven.apache.org/POM/4.0.0}kafka.version"
    ).text
    postgres_major = postgres_bin().parent.name  # /usr/lib/postgresql/<major>/bin
    services = compose()["services"]
    assert services["kafka"]["image"] == f"apache/kafka:{kafka_version}"
    assert next(d for d in k8s_documents() if d["kind"] == "Kafka")["spec"]["kafka"]["version"] == kafka_version
    images = [services["timescaledb"]["image"]] + [
        c["image"] for d in k8s_documents() for c in containers(d) if "timescaledb" in c["image"]
    ]
    assert images and all(image.endswith(f"-pg{postgres_major}") for image in images)
    for image in [s["image"] for s in services.values()] + [c["image"] for d in k8s_documents() for c in containers(d)]:
        assert ":" in image and not image.endswith(":latest"), f"{image} is not pinned"


# -- Kafka: SASL/SCRAM everywhere, ACLs as the local stack's -------------------------------------
SECURITY_KEYS = (
    "listener.security.protocol.map",
    "sasl.mechanism.inter.broker.protocol",
    "listener.name.client.sasl.enabled.mechanisms",
    "sasl.mechanism.controller.protocol",
    "listener.name.controller.sasl.enabled.mechanisms",
    "inter.broker.listener.name",
    "controller.listener.names",
    "authorizer.class.name",
    "super.users",
    "allow.everyone.if.no.acl.found",
)


def test_compose_kafka_settings_match_the_local_broker():
    local = _kafka_properties_of_the_local_stack()
    props = compose_kafka_properties()
    for key in (
        "auto.create.topics.enable",
        "message.max.bytes",
        "log.retention.hours",
        "group.initial.rebalance.delay.ms",
        *SECURITY_KEYS,
    ):
        assert props[key] == local[key], key
    strimzi = next(d for d in k8s_documents() if d["kind"] == "Kafka")["spec"]["kafka"]["config"]
    for key in ("message.max.bytes", "log.retention.hours"):
        assert str(strimzi[key]) == local[key], key
    assert str(strimzi["auto.create.topics.enable"]).lower() == local["auto.create.topics.enable"]


def test_kafka_listeners_take_only_sasl_and_the_authorizer_refuses_what_no_acl_allows():
    props = compose_kafka_properties()
    protocols = dict(pair.split(":") for pair in props["listener.security.protocol.map"].split(","))
    listeners = [entry.split("://")[0] for entry in props["listeners"].split(",")]
    assert listeners and all(protocols[name] == "SASL_PLAINTEXT" for name in listeners), protocols
    assert props["listener.name.client.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    # The controller listener (PLAIN: KRaft cannot use SCRAM there) is bound to the container itself.
    controller = next(e for e in props["listeners"].split(",") if e.startswith("CONTROLLER://"))
    assert controller.startswith("CONTROLLER://127.0.0.1:"), controller
    assert props["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert props["super.users"] == "User:kota-admin"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert "jaas" not in (COMPOSE_DIR / "kafka.properties").read_text().lower(), "passwords come from the secrets"
    kafka = next(d for d in k8s_documents() if d["kind"] == "Kafka")["spec"]["kafka"]
    assert kafka["listeners"] and all(
        listener.get("authentication", {}).get("type") == "scram-sha-512" for listener in kafka["listeners"]
    ), kafka["listeners"]
    assert kafka["authorization"] == {"type": "simple", "superUsers": ["kota-admin"]}
    assert str(kafka["config"]["allow.everyone.if.no.acl.found"]).lower() == "false"


_OPERATIONS = {"Read": "READ", "Write": "WRITE", "Describe": "DESCRIBE", "IdempotentWrite": "IDEMPOTENT_WRITE"}


def _local_acls() -> set[tuple[str, str, str, str, str]]:
    from deploy import kafka_access as ka

    kinds = {ka.TOPIC: "topic", ka.GROUP: "group", ka.CLUSTER: "cluster"}
    operations = {ka.READ: "READ", ka.WRITE: "WRITE", ka.DESCRIBE: "DESCRIBE", ka.IDEMPOTENT_WRITE: "IDEMPOTENT_WRITE"}
    return {
        (
            a.user,
            kinds[a.resource_type],
            "" if a.resource_type == ka.CLUSTER else a.resource_name,
            "prefix" if a.pattern == ka.PREFIXED else "literal",
            operations[a.operation],
        )
        for a in ka.ACLS
    }


def _compose_acls() -> set[tuple[str, str, str, str, str]]:
    found = set()
    for line in (COMPOSE_DIR / "kafka-access.sh").read_text().splitlines():
        if not line.startswith("acl "):
            continue
        words = shlex.split(line)[1:]
        user, options = words[0], dict(zip(words[1::2], words[2::2], strict=False))
        operations = [words[i + 1] for i, w in enumerate(words) if w == "--operation"]
        kind = next(k for k in ("topic", "group", "cluster") if f"--{k}" in words)
        pattern = "prefix" if options.get("--resource-pattern-type") == "prefixed" else "literal"
        found |= {(user, kind, options.get(f"--{kind}", ""), pattern, _OPERATIONS[op]) for op in operations}
    return found


def _k8s_acls() -> set[tuple[str, str, str, str, str]]:
    found = set()
    for user in (d for d in k8s_documents() if d["kind"] == "KafkaUser"):
        for acl in user["spec"].get("authorization", {}).get("acls", []):
            resource = acl["resource"]
            found |= {
                (
                    user["metadata"]["name"],
                    resource["type"],
                    resource.get("name", ""),
                    resource.get("patternType", "literal"),
                    _OPERATIONS[op],
                )
                for op in acl["operations"]
            }
    return found


def test_kafka_users_and_acls_are_the_local_stacks():
    from deploy import kafka_access as ka

    local = _local_acls()
    assert local and _compose_acls() == local
    assert _k8s_acls() == local
    # Every user gets its SCRAM credential at storage format (compose) or from a KafkaUser (k8s),
    # its password from a Secret; kota-admin alone has no ACLs (it is the super user).
    start = (COMPOSE_DIR / "kafka-start.sh").read_text()
    formatted = re.search(r"for user in ([\w -]+); do\s+scram\+=", start)
    assert formatted and set(formatted.group(1).split()) == set(ka.USERS)
    users = {d["metadata"]["name"]: d["spec"] for d in k8s_documents() if d["kind"] == "KafkaUser"}
    assert set(users) == set(ka.USERS)
    for name, spec in users.items():
        assert spec["authentication"]["type"] == "scram-sha-512", name
        assert "secretKeyRef" in spec["authentication"]["password"]["valueFrom"], name
    assert "authorization" not in users[ka.ADMIN]
    reset = re.search(
        r"for user in ([\w -]+); do\s+/opt/kafka/bin/kafka-configs.sh", (COMPOSE_DIR / "kafka-access.sh").read_text()
    )
    assert reset and set(reset.group(1).split()) == set(ka.USERS) - {ka.ADMIN}


# -- MQTT: devices only over TLS, client ids bound to user names, bounded queues --------------
def test_broker_configs_are_one_file():
    assert mosquitto_conf(k8s_broker_conf()) == mosquitto_conf(compose_broker_conf())
    assert k8s_broker_conf() == compose_broker_conf()


def test_device_listeners_bind_client_ids_and_the_ingest_listener_takes_only_the_ingest_account():
    for where, conf in broker_confs().items():
        general, listeners = mosquitto_conf(conf)
        assert general["per_listener_settings"] == "true", where
        assert listeners and all(o.get("allow_anonymous") == "false" for o in listeners.values()), where
        ingest = ingest_listener(listeners)
        devices = device_listeners(listeners)
        assert devices, where
        for port, options in devices.items():
            assert options.get("use_username_as_clientid") == "true", f"{where}: listener {port}"
            assert options["acl_file"] != listeners[ingest]["acl_file"], f"{where}: listener {port}"
            assert options.get("password_file") != listeners[ingest]["password_file"], f"{where}: listener {port}"
        # Gateways share the ingest account and keep their own client ids (kota-gateway-<host>).
        assert "use_username_as_clientid" not in listeners[ingest], where
        assert "certfile" not in listeners[ingest] and ingest not in DEVICE_TLS_PORTS, where
        # mTLS: the certificate names the device; TLS: username and password.
        (mtls,) = [p for p, o in devices.items() if o.get("require_certificate") == "true"]
        assert devices[mtls].get("use_identity_as_username") == "true" and "cafile" in devices[mtls], where
        tls = [p for p, o in devices.items() if "certfile" in o]
        assert set(tls) == DEVICE_TLS_PORTS, where
        assert all("keyfile" in devices[p] and devices[p]["certfile"].startswith("/mosquitto/certs/") for p in tls)


def test_broker_limits_match_the_parser_and_queues_are_bounded():
    for where, conf in broker_confs().items():
        general, _listeners = mosquitto_conf(conf)
        packet = int(general["max_packet_size"])
        assert PARSER_LIMIT < packet <= PARSER_LIMIT + MQTT_OVERHEAD, f"{where}: max_packet_size {packet}"
        messages, size = int(general["max_queued_messages"]), int(general["max_queued_bytes"])
        # 0 is "no limit". Bounded, yet enough for a gateway restart: 100,000 messages, 256 MiB.
        assert 0 < messages <= 10_000_000 and 0 < size <= 4 << 30, f"{where}: queues {messages} / {size}"
        assert messages >= 100_000 and size >= 256 << 20, f"{where}: too small for a gateway restart"
        assert general["persistence"] == "true"


def test_broker_settings_match_the_local_stack():
    """The deployed broker keeps readings through a gateway outage as the local one does."""
    general, _listeners = mosquitto_conf(compose_broker_conf())
    local, local_listeners = mosquitto_conf(local_broker_conf())
    for key in (
        "persistence",
        "max_inflight_messages",
        "max_queued_messages",
        "max_queued_bytes",
        "max_packet_size",
        "per_listener_settings",
    ):
        assert general[key] == local[key], key
    # The local stack has the same kinds of listener: plain, TLS, mutual TLS, ingest.
    assert len(local_listeners) == len(_listeners)
    assert all(o.get("use_username_as_clientid") == "true" for o in device_listeners(local_listeners).values())


def test_devices_reach_only_the_tls_listeners():
    _general, listeners = mosquitto_conf(compose_broker_conf())
    tls = {p for p, o in listeners.items() if "certfile" in o}
    services = compose()["services"]
    published = {name: {int(str(p).split(":")[-1]) for p in s.get("ports", [])} for name, s in services.items()}
    assert published["mosquitto"] == tls == DEVICE_TLS_PORTS
    # Nothing else of the broker, Kafka or PostgreSQL is published; the API is.
    assert {name for name, ports in published.items() if ports} == {"mosquitto", "api"}
    assert published["api"] == {8000}
    # k8s: a Service reachable from outside the cluster exposes only TLS ports of the broker.
    _general, k8s_listeners = mosquitto_conf(k8s_broker_conf())
    k8s_tls = {p for p, o in k8s_listeners.items() if "certfile" in o}
    outside = [
        d
        for d in k8s_documents()
        if d["kind"] == "Service" and d["spec"].get("type", "ClusterIP") in ("LoadBalancer", "NodePort")
    ]
    assert outside, "devices need a Service"
    for service in outside:
        assert service["spec"]["selector"] == {"app": "mosquitto"}, service["metadata"]["name"]
        ports = {p.get("targetPort", p["port"]) for p in service["spec"]["ports"]}
        assert ports == k8s_tls == DEVICE_TLS_PORTS, f"{service['metadata']['name']} exposes {ports}"
    internal = k8s_doc("Service", "mosquitto")
    assert internal["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert {p["port"] for p in internal["spec"]["ports"]} == set(k8s_listeners) - k8s_tls
    # The broker's TLS files come from a Secret (k8s) and from make-secrets.sh's folder (compose).
    broker = k8s_doc("StatefulSet", "mosquitto")["spec"]["template"]["spec"]
    certs = next(
        m
        for c in broker["containers"]
        if c["name"] == "mosquitto"
        for m in c["volumeMounts"]
        if m["mountPath"] == "/mosquitto/certs"
    )
    volume = next(v for v in broker["volumes"] if v["name"] == certs["name"])
    assert volume["secret"]["secretName"] == "kota-mqtt-tls"
    assert "./secrets/mqtt-tls:/mosquitto/certs:ro" in services["mosquitto"]["volumes"]


def test_broker_access_writes_where_the_broker_reads_and_signals_its_pid_file(tmp_path):
    from deploy.mqtt_access import INGEST_USER, write_access_files

    general, listeners = mosquitto_conf(compose_broker_conf())
    for where, env, argv, _c in kota_containers():
        if argv[0] != "broker-access":
            continue
        args = build_parser().parse_args(argv)
        files = {Path(o[key]) for o in listeners.values() for key in ("password_file", "acl_file") if key in o}
        assert files and {f.parent for f in files} == {Path(args.folder)}, where
        assert general["pid_file"] == args.broker_pid_file, where
        # Its reload probe logs in on the plain listener.
        stack = settings_for(env)[StackSettings]
        assert "certfile" not in listeners[stack.mqtt_port], where
    # broker-access writes every file the broker reads, and the ingest account is in the ingest
    # listener's files only.
    write_access_files(
        StackSettings(state_dir=tmp_path / "state"), tmp_path, with_registry=False, ingest_secret="ingest-secret"
    )
    for options in listeners.values():
        for key in ("password_file", "acl_file"):
            if key in options:
                assert (tmp_path / Path(options[key]).name).exists(), f"broker-access writes no {options[key]}"
    ingest = listeners[ingest_listener(listeners)]
    for options in device_listeners(listeners).values():
        for key in ("password_file", "acl_file"):
            if key in options:
                text = (tmp_path / Path(options[key]).name).read_text()
                assert not re.search(rf"^(user )?{INGEST_USER}\b", text, re.M), f"{options[key]} has {INGEST_USER}"
    assert re.search(rf"^{INGEST_USER}:", (tmp_path / Path(ingest["password_file"]).name).read_text(), re.M)


# -- PostgreSQL: passwords, one role per component ----------------------------------------------
def test_postgres_requires_passwords_and_keeps_the_superuser_to_itself():
    db = compose()["services"]["timescaledb"]["environment"]
    k8s = {
        e["name"]: e.get("value") or e["valueFrom"]
        for c in containers(k8s_doc("StatefulSet", "timescaledb"))
        for e in c["env"]
    }
    for where, env in (("compose", db), ("k8s", k8s)):
        assert env["POSTGRES_HOST_AUTH_METHOD"] == "scram-sha-256", where
        assert "--auth-host=scram-sha-256" in env["POSTGRES_INITDB_ARGS"], where
        assert "--auth-local=scram-sha-256" in env["POSTGRES_INITDB_ARGS"], where
        assert "trust" not in str(env), where
    assert "POSTGRES_PASSWORD" not in db and db["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")
    assert k8s["POSTGRES_PASSWORD"]["secretKeyRef"]["name"] == "kota-postgres-credentials"
    # Only the roles step sees the superuser's password.
    services = compose()["services"]
    holders = {name for name, s in services.items() if "postgres-postgres.password" in s.get("secrets", [])}
    assert holders == {"timescaledb", "db-roles"}


def _roles_made_by_the_script() -> set[str]:
    script = (COMPOSE_DIR / "db-roles.sh").read_text()
    found = re.search(r"^for role in ([\w ]+); do", script, re.M)
    assert found
    return set(found.group(1).split())


def test_roles_step_makes_every_role_before_the_migrations():
    roles = {pg for pg, _kafka in ACCOUNTS.values()}
    assert _roles_made_by_the_script() == roles
    script = (COMPOSE_DIR / "db-roles.sh").read_text()
    assert "CREATE ROLE %I LOGIN PASSWORD %L" in script and "OWNER TO kota_owner" in script
    assert k8s_doc("ConfigMap", "kota-db-roles")["data"]["db-roles.sh"] == script
    # compose: after the database, before the migrations, as the superuser with every role's password.
    services = compose()["services"]
    assert services["db-roles"]["entrypoint"][-1] == "/etc/kota/db-roles.sh"
    assert services["migrate"]["depends_on"]["db-roles"]["condition"] == "service_completed_successfully"
    assert set(services["db-roles"]["secrets"]) == {f"postgres-{r}.password" for r in roles | {"postgres"}}
    # k8s: the migrate Job's first step, with the same files.
    job = k8s_doc("Job", "kota-migrate")["spec"]["template"]["spec"]
    (step,) = job["initContainers"]
    assert step["command"][-1] == "/etc/kota/db-roles.sh"
    projected = next(v for v in job["volumes"] if v["name"] == "role-passwords")["projected"]["sources"]
    assert {item["path"] for s in projected for item in s["secret"]["items"]} == {
        f"postgres-{r}.password" for r in roles | {"postgres"}
    }


def _k8s_password_sources(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container.get("env", [])
        if "valueFrom" in e
    }


def test_each_component_logs_in_as_its_own_user_with_its_own_secret():
    secrets_of: dict[str, set[str]] = {}
    for where, env, argv, container in kota_containers():
        command = argv[0]
        pg_role, kafka_user = ACCOUNTS[command]
        assert env.get("KOTA_POSTGRES_USER") == pg_role, f"{where}: PostgreSQL user {env.get('KOTA_POSTGRES_USER')}"
        uses_kafka = command not in ("broker-access", "notifier", "commander") and not (
            command == "migrate" and where.startswith("k8s")
        )
        assert env.get("KOTA_KAFKA_USERNAME") == (kafka_user if uses_kafka else None), where
        if command != "migrate":
            assert not {env.get("KOTA_POSTGRES_USER"), env.get("KOTA_KAFKA_USERNAME")} & SUPERUSERS, where
        if where.startswith("k8s"):
            sources = _k8s_password_sources(container)
            assert "KOTA_POSTGRES_PASSWORD" in sources, where
            assert ("KOTA_KAFKA_PASSWORD" in sources) == uses_kafka, where
            secrets = {name for name, _key in sources.values()}
        else:
            assert not any("PASSWORD" in k for k in env), f"{where}: passwords belong in its env_file"
            secrets = set(container["env_file"])
        secrets_of.setdefault(f"{where.split()[0]} {command}", set()).update(secrets)
    # One secret per component; broker-access holds the gateway's (the same PostgreSQL role), and in
    # k8s the commander's (it writes the commander's broker password into the broker's files).
    for platform in ("k8s", "compose"):
        mine = {c: s for c, s in secrets_of.items() if c.startswith(platform)}
        assert set(mine) == {f"{platform} {c}" for c in ACCOUNTS}, mine
        for a, sa in mine.items():
            for b, sb in mine.items():
                if a < b and {a, b} not in (
                    {f"{platform} gateway", f"{platform} broker-access"},
                    {f"{platform} commander", f"{platform} broker-access"},
                ):
                    # The API and the notifier share the notifications key (links one signs, the other checks).
                    shared = sa & sb - (
                        {NOTIFICATIONS_KEY} if {a, b} == {f"{platform} api", f"{platform} notifier"} else set()
                    )
                    assert not shared, f"{a} and {b} share {shared}"


def test_make_secrets_gives_each_service_its_own_passwords(compose_secrets):
    folder = compose_secrets
    assert folder.stat().st_mode & 0o777 == 0o700
    declared = compose()["secrets"]
    for name, spec in declared.items():
        assert (COMPOSE_DIR / spec["file"]).parent.name == "secrets" and (folder / name).is_file(), name
    passwords = {p.name: p.read_text().strip() for p in folder.glob("*.password")}
    assert len(set(passwords.values())) == len(passwords) and all(len(v) >= 32 for v in passwords.values())
    for name, service in compose()["services"].items():
        for env_file in service.get("env_file", []):
            path = folder / Path(env_file).name
            assert path.stat().st_mode & 0o777 == 0o600, env_file
            values = dict(line.split("=", 1) for line in path.read_text().splitlines())
            env = service["environment"]
            assert values["KOTA_POSTGRES_PASSWORD"] == passwords[f"postgres-{env['KOTA_POSTGRES_USER']}.password"], name
            if "KOTA_KAFKA_USERNAME" in env:
                assert values["KOTA_KAFKA_PASSWORD"] == passwords[f"kafka-{env['KOTA_KAFKA_USERNAME']}.password"], name
            else:
                assert "KOTA_KAFKA_PASSWORD" not in values, name
            if name in ("gateway", "broker-access", "access-init"):
                assert values["KOTA_GATEWAY_MQTT_PASSWORD"] == passwords["mqtt-kota-ingest.password"], name
            else:
                assert "KOTA_GATEWAY_MQTT_PASSWORD" not in values, name
    # A second run keeps every password.
    subprocess.run(
        [str(COMPOSE_DIR / "make-secrets.sh")],
        env={**os.environ, "KOTA_COMPOSE_SECRETS": str(folder)},
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert {p.name: p.read_text().strip() for p in folder.glob("*.password")} == passwords


def test_make_secrets_makes_a_broker_certificate_the_ca_signed(compose_secrets):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    tls = compose_secrets / "mqtt-tls"
    ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tls / "tls.crt").read_bytes())
    assert cert.issuer == ca.subject
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"mqtt.example.id", "mosquitto"} <= set(names.get_values_for_type(x509.DNSName))
    assert "10.1.2.3" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    # The CA's key stays out of what the broker mounts, which the broker's own user reads.
    assert sorted(p.name for p in tls.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert all(p.stat().st_mode & 0o004 for p in (tls, *tls.iterdir()))
    assert (compose_secrets / "pki" / "ca.key").exists()


# -- Network policies -----------------------------------------------------------------------------
def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _allowed(app: str, port: int) -> list[dict[str, Any] | None]:
    """Who may connect to pods labelled app=<app> on `port`: each peer (None: anyone)."""
    peers: list[dict[str, Any] | None] = []
    for policy in (d for d in k8s_documents() if d["kind"] == "NetworkPolicy"):
        spec = policy["spec"]
        if "Ingress" not in spec.get("policyTypes", ["Ingress"]) or not _selects(spec["podSelector"], {"app": app}):
            continue
        for rule in spec.get("ingress", []):
            if "ports" in rule and port not in {p["port"] for p in rule["ports"]}:
                continue
            peers += rule.get("from") or [None]
    return peers


def _apps(peers: list[dict[str, Any] | None]) -> set[str]:
    """The app labels of pod peers in this namespace; fails on anything wider."""
    apps: set[str] = set()
    for peer in peers:
        assert peer is not None and set(peer) == {"podSelector"}, f"wider than pods of this namespace: {peer}"
        selector = peer["podSelector"]
        apps |= set(selector.get("matchLabels", {}).values())
        apps |= {v for e in selector.get("matchExpressions", []) for v in e["values"]}
    return apps


def _namespaces(peers: list[dict[str, Any] | None]) -> set[str]:
    names = set()
    for peer in peers:
        assert peer is not None and set(peer) == {"namespaceSelector"}, f"not a namespace: {peer}"
        names.add(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
    return names


def test_network_policies_deny_by_default_and_allow_only_what_each_service_needs():
    policies = [d for d in k8s_documents() if d["kind"] == "NetworkPolicy"]
    default = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert default and default[0]["spec"]["policyTypes"] == ["Ingress"], "no default-deny ingress"
    _general, listeners = mosquitto_conf(k8s_broker_conf())
    ingest = ingest_listener(listeners)
    env = settings_for(k8s_env())[StackSettings]
    # Devices, from anywhere: the TLS listeners only.
    for port in DEVICE_TLS_PORTS:
        assert None in _allowed("mosquitto", port), port
    for port in set(listeners) - DEVICE_TLS_PORTS:
        assert None not in _allowed("mosquitto", port), f"anyone reaches broker port {port}"
    assert _apps(_allowed("mosquitto", ingest)) == {"kota-gateway", "kota-commander"}
    assert _apps(_allowed("mosquitto", env.mqtt_port)) == {"kota-api"}  # /health's CONNACK
    # PostgreSQL: the platform's pods (broker-access is in the broker's pod).
    assert _apps(_allowed("timescaledb", env.postgres_port)) == {
        "kota-migrate",
        "kota-gateway",
        "kota-processor",
        "kota-api",
        "kota-notifier",
        "kota-commander",
        "mosquitto",
    }
    # Kafka: Strimzi's policy from each listener's peers.
    kafka = next(d for d in k8s_documents() if d["kind"] == "Kafka")["spec"]["kafka"]
    for listener in kafka["listeners"]:
        assert _apps(listener.get("networkPolicyPeers") or [None]) == {"kota-gateway", "kota-processor", "kota-api"}
    # The API from the ingress controller (and Prometheus); metrics from Prometheus.
    assert _namespaces(_allowed("kota-api", env.api_port)) == {"ingress-nginx", "monitoring"}
    assert _namespaces(_allowed("kota-gateway", env.gateway_metrics_port)) == {"monitoring"}
    processor_metrics = _allowed("kota-processor", env.processor_metrics_port)
    assert _namespaces([p for p in processor_metrics if p and "namespaceSelector" in p]) == {"monitoring"}
    assert _apps([p for p in processor_metrics if not p or "namespaceSelector" not in p]) == {"kota-api"}
    # Nothing else is open: every rule names its ports, and only the device listeners take anyone.
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("ports"), f"{policy['metadata']['name']}: a rule for every port"
            if not rule.get("from"):
                assert {p["port"] for p in rule["ports"]} <= DEVICE_TLS_PORTS, policy["metadata"]["name"]
    # Every pod the manifests run is selected by some policy other than the default.
    pods = {
        d["spec"]["template"]["metadata"]["labels"]["app"] for d in k8s_documents() if "template" in d.get("spec", {})
    }
    assert pods == {
        "kota-migrate",
        "kota-gateway",
        "kota-processor",
        "kota-api",
        "kota-notifier",
        "kota-commander",
        "mosquitto",
        "timescaledb",
    }


# -- No credential in what is committed ---------------------------------------------------------
SECRETISH = re.compile(r"pass(word)?|secret|token|jaas|credential", re.I)
REFERENCES = {"secretName", "name", "key", "path", "mountPath"}  # names of secrets, not their values


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, dict) and "name" in value and "value" in value:  # k8s env entry
                yield f"{path}.{value['name']}", value["value"]
            else:
                yield from _walk(value, f"{path}[{i}]")
    else:
        yield path, node


def test_no_literal_secrets_in_manifests():
    for doc in k8s_documents():
        assert doc["kind"] != "Secret"
        for path, value in _walk(doc):
            name = path.rsplit(".", 1)[-1]
            if name in REFERENCES or not isinstance(value, str) or name.endswith("_FILE"):
                continue
            if SECRETISH.search(name):
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {path} = {value!r} is written in the manifest")
    for name, service in compose()["services"].items():
        for key, value in service.get("environment", {}).items():
            if SECRETISH.search(key):
                assert key.endswith("_FILE") and str(value).startswith("/run/secrets/"), f"compose {name}: {key}"
    # Nothing committed under deploy/compose holds one: they are made by make-secrets.sh into secrets/.
    tracked = subprocess.run(
        ["git", "ls-files", "deploy/compose", "deploy/k8s"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert not [t for t in tracked if "/secrets/" in t or t.endswith((".env", ".password", ".key"))], tracked
    assert (COMPOSE_DIR / ".gitignore").read_text().count("/secrets/") == 1


def test_deploy_doc_names_every_file_and_command():
    doc = (PROJECT_ROOT / "docs" / "deploy.md").read_text()
    for path in (
        ["deploy/compose/compose.yaml", "deploy/Dockerfile"]
        + [f"deploy/k8s/{p.name}" for p in K8S.glob("*.yaml")]
        + [f"deploy/compose/{p.name}" for p in COMPOSE_DIR.iterdir() if p.suffix in (".sh", ".conf", ".properties")]
    ):
        assert path in doc, path
    commands = re.findall(r"^    (kota .+)$", doc, re.M)  # the indented command lines
    assert commands
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])


# -- the deploy broker configuration in a real Mosquitto ----------------------------------------
def _connack(port: int, packet: bytes, context: ssl.SSLContext | None = None) -> int | None:
    """The CONNACK code for one raw CONNECT (over TLS with `context`); None without a CONNACK."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:
            sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
            sock.sendall(packet)
            reply = sock.recv(4)
            return reply[3] if len(reply) == 4 and reply[0] == 0x20 else None
    except (OSError, ssl.SSLError):
        return None


def start_deploy_broker(root: Path, conf_text: str) -> tuple[subprocess.Popen[bytes], dict[int, int]]:
    """Mosquitto with a deploy configuration, its folders under `root` and each listener on a free
    local port; TLS files from the project's CA. Returns the broker and {deploy port: local port}."""
    from deploy import pki
    from tests.helpers import free_port

    os.chmod(root, 0o755)
    for sub in ("access", "run", "data"):
        (root / sub).mkdir(exist_ok=True)
        os.chmod(root / sub, 0o777)  # the official image's entrypoint hands /mosquitto to the broker
    stack = StackSettings(state_dir=root / "state")
    certs = root / "certs"
    server = pki.issue(stack, "tls", certs, server=True)  # tls.crt, tls.key
    shutil.copy(pki.ensure_ca(stack).cert, certs / "ca.crt")
    if os.geteuid() == 0:  # Mosquitto reads them as its own user (k8s: fsGroup 1883; compose: make-secrets.sh)
        for path in (certs, *certs.iterdir()):
            shutil.chown(path, "mosquitto", "mosquitto")
    _general, listeners = mosquitto_conf(conf_text)
    ports = {port: free_port() for port in listeners}
    conf = conf_text.replace("/mosquitto/", f"{root}/")
    for port, local in ports.items():
        conf = re.sub(rf"^listener {port}$", f"listener {local} 127.0.0.1", conf, flags=re.M)
    assert server.cert.exists()
    (root / "mosquitto.conf").write_text(conf + ("user mosquitto\n" if os.geteuid() == 0 else ""))
    broker = subprocess.Popen(
        ["mosquitto", "-c", str(root / "mosquitto.conf")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    return broker, ports


@pytest.fixture
def broker_root() -> Iterator[Path]:
    # Not pytest's tmp_path: the broker drops to user mosquitto, which may not enter that.
    root = Path(tempfile.mkdtemp(prefix="kota-deploy-broker-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs Mosquitto (./bootstrap.sh installs it)")
def test_deploy_broker_lets_devices_in_only_over_tls_and_the_ingest_account_only_on_its_listener(broker_root):
    from deploy import pki
    from deploy.mqtt_access import INGEST_USER, write_access_files
    from kota.mqtt import login_connect
    from kota.registry import hash_mqtt_password
    from tests.helpers import unique_id, wait_for

    root = broker_root
    (root / "access").mkdir()
    write_access_files(
        StackSettings(state_dir=root / "state"), root / "access", with_registry=False, ingest_secret="ingest-secret"
    )
    _general, listeners = mosquitto_conf(compose_broker_conf())
    ingest = ingest_listener(listeners)
    # A device account as broker-access writes it from the registry, in the device listeners' files.
    device, password = unique_id("dev"), "device-secret"
    for options in device_listeners(listeners).values():
        if "password_file" in options:
            with open(root / "access" / Path(options["password_file"]).name, "a") as f:
                f.write(f"{device}:{hash_mqtt_password(password)}\n")
    broker, ports = start_deploy_broker(root, compose_broker_conf())
    try:
        tls = ssl.create_default_context(cafile=str(root / "certs" / "ca.crt"))
        wait_for(
            lambda: (
                _connack(ports[ingest], login_connect(unique_id("c"), INGEST_USER, "ingest-secret")) == 0
                or broker.poll() is not None
            ),
            what="the broker to start",
        )
        assert broker.poll() is None, broker.stdout.read().decode() if broker.stdout else ""

        def code(port: int, user: str, secret: str, context: ssl.SSLContext | None = None) -> int | None:
            return _connack(ports[port], login_connect(unique_id("c"), user, secret), context)

        assert code(8883, device, password, tls) == 0  # TLS with username and password
        assert code(8883, device, password) is None  # no plain MQTT on a TLS port
        assert code(8883, device, "wrong", tls) not in (0, None)
        assert code(8883, INGEST_USER, "ingest-secret", tls) not in (0, None), "the ingest account on a device port"
        assert code(1883, INGEST_USER, "ingest-secret") not in (0, None)
        assert code(ingest, device, password) not in (0, None), "a device on the ingest listener"
        assert code(ingest, INGEST_USER, "ingest-secret") == 0
        # Mutual TLS: no certificate, no connection; a device certificate names the device.
        assert code(8884, device, password, tls) is None
        client = pki.issue(StackSettings(state_dir=root / "state"), device, root / "client")
        mtls = ssl.create_default_context(cafile=str(root / "certs" / "ca.crt"))
        mtls.load_cert_chain(str(client.cert), str(client.key))
        assert code(8884, "", "", mtls) == 0
    finally:
        broker.terminate()
        broker.wait(10)


# -- the broker-access sidecar against a real Mosquitto run with the compose configuration ------
@pytest.mark.stack
def test_broker_access_sidecar_keeps_a_separate_broker_in_step_with_the_registry(pipeline):
    import sys
    import time

    import psycopg

    from deploy.components import component_env
    from kota.mqtt import MqttLogin, connack_code, connect, login_connect
    from kota.registry import registry_version, set_enabled
    from tests.helpers import PASSWORDS, provision, unique_id, wait_for

    # Not pytest's tmp_path: the broker drops to user mosquitto, which may not enter that.
    root = Path(tempfile.mkdtemp(prefix="kota-broker-access-", dir="/tmp"))
    os.chmod(root, 0o755)
    (root / "access").mkdir()
    (root / "run").mkdir()
    _general, listeners = mosquitto_conf(compose_broker_conf())
    # The sidecar reaches its broker as compose's KOTA_MQTT_HOST does: here, this test's broker,
    # whose ports are known once it is configured; access-init runs before, as in compose.
    base_env = {**os.environ, **component_env(pipeline), "KOTA_GATEWAY_MQTT_PASSWORD": "ingest-secret"}
    argv = [
        sys.executable,
        "-m",
        "cli",
        "broker-access",
        "--folder",
        str(root / "access"),
        "--broker-pid-file",
        str(root / "run" / "mosquitto.pid"),
    ]
    subprocess.run(argv + ["--once"], env=base_env, check=True, timeout=60)  # access-init
    broker, ports = start_deploy_broker(root, compose_broker_conf())
    port = ports[settings_for(compose()["services"]["broker-access"]["environment"])[StackSettings].mqtt_port]
    ingest = ports[ingest_listener(listeners)]
    env = {
        **base_env,
        "KOTA_MQTT_BASE_PORT": str(port - pipeline.port_offset),
        "KOTA_MQTT_INGEST_BASE_PORT": str(ingest - pipeline.port_offset),
    }
    sidecar_log = root / "sidecar.log"
    with sidecar_log.open("w") as log:
        sidecar = subprocess.Popen(argv + ["--every", "0.5"], env=env, stdout=log, stderr=subprocess.STDOUT)
    device = gateway = None
    try:
        wait_for(
            lambda: connack_code(ingest, login_connect(unique_id("c"), "kota-ingest", "ingest-secret")) == 0,
            what="the broker to accept the ingest account",
        )
        device = provision(pipeline, "noise")  # registered after both started
        login = MqttLogin(port, device.device_id, PASSWORDS[device.device_id])

        def accepted() -> bool:
            return connack_code(port, login_connect(unique_id("c"), login.username, login.password)) == 0

        # The broker starts with devices locked out; the sidecar's guard lets them in once an ingest
        # session is subscribed (a stand-in gateway here).
        time.sleep(2)
        assert not accepted(), "a device got in before any ingest session could take its readings"
        gateway = connect(MqttLogin(ingest, "kota-ingest", "ingest-secret"), unique_id("gw"), clean_session=False)
        gateway.subscribe("$share/kota-ingest/kota/#", qos=1)
        wait_for(accepted, what="the sidecar to give the new device an account")
        connect(login, unique_id("c")).disconnect()  # paho, as a device would
        with psycopg.connect(pipeline.postgres_dsn) as conn:
            assert set_enabled(conn, device.device_id, False)
            disabled_version = registry_version(conn)
        wait_for(lambda: not accepted(), what="the sidecar to remove the disabled device")
        # The broker may refuse the device before the sidecar has seen its reload through (and said so).
        wait_for(
            lambda: f"registry version {disabled_version}" in sidecar_log.read_text(),
            what="the sidecar to report the files for the disabled device",
        )
    finally:
        if device is not None:
            with psycopg.connect(pipeline.postgres_dsn) as conn:
                set_enabled(conn, device.device_id, True)
        if gateway is not None:
            gateway.disconnect()
        sidecar.terminate()
        broker.terminate()
        broker.wait(10)
        sidecar.wait(10)
        output = sidecar_log.read_text()
        shutil.rmtree(root, ignore_errors=True)
    assert output.count("broker access files written") >= 2, output
