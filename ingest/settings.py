"""Gateway settings (`KOTA_GATEWAY_*`): its MQTT session, batches, input limits, rate limits."""

from __future__ import annotations

from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ingest.ratelimit import is_rate


class GatewaySettings(BaseSettings):
    """The gateway's settings (`KOTA_GATEWAY_*`): its MQTT session, batching, limits and rates."""

    model_config = SettingsConfigDict(env_prefix="KOTA_GATEWAY_", extra="ignore")

    # Each gateway keeps its own persistent MQTT session under this id. "{hostname}" is replaced,
    # so replicas in containers (deploy/compose, deploy/k8s) get distinct, stable ids.
    client_id: str = "kota-gateway-1"
    mqtt_username: str = "kota-ingest"
    mqtt_password: SecretStr | None = None
    shared_subscription: bool = True
    queue_size: int = 20_000
    batch_max_messages: int = 5_000
    batch_wait_s: float = 0.05
    registry_refresh_s: float = 10.0
    max_payload_bytes: int = 256 * 1024
    max_future_ms: int = 5 * 60 * 1000
    max_age_ms: int = 7 * 24 * 3600 * 1000
    log_burst_s: float = 10.0
    duplicate_memory: int = 400_000
    metrics_enabled: bool = True
    # Drain mode (`kota gateway --drain CLIENT_ID`): forward what a departed gateway's session
    # holds, then exit once nothing has come for this long.
    drain_quiet_s: float = 3.0
    # Messages per second per MQTT account, and how many seconds of that rate may come at once
    # (ingest/ratelimit.py). A registry row's rate_limit_per_s overrides them; 0 turns a limit off.
    device_rate_per_s: float = 20.0
    gateway_rate_per_s: float = 1000.0
    rate_burst_s: float = 60.0
    # Bytes and readings per second per account: its message rate times these (ingest/ratelimit.py),
    # so what one account makes the gateway parse and write to Kafka is bounded too, with a burst
    # of volume_burst_s. 0 turns that budget off.
    bytes_per_message: float = 16 * 1024
    readings_per_message: float = 10.0
    volume_burst_s: float = 3600.0
    # The inbox holds at most this many payload bytes (and queue_size messages): memory stays flat
    # whatever size devices send, up to the broker's max_packet_size each.
    queue_max_bytes: int = 64 * 1024 * 1024
    batch_max_bytes: int = 4 * 1024 * 1024

    @field_validator(
        "device_rate_per_s",
        "gateway_rate_per_s",
        "rate_burst_s",
        "bytes_per_message",
        "readings_per_message",
        "volume_burst_s",
    )
    @classmethod
    def _finite_and_not_negative(cls, value: float) -> float:
        if not is_rate(value):
            raise ValueError("must be a finite number, 0 or more")
        return value
