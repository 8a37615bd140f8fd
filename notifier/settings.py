"""Notifier settings (`KOTA_NOTIFIER_*`): pace, retries, the page's address, the Telegram Bot API."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class NotifierSettings(BaseSettings):
    """How the notifier delivers: how often it looks, how long a send may take, how it retries."""

    model_config = SettingsConfigDict(env_prefix="KOTA_NOTIFIER_", extra="ignore")

    poll_interval_s: float = 1.0
    batch_size: int = 50
    # One send's time limit. The lease of a message being sent is this plus a margin: only after it
    # ran out (its sender crashed) is the message taken again, and marked possible_duplicate.
    send_timeout_s: float = 20.0
    lease_margin_s: float = 10.0
    max_attempts: int = 6
    backoff_base_s: float = 5.0
    backoff_max_s: float = 900.0
    # Where people open the page: links to an alert and acknowledge links start here.
    page_url: str | None = None  # None: the stack's API address (KOTA_PORT_OFFSET)
    ack_link_ttl_s: int = 3 * 86_400
    telegram_api: str = "https://api.telegram.org"
    telegram_poll_s: float = 2.0
    # SMTP servers with a private CA (tests, a city's own relay): a PEM file to trust besides the system's.
    smtp_ca_file: str | None = None
    escalation_check_s: float = 15.0
    # Delivered, given-up and suppressed messages (with their attempts) are kept this long.
    keep_days: float = 30.0
    retention_check_s: float = 3600.0

    @property
    def lease_s(self) -> float:
        return self.send_timeout_s + self.lease_margin_s
