"""The notifier's loop: claim due outbox messages, send them, record every attempt; fold storms into
digests, keep quiet hours, escalate unacknowledged alerts, and acknowledge from Telegram's button.

Crash safety: an attempt is committed as 'sending' (with a lease: the send's time limit and a
margin) BEFORE anything is sent, and its result is recorded after. A notifier killed in between
leaves the message 'sending'; once the lease has run out the message is taken again, its cut
attempt marked 'interrupted' and the message possible_duplicate: it may have gone out already,
so it goes out at most once more per cut. Claims use FOR UPDATE SKIP LOCKED, so several notifiers
share the outbox without sending a message twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from kota import alerts
from kota.notifications import NotificationKeys
from kota.settings import StackSettings
from notifier.channels import DeliveryError, send_email, send_telegram, send_webhook, telegram_call
from notifier.messages import Message, digest_message, event_message, test_message
from notifier.settings import NotifierSettings

log = logging.getLogger("kota.notifier")
ACTOR = "kota-notifier"
AUDIT_INSERT = (
    "INSERT INTO audit_log (actor, action, target_type, target_id, city, details) VALUES (%s, %s, %s, %s, %s, %s)"
)
SUBSCRIPTION_LOCK = 0x6B6F74614E << 24  # advisory lock keys of subscriptions: this plus the id
_TELEGRAM_ACK = re.compile(r"^ack:([1-9][0-9]{0,18})$")

EVENT_ROW = """
SELECT e.event_id, e.action, e.actor, e.severity, e.comment, e.at, a.alert_id, a.city, a.domain, a.device_id,
       a.alert_type, a.metric, a.state, a.message, a.last_value, a.count, a.details, d.district,
       coalesce(d.device_type, '-') AS device_type
