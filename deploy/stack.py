"""The local stack: install what is missing, start, stop and check the real services.

    Mosquitto      Debian package `mosquitto`          state/mosquitto/   port mqtt_port
    PostgreSQL 15  Debian package `postgresql-15`      state/postgres/    port postgres_port (own cluster)
    Apache Kafka   Maven Central via deploy/kafka/pom  state/kafka/       port kafka_port (KRaft, one node)

Every start is idempotent: a service already running is reported and left alone. Health checks
wait until the service really answers (a CONNACK, a query, a metadata response).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from deploy import procs
from kota.contract import DEADLETTER_TOPIC, KAFKA_TOPICS
from kota.settings import PROJECT_ROOT, StackSettings, ensure_secret

log = logging.getLogger("kota.stack")

DEPLOY_DIR = Path(__file__).resolve().parent
KAFKA_POM = DEPLOY_DIR / "kafka" / "pom.xml"
MOSQUITTO_BIN = Path("/usr/sbin/mosquitto")
POSTGRES_VERSION = "15"
IS_ROOT = os.geteuid() == 0

Say = Callable[[str], None]


class StackError(RuntimeError):
    """Something the person running the stack must fix; the message says what."""


# -- installation ------------------------------------------------------------------------------
def postgres_bin() -> Path:
    return Path(f"/usr/lib/postgresql/{POSTGRES_VERSION}/bin")


def missing_packages() -> list[str]:
    missing = []
    if not MOSQUITTO_BIN.exists():
        missing += ["mosquitto", "mosquitto-clients"]
    if not (postgres_bin() / "initdb").exists():
        missing += [f"postgresql-{POSTGRES_VERSION}", f"postgresql-client-{POSTGRES_VERSION}"]
    if shutil.which("java") is None:
        missing.append("openjdk-17-jre-headless")
    if shutil.which("mvn") is None:
        missing.append("maven")
    if shutil.which("openssl") is None:
        missing.append("openssl")
    return missing


def install_packages(packages: list[str], say: Say) -> None:
    if not packages:
        return
    if not IS_ROOT:
        raise StackError(f"missing system packages; run: sudo apt-get install -y {' '.join(packages)}")
    say(f"installing Debian packages: {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], check=True, env=env)


def install_missing(stack: StackSettings, say: Say) -> None:
    install_packages(missing_packages(), say)
    _install_kafka_libs(stack, say)


CHROMIUM = Path("/usr/bin/chromium")


def ensure_chromium(say: Say) -> Path:
    """Debian's Chromium, for the page's browser test (Playwright drives it; no browser download)."""
    if not CHROMIUM.exists():
        install_packages(["chromium"], say)
    return CHROMIUM


def kafka_dir(stack: StackSettings) -> Path:
    return stack.state_dir / "kafka"


def _install_kafka_libs(stack: StackSettings, say: Say) -> None:
    lib = kafka_dir(stack) / "lib"
    marker = lib / ".pom-sha256"
    wanted = hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()
    if marker.exists() and marker.read_text() == wanted:
        return
    say("resolving Apache Kafka from Maven Central (deploy/kafka/pom.xml)")
    shutil.rmtree(lib, ignore_errors=True)
    lib.mkdir(parents=True)
    subprocess.run(["mvn", "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
                    f"-DoutputDirectory={lib}"], check=True)
    marker.write_text(wanted)


# -- service folders owned by a service user ---------------------------------------------------
def _service_dir(stack: StackSettings, name: str, user: str) -> Path:
    """The service's folder under the state folder, owned by `user` when we run as root.

    The service user must be able to reach it; if the state folder sits somewhere it cannot
    traverse (under /root, say), fall back to /var/lib/kotacerdas/ and say so.
    """
    path = stack.state_dir / name
    path.mkdir(parents=True, exist_ok=True)
    if not IS_ROOT:
        return path
    reachable = subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(path)],
                               capture_output=True).returncode == 0
    if not reachable:
        digest = hashlib.sha256(str(stack.state_dir).encode()).hexdigest()[:10]
        path = Path("/var/lib/kotacerdas") / digest / name
        path.mkdir(parents=True, exist_ok=True)
        log.warning("user %s cannot reach %s; keeping %s data in %s", user, stack.state_dir, name, path)
    shutil.chown(path, user, user)
    return path


# -- Mosquitto ---------------------------------------------------------------------------------
def mosquitto_dir(stack: StackSettings) -> Path:
    return _service_dir(stack, "mosquitto", "mosquitto")


# The broker's limits (docs/security.md, "Broker limits"). Only the ingest gateways subscribe, so
# the queue bounds are in effect theirs.
# - max_packet_size: the gateway's payload limit (GatewaySettings.max_payload_bytes, 256 KiB) plus
#   the largest PUBLISH header: 5 bytes fixed header, 2 + the longest topic
#   (kota/{city}/{domain}/{device}/telemetry with 64-character ids: 156 bytes), 2 bytes packet id;
#   rounded up to 1 KiB. A larger packet could only have been dead-lettered `oversized`; the broker
#   now refuses it (disconnects the sender, no PUBACK) instead of holding it.
# - max_inflight_messages: per subscriber, delivered and not yet acknowledged; twice the gateway's
#   batch (KOTA_GATEWAY_BATCH_MAX_MESSAGES, 5,000), so one batch is delivered while one is in Kafka.
# - max_queued_messages / max_queued_bytes: per subscriber, waiting beyond those in flight (a
#   gateway restarting, Kafka down). Beyond either bound Mosquitto drops a QoS 1 message for that
#   session after acknowledging it, so they are set far above a restart: 2,000,000 messages is
#   100 s at 20,000 messages/s (above what this broker accepts on a small machine) and 1 GiB of
#   payloads is 100 s at 10 MB/s (gateway batches of 100 readings, about 6 KB each, at 1,700/s).
BROKER_MAX_PACKET_BYTES = 256 * 1024 + 1024
#   The broker guard locks devices out above 80% of either (mqtt_access.guard_ingest), so the broker
#   refuses devices before it could drop what it acknowledged.
BROKER_MAX_QUEUED_MESSAGES = 2_000_000
BROKER_MAX_QUEUED_BYTES = 1024 ** 3
BROKER_LIMITS = f"""max_packet_size {BROKER_MAX_PACKET_BYTES}
max_inflight_messages 10000
max_queued_messages {BROKER_MAX_QUEUED_MESSAGES}
max_queued_bytes {BROKER_MAX_QUEUED_BYTES}"""


def write_mosquitto_config(stack: StackSettings) -> bool:
    """Write the broker's config (and its TLS files on first use); return whether the config changed."""
    from deploy import mqtt_access, pki

    folder = mosquitto_dir(stack)
    server = pki.CertPair(folder / "server.crt", folder / "server.key")
    if not (server.cert.exists() and server.key.exists()):
        ca = pki.ensure_ca(stack)
        shutil.copy(ca.cert, folder / "ca.crt")
        server = pki.issue(stack, "server", folder, server=True)
        for path in (folder / "ca.crt", server.cert, server.key):
            if IS_ROOT:
                shutil.chown(path, "mosquitto", "mosquitto")
    if not ((folder / "passwd").exists() and (folder / mqtt_access.INGEST_PASSWD).exists()):
        # First start: the schema may not exist yet; `kota up` syncs the registry right after.
        mqtt_access.write_access_files(stack, folder, with_registry=False)
    conf = folder / "mosquitto.conf"
    before = conf.read_text() if conf.exists() else ""
    device_listener = f"""allow_anonymous false
password_file {folder / "passwd"}
acl_file {folder / "acl"}
# The client id is the user name: no device can take another's session, nor a gateway's.
use_username_as_clientid true"""
    conf.write_text(f"""# Generated by kota (deploy/stack.py); edits are overwritten on start.
# Devices log in on the first three listeners (accounts from the registry); the ingest gateways on
# their own, with their own files: no device account logs in there (deploy/mqtt_access.py).
per_listener_settings true

# Plain MQTT, for devices on a trusted network.
listener {stack.mqtt_port} 127.0.0.1
{device_listener}

# TLS with username and password.
listener {stack.mqtt_tls_port} 127.0.0.1
{device_listener}
cafile {folder / "ca.crt"}
certfile {server.cert}
keyfile {server.key}

# Mutual TLS: a device certificate (CN = device id) stands in for username and password.
listener {stack.mqtt_mtls_port} 127.0.0.1
{device_listener}
cafile {folder / "ca.crt"}
certfile {server.cert}
keyfile {server.key}
require_certificate true
use_identity_as_username true

# The ingest gateways: client ids of their own choosing (one persistent session each, kept across
# their restarts; `kota gateway --drain CLIENT_ID` takes one over to empty it).
listener {stack.mqtt_ingest_port} 127.0.0.1
allow_anonymous false
password_file {folder / mqtt_access.INGEST_PASSWD}
acl_file {folder / mqtt_access.INGEST_ACL}

# Keep the sessions and queued messages of offline subscribers (the gateway) across restarts.
persistence true
persistence_location {folder}/
autosave_interval 5
{BROKER_LIMITS}
# $SYS/broker/subscriptions/count every second: tells when an ingest gateway has subscribed.
sys_interval 1
log_dest stdout
log_type error
log_type warning
log_type notice
log_timestamp_format %Y-%m-%dT%H:%M:%S
""" + ("user mosquitto\n" if IS_ROOT else ""))
    if IS_ROOT:
        shutil.chown(conf, "mosquitto", "mosquitto")
    return conf.read_text() != before


