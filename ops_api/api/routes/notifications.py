"""Notifications: channels (secrets written, never read back), subscriptions, deliveries with every
attempt and give-up reason, a test message, and the acknowledge link that messages carry.

City-scoped like the rest: admins and operators manage their cities' channels and subscriptions;
integrators may read them. Every change is in the audit log. The acknowledge link needs no token:
it is its own proof (signed, expiring, single use); GET shows a confirm page, POST acknowledges,
so the link scanners of mail clients, which follow links, acknowledge nothing."""

from __future__ import annotations

import datetime as dt
import html
import time
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import HTMLResponse
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kota import alerts as lifecycle
from kota.contract import Domain
from kota.notifications import BadToken, NotificationKeys
from ops_api import accounts
from ops_api.api.deps import Connection, Stack
from ops_api.api.errors import READ, responses
from ops_api.auth import Caller, require, require_city

router = APIRouter(prefix="/api/v1/notifications", tags=["notifications"])
Severity = Literal["critical", "major", "minor", "warning"]
ChannelKind = Literal["webhook", "email", "telegram"]
Id = Annotated[int, Path(ge=1, le=2**62)]
Name = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9 ._-]+$")]


class WebhookConfig(BaseModel):
    url: str = Field(pattern=r"^https?://\S+$", max_length=2000)


class EmailConfig(BaseModel):
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(587, ge=1, le=65535)
    username: str | None = Field(None, max_length=255)
    from_: str = Field(alias="from", pattern=r"^[^@\s]+@[^@\s]+$", max_length=320)
    to: list[Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$", max_length=320)]] = Field(min_length=1, max_length=50)


class TelegramConfig(BaseModel):
    chat_id: str = Field(pattern=r"^-?[0-9]{1,20}$|^@[A-Za-z0-9_]{5,32}$")


CONFIGS: dict[str, type[BaseModel]] = {"webhook": WebhookConfig, "email": EmailConfig, "telegram": TelegramConfig}


class ChannelIn(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "city": "bandung",
                    "name": "bpbd-webhook",
                    "kind": "webhook",
                    "config": {"url": "https://bpbd.example/kota"},
                    "secret": "a long random string",
                }
            ]
        }
    )
    city: str = Field(min_length=1, max_length=100)
    name: Name
    kind: ChannelKind
    config: dict[str, Any] = Field(description="webhook: url; email: host, port, username, from, to; telegram: chat_id")
    secret: str = Field(
        min_length=1, max_length=500, description="webhook signing key, SMTP password or bot token: stored encrypted"
    )
    enabled: bool = True

    @model_validator(mode="after")
    def _config_fits_kind(self) -> ChannelIn:
        self.config = CONFIGS[self.kind].model_validate(self.config).model_dump(by_alias=True)
        return self


class ChannelPatch(BaseModel):
    config: dict[str, Any] | None = None
    secret: str | None = Field(None, min_length=1, max_length=500)
    enabled: bool | None = None


class Channel(BaseModel):
    channel_id: int
    city: str
    name: str
    kind: ChannelKind
    config: dict[str, Any]
    has_secret: bool = Field(description="a secret is stored (it is never returned)")
    enabled: bool
    created_by: str
    created_at: dt.datetime


class SubscriptionIn(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "channel_id": 1,
                    "domain": "environment",
                    "district": "regol",
                    "min_severity": "major",
                    "alert_types": ["flood_siaga"],
                    "language": "id",
                    "quiet_start": "22:00",
                    "quiet_end": "06:00",
                }
            ]
        }
    )
    channel_id: int = Field(ge=1, le=2**62)
    domain: Domain | None = None
    district: str | None = Field(None, max_length=100)
    alert_types: list[Annotated[str, Field(min_length=1, max_length=60)]] | None = Field(None, max_length=50)
    min_severity: Severity = "warning"
    language: Literal["id", "en"] = "id"
    tier: int = Field(1, ge=1, le=9)
    escalate_after_s: int | None = Field(
        None, ge=1, le=7 * 86_400, description="tier > 1: after how long unacknowledged"
    )
    quiet_start: dt.time | None = None
    quiet_end: dt.time | None = None
    timezone: str = Field("Asia/Jakarta", max_length=64, pattern=r"^[A-Za-z_+/-]+$")
    digest_limit: int = Field(10, ge=1, le=10_000)
    digest_window_s: int = Field(600, ge=1, le=86_400)
    enabled: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> SubscriptionIn:
        if (self.quiet_start is None) != (self.quiet_end is None):
            raise ValueError("quiet_start and quiet_end go together")
        if self.tier > 1 and self.escalate_after_s is None:
            raise ValueError("a tier above 1 needs escalate_after_s")
        return self


