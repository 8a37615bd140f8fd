"""Stack settings: one object that tells every component where the local services are.

All values come from `KOTA_*` environment variables (pydantic-settings). Ports default to
values that do not clash with services a machine usually runs (1883, 5432, 9092 stay free);
`KOTA_PORT_OFFSET` shifts them all at once, which is how the test suite runs its own stack
beside a developer's.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _default_state_dir() -> Path:
    # Inside the checkout when we run from one (the usual case), else in the user's home.
    if (PROJECT_ROOT / "pyproject.toml").exists():
        return PROJECT_ROOT / ".kota"
    return Path.home() / ".kota"


def secrets_dir(state_dir: Path) -> Path:
    return state_dir / "secrets"


def read_secret(state_dir: Path, name: str) -> str | None:
    """The credential kept in `{state_dir}/secrets/<name>`, or None if it was never made."""
    path = secrets_dir(state_dir) / name
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def ensure_secret(state_dir: Path, name: str) -> str:
    """The credential in `{state_dir}/secrets/<name>`, made (random, 0600 in a 0700 folder) if missing."""
    existing = read_secret(state_dir, name)
    if existing is not None:
        return existing
    folder = secrets_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    value = secrets.token_urlsafe(24)
    path = folder / name
    # Written whole to a private file (0600 from the start), then linked into place, which fails if
    # the name exists: made once, and a second process making it at the same time reads the winner's.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
        os.link(tmp, path)
    except FileExistsError:
        value = read_secret(state_dir, name) or value
    finally:
        os.unlink(tmp)
    return value


def _dsn_quoted(value: str) -> str:
    # libpq connection strings: a value in single quotes, with \\ and \' escaped.
    return value.replace("\\", "\\\\").replace("'", "\\'")


class StackSettings(BaseSettings):
    """Where every service of one stack is (hosts, ports, state folder) and how to log in to it.

    Every component reads the same `KOTA_*` variables, so a child started with the parent's
    environment finds the same services."""

    model_config = SettingsConfigDict(env_prefix="KOTA_", extra="ignore")

    state_dir: Path = Field(default_factory=_default_state_dir)
    port_offset: int = 0

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        # PostgreSQL, Kafka and Mosquitto are started in folders of their own: a relative
        # KOTA_STATE_DIR=.kota-bench left PostgreSQL unable to make its socket's lock file.
        return path.expanduser().absolute()

    mqtt_base_port: int = 18830
    mqtt_tls_base_port: int = 18831  # TLS, username and password
    mqtt_mtls_base_port: int = 18832  # mutual TLS: the client certificate names the device
    # The ingest gateways' own listener (127.0.0.1 / internal network): only the ingest account logs
    # in there, and no device account can, so no device can reach the gateways' sessions.
    mqtt_ingest_base_port: int = 18833
    postgres_base_port: int = 15432
    kafka_base_port: int = 19092
    kafka_controller_base_port: int = 19093
    api_base_port: int = 18000
    gateway_metrics_base_port: int = 18091
    processor_metrics_base_port: int = 18092

    # Hosts: every service on this machine by default. A deployment over several machines or
    # containers names them (deploy/compose, deploy/k8s); `bind_host` is where the API and the
    # metrics endpoints listen (0.0.0.0 inside a container).
    mqtt_host: str = "127.0.0.1"
    kafka_host: str = "127.0.0.1"
    postgres_host: str = "127.0.0.1"
    # The role this process connects as (scram-sha-256): deploy gives each component its own
    # (kota_processor, kota_gateway, kota_api); the CLI and tests are kota_owner, which owns the
    # schema. A missing password is read from the secrets folder (postgres-<user>.password).
    postgres_user: str = "kota_owner"
    postgres_password: SecretStr | None = None
    api_host: str = "127.0.0.1"
    processor_host: str = "127.0.0.1"  # where the API reads the processor's metrics
    bind_host: str = "127.0.0.1"

    # SASL/SCRAM-SHA-512 user this process connects to Kafka as (deploy/kafka_access.py): deploy,
    # the CLI and tests are kota-admin; deploy gives each component its own user. A missing password
    # is read from the secrets folder (kafka-<user>.password).
    kafka_username: str = "kota-admin"
    kafka_password: SecretStr | None = None
    kafka_partitions: int = 4
    kafka_replication: int = 1  # 3 on a cluster of brokers (deploy/k8s)
    # The dead-letter topic's disk, capped (retention.bytes, in 64 MiB segments): devices set its
    # volume (one at its 20 refused messages a second of 16 KiB kept writes ~38 GB a day), so a
    # flood deletes the oldest dead letters rather than fill the broker's disk.
    kafka_deadletter_max_bytes: int = 1 << 30
    kafka_heap: str = "512m"
    database: str = "kota"
    # Encrypts notification channels' secrets and signs acknowledge links (kota/notifications.py):
    # the API's and the notifier's. A missing one is read from the secrets folder (notifications.key).
    notifications_key: SecretStr | None = None

    # -- derived addresses -------------------------------------------------------------------
    @property
    def mqtt_port(self) -> int:
        return self.mqtt_base_port + self.port_offset

    @property
    def mqtt_tls_port(self) -> int:
        return self.mqtt_tls_base_port + self.port_offset

    @property
    def mqtt_mtls_port(self) -> int:
        return self.mqtt_mtls_base_port + self.port_offset

    @property
    def mqtt_ingest_port(self) -> int:
        return self.mqtt_ingest_base_port + self.port_offset

    @property
    def postgres_port(self) -> int:
        return self.postgres_base_port + self.port_offset

    @property
    def kafka_port(self) -> int:
        return self.kafka_base_port + self.port_offset

    @property
    def kafka_controller_port(self) -> int:
        return self.kafka_controller_base_port + self.port_offset

    @property
    def api_port(self) -> int:
        return self.api_base_port + self.port_offset

    @property
    def gateway_metrics_port(self) -> int:
        return self.gateway_metrics_base_port + self.port_offset

    @property
    def processor_metrics_port(self) -> int:
        return self.processor_metrics_base_port + self.port_offset

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.kafka_host}:{self.kafka_port}"

    def kafka_client_options(self) -> dict[str, Any]:
        """Keyword arguments every aiokafka client is built with: where Kafka is, and who we are."""
        password = (
            self.kafka_password.get_secret_value()
            if self.kafka_password
            else read_secret(self.state_dir, f"kafka-{self.kafka_username}.password")
        )
        if password is None:
            raise RuntimeError(
                f"no Kafka password for user {self.kafka_username}: set KOTA_KAFKA_PASSWORD, or "
                f"start the stack (kota up) to make {secrets_dir(self.state_dir)}/"
                f"kafka-{self.kafka_username}.password"
            )
        return {
            "bootstrap_servers": self.kafka_bootstrap,
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": self.kafka_username,
            "sasl_plain_password": password,
        }

    @property
    def postgres_dsn(self) -> str:
        dsn = f"host={self.postgres_host} port={self.postgres_port} user={self.postgres_user} dbname={self.database}"
        password = (
            self.postgres_password.get_secret_value()
            if self.postgres_password
            else read_secret(self.state_dir, f"postgres-{self.postgres_user}.password")
        )
        if password:
            dsn += f" password='{_dsn_quoted(password)}'"
        return dsn

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    @cached_property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @cached_property
    def run_dir(self) -> Path:
        return self.state_dir / "run"