def start_mosquitto(stack: StackSettings, say: Say, *, open_devices: bool = True) -> None:
    """Start the broker with devices locked out (see deploy/mqtt_access.py); with `open_devices`,
    let them in as soon as an ingest gateway has subscribed (the caller does it otherwise)."""
    from deploy import mqtt_access

    changed = write_mosquitto_config(stack)
    if procs.running_pid(stack, "mosquitto"):
        if not changed:
            say(f"mosquitto already running on port {stack.mqtt_port}")
            start_broker_guard(stack)
            return
        say("mosquitto configuration changed: restarting it")
        procs.stop(stack, "mosquitto")
    mqtt_access.lock_devices(stack, mosquitto_dir(stack))
    procs.spawn(stack, "mosquitto", [str(MOSQUITTO_BIN), "-c", str(mosquitto_dir(stack) / "mosquitto.conf")])
    wait_until(lambda: mqtt_answers(stack.mqtt_port), "mosquitto", stack, timeout_s=20)
    say(f"mosquitto started on port {stack.mqtt_port}")
    start_broker_guard(stack)
    if open_devices:
        open_devices_when_ingest_subscribed(stack, say)


def start_broker_guard(stack: StackSettings) -> None:
    """The process that locks devices out whenever no ingest session is subscribed
    (mqtt_access.guard_ingest); it runs as long as the broker does."""
    if not procs.running_pid(stack, "broker-guard"):
        procs.spawn(stack, "broker-guard", [sys.executable, "-m", "kota.cli", "broker-guard"],
                    env={"KOTA_STATE_DIR": str(stack.state_dir), "KOTA_PORT_OFFSET": str(stack.port_offset),
                         "PYTHONUNBUFFERED": "1"}, cwd=PROJECT_ROOT)