class Subscription(SubscriptionIn):
    subscription_id: int
    city: str
    created_by: str
    created_at: dt.datetime


class Attempt(BaseModel):
    attempt: int
    started_at: dt.datetime
    finished_at: dt.datetime | None
    outcome: Literal["sending", "sent", "failed", "interrupted"]
    error: str | None
    retry_at: dt.datetime | None = Field(None, description="a failed attempt: when the next is due; none: given up")


class Delivery(BaseModel):
    message_id: int
    kind: Literal["event", "test", "digest"]
    city: str
    channel_id: int
    subscription_id: int | None
    alert_id: int | None
    event_id: int | None
    status: Literal["pending", "sending", "sent", "failed", "suppressed", "held", "digested"]
    attempts: int
    possible_duplicate: bool
    last_error: str | None = Field(description="why the last attempt failed, or why it was given up or held back")
    created_at: dt.datetime
    sent_at: dt.datetime | None
    digest_id: int | None
    history: list[Attempt]


class TestMessage(BaseModel):
    language: Literal["id", "en"] = "id"


class Queued(BaseModel):
    message_id: int


def _keys(stack: Stack) -> NotificationKeys:
    return NotificationKeys.from_stack(stack)


def _manage(caller: Caller, city: str) -> None:
    require(caller, "operator", doing="manage notifications")
    require_city(caller, city)


def _read(caller: Caller) -> None:
    require(caller, "operator", "integrator", doing="read notifications")


# What the API shows of a channel: never its secret, only whether one is stored.
CHANNEL_COLUMNS = (
    "channel_id, city, name, kind, config, secret IS NOT NULL AS has_secret, enabled, created_by, created_at"
)


async def _channel(conn: Connection, caller: Caller, channel_id: int) -> dict[str, Any]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {CHANNEL_COLUMNS} FROM notification_channels "  # noqa: S608
            "WHERE channel_id = %s AND (%s::text[] IS NULL OR city = ANY(%s))",
            (channel_id, caller.city_filter(), caller.city_filter()),
        )
        row = await cur.fetchone()
    if row is None:
        raise HTTPException(404, "channel not found")
    return row


@router.get("/channels", response_model=list[Channel], responses=READ)
async def list_channels(caller: Caller, conn: Connection, city: str | None = None) -> list[Channel]:
    """The channels of the caller's cities; secrets are never returned, only whether one is stored."""
    _read(caller)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {CHANNEL_COLUMNS} FROM notification_channels "  # noqa: S608
            "WHERE (%s::text[] IS NULL OR city = ANY(%s)) "
            "AND (%s::text IS NULL OR city = %s) ORDER BY channel_id",
            (caller.city_filter(), caller.city_filter(), city, city),
        )
        return [Channel(**r) for r in await cur.fetchall()]


@router.post("/channels", response_model=Channel, status_code=201, responses=responses(401, 403, 404, 409))
async def add_channel(body: ChannelIn, caller: Caller, conn: Connection, stack: Stack) -> Channel:
    """Add a channel to a city; its secret is encrypted with a key kept outside the database."""
    _manage(caller, body.city)
    secret = _keys(stack).encrypt(body.secret)
    try:
        async with conn.transaction():
            cur = await conn.execute(
                "INSERT INTO notification_channels (city, name, kind, config, secret, enabled, created_by) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING channel_id",
                (body.city, body.name, body.kind, Jsonb(body.config), secret, body.enabled, caller.user_id),
            )
            (channel_id,) = await cur.fetchone() or (0,)
            await accounts.record_async(
                conn,
                caller.user_id,
                "notification.channel.add",
                "notification_channel",
                str(channel_id),
                body.city,
                {"name": body.name, "kind": body.kind, "config": body.config},
            )
    except psycopg.errors.UniqueViolation as exc:
        raise HTTPException(409, "a channel of that name exists in the city") from exc
    return Channel(**await _channel(conn, caller, channel_id))