FROM alert_events e JOIN alerts a ON a.alert_id = e.alert_id LEFT JOIN devices d ON d.device_id = a.device_id
WHERE e.event_id = %s
"""


def most_severe(severity: str | None, details: dict[str, Any]) -> bool:
    """Critical, Siaga 1 or ISPU Berbahaya: what quiet hours never hold back."""
    return severity == "critical" or details.get("siaga") == 1 or details.get("category") == "Berbahaya"


def in_quiet_hours(now: dt.datetime, start: dt.time | None, end: dt.time | None, timezone: str) -> bool:
    """Whether `now` falls in [start, end) of local time in `timezone`; the span may cross midnight."""
    if start is None or end is None or start == end:
        return False
    try:
        local = now.astimezone(ZoneInfo(timezone)).time()
    except ZoneInfoNotFoundError:
        local = now.astimezone(ZoneInfo("Asia/Jakarta")).time()
    if start < end:
        return start <= local < end
    return local >= start or local < end


def backoff_s(attempt: int, settings: NotifierSettings) -> float:
    """Exponential, capped, with a little jitter so retries of many messages do not march in step."""
    base: float = min(settings.backoff_base_s * 2.0 ** max(attempt - 1, 0), settings.backoff_max_s)
    return base * random.uniform(0.9, 1.1)  # noqa: S311 - jitter, not security


@dataclass(slots=True)
class Job:
    """One claimed attempt: the message to send and where."""

    message_id: int
    attempt: int
    kind: str
    channel: dict[str, Any]
    secret: str
    language: str
    message: Message
    ack_callback: str | None


class Notifier:
    def __init__(self, stack: StackSettings, settings: NotifierSettings, keys: NotificationKeys) -> None:
        self.stack = stack
        self.settings = settings
        self.keys = keys
        self.page_url = settings.page_url or stack.api_url
        self._telegram_polled: dict[int, float] = {}
        self._escalation_checked = 0.0
        self._retention_checked = 0.0

    # -- the outbox ---------------------------------------------------------------------------
    async def claim(self, conn: psycopg.AsyncConnection) -> list[Job]:
        """Take due messages and commit their attempts as 'sending' before any is sent."""
        jobs: list[Job] = []
        async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT o.*, s.language, s.quiet_start, s.quiet_end, s.timezone, s.digest_limit, s.digest_window_s "
                "FROM notification_outbox o LEFT JOIN notification_subscriptions s USING (subscription_id) "
                "WHERE o.status IN ('pending', 'sending') AND o.next_attempt_at <= now() "
                "ORDER BY o.next_attempt_at, o.message_id LIMIT %s FOR UPDATE OF o SKIP LOCKED",
                (self.settings.batch_size,),
            )
            rows = await cur.fetchall()
            for row in rows:
                try:
                    async with conn.transaction():  # a savepoint: one bad message fails alone
                        job = await self._claim_one(cur, row)
                except (psycopg.DataError, psycopg.ProgrammingError, KeyError, TypeError, ValueError) as exc:
                    # Never a loop on one message: it is given up with the reason, the rest go on.
                    log.exception("message %s cannot be prepared; given up", row["message_id"])
                    await self._finish(cur, row["message_id"], "failed", f"cannot be prepared: {exc}"[:500])
                    continue
                if job is not None:
                    jobs.append(job)
        return jobs

    async def _claim_one(self, cur: psycopg.AsyncCursor[dict[str, Any]], row: dict[str, Any]) -> Job | None:
        message_id = row["message_id"]
        if row["status"] == "sending":  # its sender died between committing the attempt and recording it
            await cur.execute(
                "UPDATE notification_attempts SET outcome = 'interrupted', finished_at = now(), "
                "error = 'the notifier stopped during this attempt; it may have been delivered' "
                "WHERE message_id = %s AND outcome = 'sending'",
                (message_id,),
            )
            await cur.execute(
                "UPDATE notification_outbox SET possible_duplicate = true WHERE message_id = %s", (message_id,)
            )
            log.warning("message %s: attempt cut by a stop; sending again, marked possible_duplicate", message_id)
        language = row["language"] or "id"
        await cur.execute(
            "SELECT channel_id, city, name, kind, config, secret, enabled FROM notification_channels "
            "WHERE channel_id = %s",
            (row["channel_id"],),
        )
        channel = await cur.fetchone()
        if channel is None or not channel["enabled"]:
            await self._finish(cur, message_id, "failed", "channel disabled or deleted")
            return None
        event: dict[str, Any] | None = None
        if row["kind"] == "event":
            await cur.execute(EVENT_ROW, (row["event_id"],))
            event = await cur.fetchone()
            if event is None:
                await self._finish(cur, message_id, "failed", "alert event no longer exists")
                return None
            if row["attempts"] == 0 and row["status"] == "pending":
                # One notifier at a time counts a subscription's window (replicas share the outbox);
                # another holding it now takes this message, or it waits for the next round.
                await cur.execute(
                    "SELECT pg_try_advisory_xact_lock(%s) AS mine", (SUBSCRIPTION_LOCK + row["subscription_id"],)
                )
                locked = await cur.fetchone()
                if not (locked and locked["mine"]):
                    return None
                now = dt.datetime.now(dt.UTC)
                details = event["details"] or {}
                if in_quiet_hours(now, row["quiet_start"], row["quiet_end"], row["timezone"]) and not most_severe(
                    event["severity"], details
                ):
                    await self._finish(
                        cur,
                        message_id,
                        "suppressed",
                        f"quiet hours {row['quiet_start']:%H:%M}-{row['quiet_end']:%H:%M} {row['timezone']}",
                    )
                    return None
                if await self._over_limit(cur, row):
                    await cur.execute(
                        "UPDATE notification_outbox SET status = 'held', "
                        "last_error = 'over the subscription''s limit: goes into the next digest' "
                        "WHERE message_id = %s",
                        (message_id,),
                    )
                    return None
        attempt = row["attempts"] + 1
        await cur.execute(
            "UPDATE notification_outbox SET status = 'sending', attempts = %s, "
            "next_attempt_at = now() + %s * interval '1 second', dispatched_at = coalesce(dispatched_at, now()) "
            "WHERE message_id = %s",
            (attempt, self.settings.lease_s, message_id),
        )
        await cur.execute(
            "INSERT INTO notification_attempts (message_id, attempt) VALUES (%s, %s)", (message_id, attempt)
        )
        secret = self.keys.decrypt(channel["secret"]) if channel["secret"] is not None else ""
        ack_callback = None
        if event is not None:
            ack_url = None
            if event["action"] in ("raised", "escalated"):
                expires = int(time.time()) + self.settings.ack_link_ttl_s
                token = self.keys.ack_token(event["alert_id"], row["subscription_id"], expires)
                ack_url = f"{self.page_url.rstrip('/')}/api/v1/notifications/ack/{token}"
                ack_callback = f"ack:{message_id}"
            message = event_message(event, language, self.page_url, ack_url)
        elif row["kind"] == "digest":
            message = digest_message(row["city"], language, row["body"]["items"], self.page_url)
        else:
            message = test_message(row["city"], (row["body"] or {}).get("language", language))
            language = (row["body"] or {}).get("language", language)
        return Job(message_id, attempt, row["kind"], channel, secret, language, message, ack_callback)

    async def _over_limit(self, cur: psycopg.AsyncCursor[dict[str, Any]], row: dict[str, Any]) -> bool:
        """Whether the subscription already had its limit of messages in its window (a digest made but
        not yet sent counts), or has some held (which go first, in the digest)."""
        await cur.execute(
            "SELECT count(*) FILTER (WHERE status <> 'held') AS recent, "
            "count(*) FILTER (WHERE status = 'held') AS held "
            "FROM notification_outbox WHERE subscription_id = %s AND kind IN ('event', 'digest') "
            "AND (status = 'held' OR dispatched_at > now() - %s * interval '1 second' "
            "     OR (kind = 'digest' AND status = 'pending'))",
            (row["subscription_id"], row["digest_window_s"]),
        )
        counts = await cur.fetchone()
        assert counts is not None
        return bool(counts["recent"] >= row["digest_limit"] or counts["held"] > 0)

    async def _finish(
        self, cur: psycopg.AsyncCursor[dict[str, Any]], message_id: int, status: str, reason: str
    ) -> None:
        await cur.execute(
            "UPDATE notification_outbox SET status = %s, last_error = %s WHERE message_id = %s",
            (status, reason, message_id),
        )

    async def send(self, http: httpx.AsyncClient, job: Job) -> str | None:
        """Send one job; None when delivered, else why not."""
        config = job.channel["config"]
        try:
            match job.channel["kind"]:
                case "webhook":
                    await send_webhook(http, config, job.secret, job.message)
                case "email":
                    await send_email(
                        config,
                        job.secret,
                        job.message,
                        job.language,
                        self.settings.send_timeout_s,
                        self.settings.smtp_ca_file,
                    )
                case "telegram":
                    await send_telegram(
                        http,
                        self.settings.telegram_api,
                        config,
                        job.secret,
                        job.message,
                        job.language,
                        job.ack_callback,
                    )
                case other:
                    return f"unknown channel kind {other!r}"
        except DeliveryError as exc:
            return str(exc)[:500]
        except (KeyError, TypeError, ValueError) as exc:  # a channel configured wrong
            return f"channel configuration: {type(exc).__name__}: {exc}"[:500]
        return None

    async def record(self, conn: psycopg.AsyncConnection, job: Job, error: str | None) -> None:
        async with conn.transaction():
            if error is None:
                await conn.execute(
                    "UPDATE notification_attempts SET outcome = 'sent', finished_at = now() "
                    "WHERE message_id = %s AND attempt = %s",
                    (job.message_id, job.attempt),
                )
                await conn.execute(
                    "UPDATE notification_outbox SET status = 'sent', sent_at = now(), last_error = NULL "
                    "WHERE message_id = %s AND attempts = %s",
                    (job.message_id, job.attempt),
                )
                return
            retry_s = None if job.attempt >= self.settings.max_attempts else backoff_s(job.attempt, self.settings)
            await conn.execute(
                "UPDATE notification_attempts SET outcome = 'failed', finished_at = now(), error = %s, "
                "retry_at = now() + %s * interval '1 second' WHERE message_id = %s AND attempt = %s",
                (error, retry_s, job.message_id, job.attempt),
            )
            if retry_s is None:
                await conn.execute(
                    "UPDATE notification_outbox SET status = 'failed', last_error = %s "
                    "WHERE message_id = %s AND attempts = %s",
                    (f"gave up after {job.attempt} attempts: {error}", job.message_id, job.attempt),
                )
                log.warning("message %s: gave up after %d attempts: %s", job.message_id, job.attempt, error)
            else:
                await conn.execute(
                    "UPDATE notification_outbox SET status = 'pending', last_error = %s, "
                    "next_attempt_at = now() + %s * interval '1 second' WHERE message_id = %s AND attempts = %s",
                    (error, retry_s, job.message_id, job.attempt),
                )

    async def deliver_due(self, conn: psycopg.AsyncConnection, http: httpx.AsyncClient) -> int:
        """One round: claim, send side by side, record each as it finishes. How many were claimed."""
        jobs = await self.claim(conn)

        async def one(job: Job) -> tuple[Job, str | None]:
            return job, await self.send(http, job)

        for finished in asyncio.as_completed([one(job) for job in jobs]):
            job, error = await finished
            await self.record(conn, job, error)
        return len(jobs)

    # -- digests ------------------------------------------------------------------------------
    async def fold_held(self, conn: psycopg.AsyncConnection) -> int:
        """For each subscription with held messages whose window has room again: one digest of them all."""
        made = 0
        async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT s.subscription_id, s.channel_id, s.city, s.digest_limit, s.digest_window_s, "
                "(SELECT count(*) FROM notification_outbox r WHERE r.subscription_id = s.subscription_id "
                " AND r.kind IN ('event', 'digest') "
                " AND r.dispatched_at > now() - s.digest_window_s * interval '1 second') AS recent "
                "FROM notification_subscriptions s WHERE EXISTS (SELECT FROM notification_outbox h "
                "WHERE h.subscription_id = s.subscription_id AND h.status = 'held')"
            )
            for sub in await cur.fetchall():
                if sub["recent"] >= sub["digest_limit"]:
                    continue
                await cur.execute(
                    "SELECT o.message_id, e.event_id, e.action, e.severity, a.alert_id, a.device_id, a.alert_type "
                    "FROM notification_outbox o JOIN alert_events e USING (event_id) JOIN alerts a "
                    "ON a.alert_id = o.alert_id WHERE o.subscription_id = %s AND o.status = 'held' "
                    "ORDER BY o.message_id FOR UPDATE OF o SKIP LOCKED",
                    (sub["subscription_id"],),
                )
                held = await cur.fetchall()
                if not held:
                    continue
                items = [{k: v for k, v in h.items() if k != "message_id"} for h in held]
                await cur.execute(
                    "INSERT INTO notification_outbox (kind, subscription_id, channel_id, city, body) "
                    "VALUES ('digest', %s, %s, %s, %s) RETURNING message_id",
                    (sub["subscription_id"], sub["channel_id"], sub["city"], Jsonb({"items": items})),
                )
                digest = await cur.fetchone()
                assert digest is not None
                await cur.execute(
                    "UPDATE notification_outbox SET status = 'digested', digest_id = %s, last_error = NULL "
                    "WHERE message_id = ANY(%s)",
                    (digest["message_id"], [h["message_id"] for h in held]),
                )
                made += 1
                log.info(
                    "subscription %s: %d held messages folded into digest %s",
                    sub["subscription_id"],
                    len(held),
                    digest["message_id"],
                )
        return made

    # -- escalation ---------------------------------------------------------------------------
    async def escalate_due(self, conn: psycopg.AsyncConnection) -> int:
        """Escalate active alerts that stayed unacknowledged past the next tier's delay."""
        if time.monotonic() - self._escalation_checked < self.settings.escalation_check_s:
            return 0
        self._escalation_checked = time.monotonic()
        cur = await conn.execute(
            "SELECT a.alert_id, a.city, a.device_id, s.tier, min(s.escalate_after_s) "
            "FROM alerts a LEFT JOIN devices d ON d.device_id = a.device_id "
            "JOIN notification_subscriptions s ON s.city = a.city AND s.enabled AND s.tier = a.notify_tier + 1 "
            "WHERE a.state = 'active' AND kota_severity_rank(a.severity) >= kota_severity_rank(s.min_severity) "
            "AND (s.domain IS NULL OR s.domain = a.domain) AND (s.district IS NULL OR s.district = d.district) "
            "AND (s.alert_types IS NULL OR a.alert_type = ANY (s.alert_types)) "
            "AND a.created_at + s.escalate_after_s * interval '1 second' <= now() "
            "GROUP BY a.alert_id, a.city, a.device_id, s.tier"
        )
        due = await cur.fetchall()
        await conn.commit()
        escalated = 0
        for alert_id, city, device_id, tier, after_s in due:
            async with conn.transaction():
                comment = f"not acknowledged within {after_s} s: tier {tier} notified"
                change = await alerts.escalate_to_tier(conn, alert_id, tier, ACTOR, comment)
                if change is not None:
                    await conn.execute(
                        AUDIT_INSERT,
                        (
                            ACTOR,
                            "alert.escalate",
                            "alert",
                            str(alert_id),
                            city,
                            Jsonb({"tier": tier, "device_id": device_id, "comment": comment}),
                        ),
                    )
                    escalated += 1
        return escalated

    # -- retention ----------------------------------------------------------------------------
    async def forget_old(self, conn: psycopg.AsyncConnection, *, now: bool = False) -> tuple[int, int]:
        """Delete finished messages (and their attempts) older than keep_days, and the used nonces of
        acknowledge links that have expired anyway. Pending, sending and held messages stay."""
        if not now and time.monotonic() - self._retention_checked < self.settings.retention_check_s:
            return 0, 0
        self._retention_checked = time.monotonic()
        async with conn.transaction():
            cur = await conn.execute(
                "DELETE FROM notification_outbox WHERE status IN ('sent', 'failed', 'suppressed', 'digested') "
                "AND created_at < now() - %s * interval '1 day'",
                (self.settings.keep_days,),
            )
            messages = cur.rowcount
            cur = await conn.execute(
                "DELETE FROM notification_ack_uses WHERE used_at < now() - %s * interval '1 second'",
                (self.settings.ack_link_ttl_s + 86_400,),
            )
            nonces = cur.rowcount
        if messages or nonces:
            log.info("retention: %d old messages and %d expired link nonces deleted", messages, nonces)
        return messages, nonces

    # -- Telegram's Acknowledge button --------------------------------------------------------
    async def poll_telegram(self, conn: psycopg.AsyncConnection, http: httpx.AsyncClient) -> int:
        """Read each Telegram channel's button presses (getUpdates) and acknowledge their alerts."""
        cur = await conn.execute(
            "SELECT channel_id, city, config, secret, telegram_offset FROM notification_channels "
            "WHERE kind = 'telegram' AND enabled AND secret IS NOT NULL"
        )
        channels = await cur.fetchall()
        await conn.commit()
        handled = 0
        for channel_id, city, config, secret, offset in channels:
            if time.monotonic() - self._telegram_polled.get(channel_id, 0.0) < self.settings.telegram_poll_s:
                continue
            self._telegram_polled[channel_id] = time.monotonic()
            try:
                token = self.keys.decrypt(secret)
            except ValueError as exc:
                log.warning("telegram channel %s: %s", channel_id, exc)
                continue
            try:
                updates = await telegram_call(
                    http,
                    self.settings.telegram_api,
                    token,
                    "getUpdates",
                    {"offset": offset, "timeout": 0, "allowed_updates": ["callback_query"]},
                )
            except DeliveryError as exc:
                log.warning("telegram channel %s: %s", channel_id, exc)
                continue
            for update in updates or []:
                handled += await self._telegram_update(conn, http, token, channel_id, city, config, update)
        return handled

    async def _telegram_update(
        self,
        conn: psycopg.AsyncConnection,
        http: httpx.AsyncClient,
        token: str,
        channel_id: int,
        city: str,
        config: dict[str, Any],
        update: dict[str, Any],
    ) -> int:
        answer = None
        query = update.get("callback_query") or {}
        async with conn.transaction():
            # The offset moves in the transaction that acknowledges: a press is acted on once.
            await conn.execute(
                "UPDATE notification_channels SET telegram_offset = greatest(telegram_offset, %s) "
                "WHERE channel_id = %s",
                (int(update["update_id"]) + 1, channel_id),
            )
            match = _TELEGRAM_ACK.match(str(query.get("data", "")))
            chat = str(((query.get("message") or {}).get("chat") or {}).get("id"))
            if match is None or chat != str(config.get("chat_id")):
                return 0  # not our button, or pressed in a chat this channel does not send to
            cur = await conn.execute(
                "SELECT alert_id FROM notification_outbox WHERE message_id = %s AND channel_id = %s",
                (int(match[1]), channel_id),
            )
            row = await cur.fetchone()
            if row is None:
                return 0
            sender = query.get("from") or {}
            actor = f"telegram:{sender.get('username') or sender.get('id')}"
            try:
                async with conn.transaction():
                    await alerts.acknowledge(conn, row[0], actor, "acknowledged from Telegram")
                    await conn.execute(
                        AUDIT_INSERT,
                        (
                            actor,
                            "alert.acknowledge",
                            "alert",
                            str(row[0]),
                            city,
                            Jsonb({"via": "telegram", "channel_id": channel_id, "message_id": int(match[1])}),
                        ),
                    )
                answer = "OK"
            except (alerts.AlertStateError, LookupError) as exc:
                answer = str(exc)
        if query.get("id"):
            try:
                await telegram_call(
                    http,
                    self.settings.telegram_api,
                    token,
                    "answerCallbackQuery",
                    {"callback_query_id": query["id"], "text": answer},
                )
            except DeliveryError as exc:
                log.warning("telegram channel %s: %s", channel_id, exc)
        return 1


