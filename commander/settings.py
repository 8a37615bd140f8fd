"""Commander settings (`KOTA_COMMANDER_*`): its broker account, pace, and the API's command limits."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommanderSettings(BaseSettings):
    """The commander's settings (`KOTA_COMMANDER_*`)."""

    model_config = SettingsConfigDict(env_prefix="KOTA_COMMANDER_", extra="ignore")

    # Logs in on the ingest listener (deploy/mqtt_access.py). One persistent session: replies that
    # arrive while the commander restarts wait in the broker for it.
    mqtt_username: str = "kota-commander"
    mqtt_password: SecretStr | None = None
    client_id: str = "kota-commander"
    # How often it looks for queued and expired commands, and after how long without an
    # acknowledgement a command is published again (the device dedups by id).
    poll_s: float = 0.5
    resend_after_s: float = 10.0
    publish_timeout_s: float = 5.0
    # Replies waiting to be recorded; beyond this a reply is dropped (the device answers the resend).
    max_pending_replies: int = 10_000