@router.patch("/channels/{channel_id}", response_model=Channel, responses=responses(401, 403, 404))
async def change_channel(channel_id: Id, body: ChannelPatch, caller: Caller, conn: Connection, stack: Stack) -> Channel:
    """Change a channel's configuration, replace its secret, or switch it off and on."""
    row = await _channel(conn, caller, channel_id)
    _manage(caller, row["city"])
    try:
        config = CONFIGS[row["kind"]].model_validate(body.config).model_dump(by_alias=True) if body.config else None
    except ValidationError as exc:
        raise HTTPException(422, f"config of a {row['kind']} channel: {exc.errors(include_url=False)}") from exc
    async with conn.transaction():
        await conn.execute(
            "UPDATE notification_channels SET config = coalesce(%s, config), secret = coalesce(%s, secret), "
            "enabled = coalesce(%s, enabled), updated_at = now() WHERE channel_id = %s",
            (
                Jsonb(config) if config is not None else None,
                _keys(stack).encrypt(body.secret) if body.secret else None,
                body.enabled,
                channel_id,
            ),
        )
        await accounts.record_async(
            conn,
            caller.user_id,
            "notification.channel.change",
            "notification_channel",
            str(channel_id),
            row["city"],
            {"config": config, "secret_replaced": bool(body.secret), "enabled": body.enabled},
        )
    return Channel(**await _channel(conn, caller, channel_id))


@router.delete("/channels/{channel_id}", status_code=204, responses=responses(401, 403, 404))
async def delete_channel(channel_id: Id, caller: Caller, conn: Connection) -> None:
    """Delete a channel with its subscriptions and their deliveries."""
    row = await _channel(conn, caller, channel_id)
    _manage(caller, row["city"])
    async with conn.transaction():
        await conn.execute("DELETE FROM notification_channels WHERE channel_id = %s", (channel_id,))
        await accounts.record_async(
            conn,
            caller.user_id,
            "notification.channel.delete",
            "notification_channel",
            str(channel_id),
            row["city"],
            {"name": row["name"]},
        )


@router.post("/channels/{channel_id}/test", response_model=Queued, status_code=202, responses=responses(401, 403, 404))
async def send_test(channel_id: Id, caller: Caller, conn: Connection, body: TestMessage | None = None) -> Queued:
    """Queue a test message on a channel; the notifier sends it, and its delivery shows in /deliveries."""
    row = await _channel(conn, caller, channel_id)
    _manage(caller, row["city"])
    language = body.language if body else "id"
    async with conn.transaction():
        cur = await conn.execute(
            "INSERT INTO notification_outbox (kind, channel_id, city, body) VALUES ('test', %s, %s, %s) "
            "RETURNING message_id",
            (channel_id, row["city"], Jsonb({"language": language, "by": caller.user_id})),
        )
        (message_id,) = await cur.fetchone() or (0,)
        await accounts.record_async(
            conn,
            caller.user_id,
            "notification.channel.test",
            "notification_channel",
            str(channel_id),
            row["city"],
            {"message_id": message_id},
        )
    return Queued(message_id=message_id)


SUBSCRIPTION_COLUMNS = (
    "channel_id, domain, district, alert_types, min_severity, language, tier, escalate_after_s, quiet_start, "
    "quiet_end, timezone, digest_limit, digest_window_s, enabled"
)


