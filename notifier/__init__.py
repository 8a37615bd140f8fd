"""The notifier: delivers the notification outbox (written with each alert event, migration 0014)
to webhooks, email and Telegram, with retries, quiet hours, digests, escalation and acknowledgement
from the message. See docs/notifications.md."""
