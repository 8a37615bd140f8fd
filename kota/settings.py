"""Stack settings: one object that tells every component where the local services are.

All values come from `KOTA_*` environment variables (pydantic-settings). Ports default to
values that do not clash with services a machine usually runs (1883, 5432, 9092 stay free);
`KOTA_PORT_OFFSET` shifts them all at once, which is how the test suite runs its own stack
beside a developer's.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _default_state_dir() -> Path:
    # Inside the checkout when we run from one (the usual case), else in the user's home.
    if (PROJECT_ROOT / "pyproject.toml").exists():
        return PROJECT_ROOT / ".kota"
    return Path.home() / ".kota"


class StackSettings(BaseSettings):
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
    postgres_user: str = "postgres"
    postgres_password: SecretStr | None = None
    api_host: str = "127.0.0.1"
    processor_host: str = "127.0.0.1"  # where the API reads the processor's metrics
    bind_host: str = "127.0.0.1"

    kafka_partitions: int = 4
    kafka_replication: int = 1  # 3 on a cluster of brokers (deploy/k8s)
    kafka_heap: str = "512m"
    database: str = "kota"

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

    @property
    def postgres_dsn(self) -> str:
        dsn = f"host={self.postgres_host} port={self.postgres_port} user={self.postgres_user} dbname={self.database}"
        if self.postgres_password:
            dsn += f" password={self.postgres_password.get_secret_value()}"
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