async def _subscription(conn: Connection, caller: Caller, subscription_id: int) -> dict[str, Any]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT subscription_id, city, created_by, created_at, {SUBSCRIPTION_COLUMNS} "  # noqa: S608
            "FROM notification_subscriptions WHERE subscription_id = %s AND (%s::text[] IS NULL OR city = ANY(%s))",
            (subscription_id, caller.city_filter(), caller.city_filter()),
        )
        row = await cur.fetchone()
    if row is None:
        raise HTTPException(404, "subscription not found")
    return row


@router.get("/subscriptions", response_model=list[Subscription], responses=READ)
async def list_subscriptions(caller: Caller, conn: Connection, city: str | None = None) -> list[Subscription]:
    """The subscriptions of the caller's cities."""
    _read(caller)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT subscription_id, city, created_by, created_at, {SUBSCRIPTION_COLUMNS} "  # noqa: S608
            "FROM notification_subscriptions WHERE (%s::text[] IS NULL OR city = ANY(%s)) "
            "AND (%s::text IS NULL OR city = %s) ORDER BY subscription_id",
            (caller.city_filter(), caller.city_filter(), city, city),
        )
        return [Subscription(**r) for r in await cur.fetchall()]


@router.post("/subscriptions", response_model=Subscription, status_code=201, responses=responses(401, 403, 404))
async def add_subscription(body: SubscriptionIn, caller: Caller, conn: Connection) -> Subscription:
    """Route a city's alert events to a channel: by domain, district, severity and type, in a language,
    with quiet hours, a tier for escalation and a limit above which messages fold into a digest."""
    channel = await _channel(conn, caller, body.channel_id)
    _manage(caller, channel["city"])
    values = body.model_dump()
    async with conn.transaction():
        cur = await conn.execute(
            f"INSERT INTO notification_subscriptions (city, created_by, {SUBSCRIPTION_COLUMNS}) "  # noqa: S608
            f"VALUES (%s, %s, {', '.join(['%s'] * 14)}) RETURNING subscription_id",
            (channel["city"], caller.user_id, *[values[c.strip()] for c in SUBSCRIPTION_COLUMNS.split(",")]),
        )
        (subscription_id,) = await cur.fetchone() or (0,)
        await accounts.record_async(
            conn,
            caller.user_id,
            "notification.subscription.add",
            "notification_subscription",
            str(subscription_id),
            channel["city"],
            body.model_dump(mode="json"),
        )
    return Subscription(**await _subscription(conn, caller, subscription_id))


@router.delete("/subscriptions/{subscription_id}", status_code=204, responses=responses(401, 403, 404))
async def delete_subscription(subscription_id: Id, caller: Caller, conn: Connection) -> None:
    row = await _subscription(conn, caller, subscription_id)
    _manage(caller, row["city"])
    async with conn.transaction():
        await conn.execute("DELETE FROM notification_subscriptions WHERE subscription_id = %s", (subscription_id,))
        await accounts.record_async(
            conn,
            caller.user_id,
            "notification.subscription.delete",
            "notification_subscription",
            str(subscription_id),
            row["city"],
            {"channel_id": row["channel_id"]},
        )


@router.get("/deliveries", response_model=list[Delivery], responses=READ)
async def list_deliveries(
    caller: Caller,
    conn: Connection,
    city: str | None = None,
    status: Literal["pending", "sending", "sent", "failed", "suppressed", "held", "digested"] | None = None,
    alert_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    channel_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[Delivery]:
    """Messages of the caller's cities, newest first, each with every attempt and why it failed."""
    _read(caller)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT o.message_id, o.kind, o.city, o.channel_id, o.subscription_id, o.alert_id, o.event_id, o.status, "
            "o.attempts, o.possible_duplicate, o.last_error, o.created_at, o.sent_at, o.digest_id, "
            "coalesce((SELECT json_agg(json_build_object('attempt', a.attempt, 'started_at', a.started_at, "
            "'finished_at', a.finished_at, 'outcome', a.outcome, 'error', a.error, 'retry_at', a.retry_at) "
            "ORDER BY a.attempt) "
            "FROM notification_attempts a WHERE a.message_id = o.message_id), '[]') AS history "
            "FROM notification_outbox o WHERE (%s::text[] IS NULL OR o.city = ANY(%s)) "
            "AND (%s::text IS NULL OR o.city = %s) AND (%s::text IS NULL OR o.status = %s) "
            "AND (%s::bigint IS NULL OR o.alert_id = %s) AND (%s::bigint IS NULL OR o.channel_id = %s) "
            "ORDER BY o.message_id DESC LIMIT %s",
            (
                caller.city_filter(),
                caller.city_filter(),
                city,
                city,
                status,
                status,
                alert_id,
                alert_id,
                channel_id,
                channel_id,
                limit,
            ),
        )
        return [Delivery(**r) for r in await cur.fetchall()]