def open_devices_when_ingest_subscribed(stack: StackSettings, say: Say, timeout_s: float = 30.0) -> None:
    from deploy import mqtt_access

    if not mqtt_access.devices_locked(stack):
        return
    if mqtt_access.wait_for_ingest_subscription(stack, timeout_s):
        mqtt_access.unlock_devices(stack)
        say("an ingest gateway is subscribed: devices may connect")
    else:
        say(f"no ingest gateway subscribed within {timeout_s:.0f} s: devices stay locked out so that nothing "
            "they send is lost; `kota up` starts a gateway and lets them in")


def mqtt_answers(port: int) -> bool:
    """Send an MQTT CONNECT and expect a CONNACK (any return code: the broker is alive)."""
    from kota.mqtt import HEALTH_CONNECT, connack_code

    return connack_code(port, HEALTH_CONNECT) is not None


def api_healthy(stack: StackSettings) -> bool:
    """The ops API answers /health with 200: it runs and every dependency answers it."""
    import httpx

    try:
        return httpx.get(f"{stack.api_url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


# -- PostgreSQL --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PostgresPaths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"


def postgres_paths(stack: StackSettings) -> PostgresPaths:
    return PostgresPaths(_service_dir(stack, "postgres", "postgres"))


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if IS_ROOT else argv


def postgres_running(stack: StackSettings) -> bool:
    paths = postgres_paths(stack)
    result = subprocess.run(_as_postgres([str(postgres_bin() / "pg_ctl"), "status", "-D", str(paths.data)]),
                            capture_output=True)
    return result.returncode == 0


def start_postgres(stack: StackSettings, say: Say) -> None:
    from deploy import postgres_access

    paths = postgres_paths(stack)
    if not (paths.data / "PG_VERSION").exists():
        say(f"creating PostgreSQL {POSTGRES_VERSION} cluster in {paths.data}")
        _initdb(stack, paths)
    paths.socket_dir.mkdir(exist_ok=True)
    # Only the server's own user may reach its socket (root does anyway); passwords are asked there too.
    paths.socket_dir.chmod(0o700)
    if IS_ROOT:
        shutil.chown(paths.socket_dir, "postgres", "postgres")
    (paths.data / "kota.conf").write_text(f"""# Generated by kota (deploy/stack.py) on every start.
port = {stack.postgres_port}
listen_addresses = '127.0.0.1'
unix_socket_directories = '{paths.socket_dir}'
unix_socket_permissions = 0770
password_encryption = 'scram-sha-256'
max_connections = 200
shared_buffers = 256MB
work_mem = 16MB
maintenance_work_mem = 128MB
max_wal_size = 2GB
checkpoint_timeout = 15min
timezone = 'UTC'
log_timezone = 'UTC'
""")
    conf = paths.data / "postgresql.conf"
    if "include_if_exists = 'kota.conf'" not in conf.read_text():
        with conf.open("a") as f:
            f.write("\ninclude_if_exists = 'kota.conf'\n")
    if postgres_running(stack):
        say(f"postgres already running on port {stack.postgres_port}")
    else:
        subprocess.run(_as_postgres([str(postgres_bin() / "pg_ctl"), "start", "-D", str(paths.data), "-l",
                                     str(paths.log), "-w", "-t", "60"]), check=True, stdout=subprocess.DEVNULL)
        say(f"postgres started on port {stack.postgres_port}")
    wait_until(lambda: _postgres_answers(stack), "postgres", stack, timeout_s=30)
    if postgres_access.require_passwords(stack, paths.data):
        say("postgres: passwords (scram-sha-256) required from now on; pg_hba.conf has no trust")
    postgres_access.provision(stack)


def _initdb(stack: StackSettings, paths: PostgresPaths) -> None:
    """A new cluster that asks for passwords from the start; the superuser's is in the secrets folder."""
    from deploy import postgres_access

    # initdb runs as the postgres user, which cannot read the secrets folder: a private copy for it.
    pwfile = paths.root / "initdb.pwfile"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(postgres_access.password(stack, postgres_access.SUPERUSER) + "\n")
    try:
        if IS_ROOT:
            shutil.chown(pwfile, "postgres", "postgres")
        subprocess.run(_as_postgres([str(postgres_bin() / "initdb"), "-D", str(paths.data), "-U", "postgres",
                                     "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
                                     "-E", "UTF8", "--locale=C"]),
                       check=True, stdout=subprocess.DEVNULL)
    finally:
        pwfile.unlink(missing_ok=True)


def _postgres_answers(stack: StackSettings) -> bool:
    from deploy import postgres_access

    try:
        with psycopg.connect(postgres_access.superuser_dsn(stack, connect_timeout=2)) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError as exc:
        if "password authentication failed" in str(exc):
            raise StackError(f"postgres refuses the superuser's password in {stack.state_dir / 'secrets'}: "
                             f"{str(exc).strip()}") from None
        return False
    except psycopg.Error:
        return False


def stop_postgres(stack: StackSettings) -> bool:
    if not postgres_running(stack):
        return False
    paths = postgres_paths(stack)
    subprocess.run(_as_postgres([str(postgres_bin() / "pg_ctl"), "stop", "-D", str(paths.data), "-m", "fast",
                                 "-w"]), check=True, stdout=subprocess.DEVNULL)
    return True


# -- Kafka -------------------------------------------------------------------------------------
# In data/: this folder was formatted with the SCRAM users, or given them once (_bootstrap_scram).
SCRAM_MARKER = ".kota-scram"


def write_kafka_config(stack: StackSettings) -> Path:
    """server.properties: clients authenticate with SASL/SCRAM-SHA-512 and are held to ACLs
    (deploy/kafka_access.py). KRaft cannot use SCRAM between broker and controller (the
    credentials live in the metadata log the controller serves), so its listener takes PLAIN,
    with kota-admin's password in this file, which only the owner may read."""
    from deploy import kafka_access

    admin = kafka_access.ensure_passwords(stack)[kafka_access.ADMIN]
    folder = kafka_dir(stack)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    props = folder / "server.properties"
    scram_login = (f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{kafka_access.ADMIN}" '
                   f'password="{admin}";')
    plain_login = (f'org.apache.kafka.common.security.plain.PlainLoginModule required username="{kafka_access.ADMIN}" '
                   f'password="{admin}" user_{kafka_access.ADMIN}="{admin}";')
    text = _kafka_properties(stack, f"""listeners=CLIENT://127.0.0.1:{stack.kafka_port},CONTROLLER://127.0.0.1:{stack.kafka_controller_port}
advertised.listeners=CLIENT://127.0.0.1:{stack.kafka_port}
inter.broker.listener.name=CLIENT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:SASL_PLAINTEXT,CLIENT:SASL_PLAINTEXT
listener.name.client.sasl.enabled.mechanisms={kafka_access.SCRAM_MECHANISM}
listener.name.client.{kafka_access.SCRAM_MECHANISM.lower()}.sasl.jaas.config={scram_login}
sasl.mechanism.inter.broker.protocol={kafka_access.SCRAM_MECHANISM}
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config={plain_login}
sasl.mechanism.controller.protocol=PLAIN
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:{kafka_access.ADMIN}
allow.everyone.if.no.acl.found=false""")
    fd = os.open(props, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(props, 0o600)  # made by older code with the default mode
    (folder / "log4j2.yaml").write_text("""Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
""")
    return props


def _bootstrap_kafka_config(stack: StackSettings) -> Path:
    """The broker as older code ran it (PLAINTEXT, no authorizer), bound to 127.0.0.1: started
    once, briefly, to give a folder formatted without SCRAM users its users."""
    props = kafka_dir(stack) / "bootstrap.properties"
    props.write_text(_kafka_properties(stack, f"""listeners=PLAINTEXT://127.0.0.1:{stack.kafka_port},CONTROLLER://127.0.0.1:{stack.kafka_controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{stack.kafka_port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"""))
    return props


def _kafka_properties(stack: StackSettings, listeners: str) -> str:
    folder = kafka_dir(stack)
    return f"""# Generated by kota (deploy/stack.py): single-node KRaft broker and controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{stack.kafka_controller_port}
{listeners}
log.dirs={folder / "data"}
num.partitions={stack.kafka_partitions}
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# A consumer group forming from nothing waits this long for more members before its first
# assignment: the processor's workers start together and join within it, so they split the
# partitions in one rebalance instead of the first taking them all and handing half back.
group.initial.rebalance.delay.ms=1000
log.retention.hours=168
log.segment.bytes=268435456
message.max.bytes=4194304
"""


def _java(stack: StackSettings, main_class: str, *args: str) -> list[str]:
    folder = kafka_dir(stack)
    return ["java", f"-Xms{stack.kafka_heap}", f"-Xmx{stack.kafka_heap}", "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={folder / 'log4j2.yaml'}", "-cp", str(folder / "lib" / "*"),
            main_class, *args]


def start_kafka(stack: StackSettings, say: Say) -> None:
    from deploy import kafka_access

    passwords = kafka_access.ensure_passwords(stack)
    folder = kafka_dir(stack)
    props = folder / "server.properties"
    before = props.read_text() if props.exists() else ""
    write_kafka_config(stack)
    if procs.running_pid(stack, "kafka") and props.read_text() == before:
        say(f"kafka already running on port {stack.kafka_port}")
    else:
        if procs.running_pid(stack, "kafka"):
            say("kafka configuration changed: restarting it")
            procs.stop(stack, "kafka", timeout_s=60)
        marker = folder / "data" / SCRAM_MARKER
        if not (folder / "data" / "meta.properties").exists():
            cluster_id = _kafka_cluster_id()
            scram = [arg for user, password in passwords.items()
                     for arg in ("--add-scram", f"{kafka_access.SCRAM_MECHANISM}=[name={user},password={password}]")]
            result = subprocess.run(_java(stack, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c",
                                          str(props), *scram), capture_output=True, text=True)
            if result.returncode != 0:
                raise StackError(f"formatting Kafka storage failed: {result.stdout}{result.stderr}")
            marker.touch()
            say(f"formatted Kafka storage (cluster {cluster_id}) with SCRAM users {', '.join(passwords)}")
        elif not marker.exists():
            _bootstrap_scram(stack, passwords, say)
            marker.touch()
        procs.spawn(stack, "kafka", _java(stack, "kafka.Kafka", str(props)))
        say(f"kafka starting on port {stack.kafka_port}")
    wait_until(lambda: asyncio.run(_kafka_answers(stack)), "kafka", stack, timeout_s=90)
    # Every start: users added since the folder was formatted, changed passwords, and the ACLs.
    asyncio.run(kafka_access.apply(kafka_admin_options(stack), passwords))
    asyncio.run(create_topics(stack))


def kafka_admin_options(stack: StackSettings) -> dict[str, Any]:
    """aiokafka client options as kota-admin, whatever user this process is otherwise."""
    from deploy import kafka_access

    if stack.kafka_username != kafka_access.ADMIN:  # a component's settings: the admin's password is in the secrets
        stack = stack.model_copy(update={"kafka_username": kafka_access.ADMIN, "kafka_password": None})
    return stack.kafka_client_options()


def _bootstrap_scram(stack: StackSettings, passwords: dict[str, str], say: Say) -> None:
    """A folder formatted by older code holds no SCRAM users, and the broker's own login (and so
    every client's) would fail. Its data is kept (readings not processed yet may wait there): the
    broker is started once as older code ran it, on 127.0.0.1 only, given the users, and stopped."""
    from deploy import kafka_access

    say("kafka storage predates SASL/SCRAM: starting it once without authentication to add its users")
    procs.spawn(stack, "kafka", _java(stack, "kafka.Kafka", str(_bootstrap_kafka_config(stack))))
    plaintext = {"bootstrap_servers": stack.kafka_bootstrap}
    try:
        wait_until(lambda: asyncio.run(_kafka_answers(stack, plaintext)), "kafka", stack, timeout_s=90)
        asyncio.run(kafka_access.apply(plaintext, passwords, acls=False))
    finally:
        procs.stop(stack, "kafka", timeout_s=60)
    say(f"kafka SCRAM users added ({', '.join(passwords)}); restarting with authentication")


def _kafka_cluster_id() -> str:
    # Kafka's own Uuid.randomUuid() never starts with '-', which a command line reads as an option.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


async def _kafka_answers(stack: StackSettings, options: dict[str, Any] | None = None) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    # While the broker starts, aiokafka logs every refused connection: we only want the answer.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    try:
        admin = AIOKafkaAdminClient(request_timeout_ms=3000, **(options or kafka_admin_options(stack)))
    except RuntimeError:  # no password yet: the stack was never started
        return False
    try:
        await admin.start()
        await admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        await admin.close()


async def create_topics(stack: StackSettings) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(request_timeout_ms=10000, **kafka_admin_options(stack))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [NewTopic(name, num_partitions=stack.kafka_partitions if name != DEADLETTER_TOPIC else 1,
                           replication_factor=stack.kafka_replication) for name in KAFKA_TOPICS if name not in existing]
        if wanted:
            await admin.create_topics(wanted)
    finally:
        await admin.close()


# -- helpers -----------------------------------------------------------------------------------
def wait_until(check: Callable[[], bool], what: str, stack: StackSettings, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise StackError(f"{what} did not answer within {timeout_s:.0f} s; see {procs.log_file(stack, what)}")


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


# -- the project's own processes ---------------------------------------------------------------
COMPONENTS = ("gateway", "processor", "api", "simulator")


def component_env(stack: StackSettings, component: str | None = None) -> dict[str, str]:
    """Children see exactly the stack this process sees, whatever set it, and the ingest account;
    a `component` (gateway, processor, api) also its own Kafka user (deploy/kafka_access.py)."""
    from deploy import kafka_access, postgres_access
    from deploy.mqtt_access import ingest_password

    env = {"KOTA_STATE_DIR": str(stack.state_dir), "KOTA_PORT_OFFSET": str(stack.port_offset),
           "KOTA_GATEWAY_MQTT_PASSWORD": ingest_password(stack, mosquitto_dir(stack)),
           "PYTHONUNBUFFERED": "1"}
    if component in kafka_access.COMPONENT_USERS:
        user = kafka_access.COMPONENT_USERS[component]
        env |= {"KOTA_KAFKA_USERNAME": user,
                "KOTA_KAFKA_PASSWORD": ensure_secret(stack.state_dir, kafka_access.password_file(user))}
    # Its own PostgreSQL role too (deploy/postgres_access.py); the others are kota_owner.
    env |= postgres_access.component_env(stack, component)
    return env


def start_component(stack: StackSettings, name: str, *args: str, instance: str | None = None,
                    env: dict[str, str] | None = None) -> int:
    """Start `kota <name> <args>` in the background unless it already runs; return its pid."""
    proc_name = instance or name
    pid = procs.running_pid(stack, proc_name)
    if pid:
        return pid
    argv = [sys.executable, "-m", "kota.cli", name, *args]
    return procs.spawn(stack, proc_name, argv, env={**component_env(stack, name), **(env or {})},
                       cwd=PROJECT_ROOT)


def status_rows(stack: StackSettings) -> list[tuple[str, str, str]]:
    rows = [
        ("mosquitto", _state(procs.running_pid(stack, "mosquitto"), mqtt_answers(stack.mqtt_port)),
         f"mqtt://127.0.0.1:{stack.mqtt_port}"),
        ("postgres", "running" if postgres_running(stack) and _postgres_answers(stack) else "stopped",
         f"postgresql://{stack.postgres_user}@127.0.0.1:{stack.postgres_port}/{stack.database}"),
        ("kafka", _state(procs.running_pid(stack, "kafka"),
                         bool(procs.running_pid(stack, "kafka")) and asyncio.run(_kafka_answers(stack))),
         stack.kafka_bootstrap),
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
