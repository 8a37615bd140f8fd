"""The three channels: a signed JSON webhook, email over SMTP (STARTTLS and login), and Telegram's
Bot API (sendMessage with an inline Acknowledge button; its callbacks read with getUpdates).

A send returns nothing or raises DeliveryError with a reason fit to show in the API: never a
secret (a bot token is part of Telegram's URLs, so no URL goes into a reason)."""

from __future__ import annotations

import asyncio
import json
import smtplib
import ssl
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

import httpx

from kota.notifications import SIGNATURE_HEADER, TIMESTAMP_HEADER, webhook_signature
from notifier.messages import LABELS, Message


class DeliveryError(Exception):
    """A send that failed; the text says why (shown in the API's deliveries)."""


def webhook_body(message: Message) -> bytes:
    return json.dumps(message.payload, separators=(",", ":"), sort_keys=True, default=str).encode()


async def send_webhook(http: httpx.AsyncClient, config: dict[str, Any], secret: str, message: Message) -> None:
    body = webhook_body(message)
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "kotacerdas-notifier",
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: webhook_signature(secret, timestamp, body),
    }
    try:
        response = await http.post(config["url"], content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise DeliveryError(f"webhook: {type(exc).__name__}: {exc}") from exc
    if not response.is_success:
        raise DeliveryError(f"webhook: HTTP {response.status_code}: {response.text[:200]}")


def _send_email(
    config: dict[str, Any], password: str, message: Message, language: str, timeout_s: float, ca_file: str | None
) -> None:
    email = EmailMessage()
    email["Subject"] = message.subject
    email["From"] = config["from"]
    email["To"] = ", ".join(config["to"])
    email["Date"] = formatdate(localtime=False)
    email["Message-ID"] = make_msgid(domain="kotacerdas")
    email.set_content(message.text(language))
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(ca_file)
    try:
        with smtplib.SMTP(config["host"], int(config.get("port", 587)), timeout=timeout_s) as smtp:
            smtp.ehlo()
            smtp.starttls(context=context)  # never log in or send in the clear
            smtp.ehlo()
            if config.get("username"):
                smtp.login(config["username"], password)
            smtp.send_message(email)
    except (smtplib.SMTPException, OSError) as exc:
        raise DeliveryError(f"email: {type(exc).__name__}: {exc}") from exc


async def send_email(
    config: dict[str, Any], password: str, message: Message, language: str, timeout_s: float, ca_file: str | None
) -> None:
    await asyncio.to_thread(_send_email, config, password, message, language, timeout_s, ca_file)


async def telegram_call(http: httpx.AsyncClient, api: str, token: str, method: str, body: dict[str, Any]) -> Any:
    """One Bot API call; its `result`, or DeliveryError (the reason leaves the token out)."""
    try:
        response = await http.post(f"{api.rstrip('/')}/bot{token}/{method}", json=body)
        answer = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise DeliveryError(f"telegram {method}: {type(exc).__name__}") from exc
    if not (isinstance(answer, dict) and answer.get("ok")):
        description = answer.get("description") if isinstance(answer, dict) else None
        raise DeliveryError(f"telegram {method}: HTTP {response.status_code}: {str(description)[:200]}")
    return answer.get("result")


async def send_telegram(
    http: httpx.AsyncClient,
    api: str,
    config: dict[str, Any],
    token: str,
    message: Message,
    language: str,
    ack_callback: str | None,
) -> None:
    body: dict[str, Any] = {
        "chat_id": config["chat_id"],
        "text": message.text(language)[:4096],
        "disable_web_page_preview": True,
    }
    if ack_callback:
        body["reply_markup"] = {"inline_keyboard": [[{"text": LABELS[language]["ack"], "callback_data": ack_callback}]]}
    await telegram_call(http, api, token, "sendMessage", body)