# -- the acknowledge link, for people: HTML, outside the OpenAPI document -------------------------
def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html lang=id><meta charset=utf-8><meta name=viewport content='width=device-width'>"
        f"<title>{html.escape(title)}</title><link rel=stylesheet href=/style.css><body>"
        f"<h1>{html.escape(title)}</h1>{body}</body></html>",
        status_code=status,
    )


async def _token(stack: Stack, conn: Connection, token: str) -> tuple[Any, dict[str, Any]]:
    try:
        parsed = _keys(stack).parse_ack_token(token, time.time())
    except BadToken as exc:
        raise HTTPException(404 if "expired" not in str(exc) else 410, str(exc)) from exc
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT a.alert_id, a.city, a.device_id, a.alert_type, a.state, a.severity, a.message "
            "FROM alerts a JOIN notification_subscriptions s ON s.city = a.city "
            "WHERE a.alert_id = %s AND s.subscription_id = %s",
            (parsed.alert_id, parsed.subscription_id),
        )
        alert = await cur.fetchone()
    if alert is None:
        raise HTTPException(404, "alert not found")
    return parsed, alert


@router.get("/ack/{token}", include_in_schema=False)
async def ack_page(token: str, stack: Stack, conn: Connection) -> HTMLResponse:
    try:
        _, alert = await _token(stack, conn, token)
    except HTTPException as exc:
        return _page("Tautan tidak berlaku / Link not valid", f"<p>{html.escape(str(exc.detail))}</p>", exc.status_code)
    return _page(
        "Tandai ditangani? / Acknowledge?",
        f"<p><b>{html.escape(alert['alert_type'])}</b> {html.escape(alert['device_id'])} "
        f"({html.escape(alert['severity'])}, {html.escape(alert['state'])})</p><p>{html.escape(alert['message'])}</p>"
        "<form method=post><button type=submit>Tandai ditangani / Acknowledge</button></form>",
    )


@router.post("/ack/{token}", include_in_schema=False)
async def ack(token: str, stack: Stack, conn: Connection) -> HTMLResponse:
    try:
        parsed, alert = await _token(stack, conn, token)
    except HTTPException as exc:
        return _page("Tautan tidak berlaku / Link not valid", f"<p>{html.escape(str(exc.detail))}</p>", exc.status_code)
    actor = f"link:subscription-{parsed.subscription_id}"
    try:
        async with conn.transaction():
            cur = await conn.execute(
                "INSERT INTO notification_ack_uses (nonce, actor) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                (parsed.nonce, actor),
            )
            if await cur.fetchone() is None:
                raise HTTPException(410, "this link was used already")
            await lifecycle.acknowledge(conn, parsed.alert_id, actor, "acknowledged from a notification link")
            await accounts.record_async(
                conn,
                actor,
                "alert.acknowledge",
                "alert",
                str(parsed.alert_id),
                alert["city"],
                {"via": "link", "subscription_id": parsed.subscription_id, "device_id": alert["device_id"]},
            )
    except HTTPException as exc:
        return _page("Tautan tidak berlaku / Link not valid", f"<p>{html.escape(str(exc.detail))}</p>", exc.status_code)
    except lifecycle.AlertStateError as exc:
        return _page("Sudah ditangani / Already done", f"<p>{html.escape(str(exc))}</p>", 409)
    return _page("Ditangani / Acknowledged", f"<p>{html.escape(alert['device_id'])}: {html.escape(actor)}</p>")