async def run_notifier(stack: StackSettings, settings: NotifierSettings, stop: asyncio.Event) -> None:
    """Deliver until stopped; a lost database connection is made again."""
    keys = NotificationKeys.from_stack(stack)
    notifier = Notifier(stack, settings, keys)
    log.info("notifier started (page %s, telegram %s)", notifier.page_url, settings.telegram_api)
    async with httpx.AsyncClient(timeout=settings.send_timeout_s) as http:
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(stack.postgres_dsn) as conn:
                    while not stop.is_set():
                        claimed = await notifier.deliver_due(conn, http)
                        await notifier.fold_held(conn)
                        await notifier.escalate_due(conn)
                        await notifier.poll_telegram(conn, http)
                        await notifier.forget_old(conn)
                        if claimed < settings.batch_size:
                            try:
                                await asyncio.wait_for(stop.wait(), settings.poll_interval_s)
                            except TimeoutError:
                                pass
            except psycopg.OperationalError as exc:
                log.warning("database: %s; connecting again", exc)
                try:
                    await asyncio.wait_for(stop.wait(), 2.0)
                except TimeoutError:
                    pass
            except Exception:  # noqa: BLE001 - the notifier outlives any one failure; it is logged
                log.exception("notifier round failed; starting again")
                try:
                    await asyncio.wait_for(stop.wait(), 2.0)
                except TimeoutError:
                    pass
    log.info("notifier stopped")
