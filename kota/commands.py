"""Commands to devices: the catalogue, the wire formats, and the lifecycle kept in PostgreSQL.

The API queues a command (`queue_command`, after `check_command`); the commander (`kota commander`,
commander/) publishes it on the device's command topic and resends it until the device acknowledges
it or its time to live runs out; the device answers on its own reply topic (`parse_reply`), and the
commander records each answer (`apply_reply`). Every step goes to the audit log with who did it.

    awaiting_approval ──approve──> queued ──PUBACK──> sent ──"received"──> acknowledged
                                     │                    │                      │
                                     └────────────────────┴──"succeeded"/"failed"┴──> succeeded | failed
    any state before a result ──TTL passed──> expired

Published at least once: a device may get a command more than once (a resend, or the commander cut
between publishing and recording) and must run it once only, keyed by its id (docs/integrators.md).

Stable codes: `unknown_command`, `bad_parameters`, `rate_limited` (refusals of the API), and the
reasons in `ReplyReason` (replies the commander refused).
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

COMMAND_VERSION = 1
MAX_REPLY_BYTES = 8 * 1024
MAX_RESULT_MEMBERS = 32

# -- the catalogue -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NumberParam:
    """A number a command takes, within [low, high]; `integer`: whole numbers only."""

    low: float
    high: float
    integer: bool = False
    description: str = ""

    def check(self, value: object) -> str | None:
        """Why `value` is not acceptable, or None."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number"
        if isinstance(value, float) and not math.isfinite(value):
            return "must be finite"
        if self.integer and value != int(value):
            return "must be a whole number"
        if not self.low <= value <= self.high:
            return f"must be between {self.low:g} and {self.high:g}"
        return None


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One command a device type obeys: its parameters (all required) and whether it is critical
    (a second operator must approve it before it is sent)."""

    name: str
    description: str
    params: dict[str, NumberParam] = field(default_factory=dict)
    critical: bool = False


INTERVAL_LOW_S, INTERVAL_HIGH_S = 1, 3600
_EVERY_DEVICE = (
    CommandSpec(
        "set_interval",
        "report every `seconds` seconds",
        {"seconds": NumberParam(INTERVAL_LOW_S, INTERVAL_HIGH_S, integer=True, description="seconds between readings")},
    ),
)
_BY_TYPE: dict[str, tuple[CommandSpec, ...]] = {
    "street_light": (
        CommandSpec("on", "switch the lamp on at full power"),
        CommandSpec("off", "switch the lamp off"),
        CommandSpec(
            "dim",
            "switch the lamp on at `level` percent of its power",
            {"level": NumberParam(0, 100, description="percent of full power")},
        ),
    ),
    "flood_siren": (
        CommandSpec("sound", "sound the flood siren", critical=True),
        CommandSpec("stop", "silence the flood siren"),
    ),
}


def catalogue(device_type: str) -> dict[str, CommandSpec]:
    """The commands a device of this type obeys, by name."""
    return {spec.name: spec for spec in (*_BY_TYPE.get(device_type, ()), *_EVERY_DEVICE)}


class Refusal(StrEnum):
    """Why the API refused to queue a command (stable codes clients key on)."""

    UNKNOWN_COMMAND = "unknown_command"
    BAD_PARAMETERS = "bad_parameters"
    RATE_LIMITED = "rate_limited"


class CommandRefused(ValueError):
    def __init__(self, code: Refusal, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def check_command(device_type: str, command: str, params: dict[str, Any]) -> CommandSpec:
    """The command's spec if `command` with `params` is one this device type obeys; else CommandRefused."""
    spec = catalogue(device_type).get(command)
    if spec is None:
        known = ", ".join(sorted(catalogue(device_type)))
        raise CommandRefused(Refusal.UNKNOWN_COMMAND, f"a {device_type} obeys {known}; not {command[:64]!r}")
    problems = [f"{name}: {why}" for name, p in spec.params.items() if (why := _param_problem(p, name, params))]
    problems += [f"{str(name)[:64]!r}: not a parameter of {command}" for name in params if name not in spec.params]
    if problems:
        raise CommandRefused(Refusal.BAD_PARAMETERS, "; ".join(problems))
    return spec


def _param_problem(param: NumberParam, name: str, params: dict[str, Any]) -> str | None:
    return "missing" if name not in params else param.check(params[name])


# -- the lifecycle -----------------------------------------------------------------------------
class Status(StrEnum):
    AWAITING_APPROVAL = "awaiting_approval"
    QUEUED = "queued"
    SENT = "sent"
    ACKNOWLEDGED = "acknowledged"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"


OPEN = (Status.AWAITING_APPROVAL, Status.QUEUED, Status.SENT, Status.ACKNOWLEDGED)
TO_SEND = (Status.QUEUED, Status.SENT)  # published (again) until the device acknowledges
FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.EXPIRED)

COLUMNS = (
    "command_id, device_id, city, command, params, critical, status, requested_by, approved_by, created_at, "
    "expires_at, sent_at, send_count, acknowledged_at, finished_at, result, error"
)
COMMAND_FIELDS = tuple(c.strip() for c in COLUMNS.split(","))


def as_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    record = dict(zip(COMMAND_FIELDS, row, strict=True))
    record["command_id"] = str(record["command_id"])
    return record


def audit(
    conn: psycopg.Connection, actor: str, action: str, command_id: str, city: str, details: dict[str, Any]
) -> None:
    """One audit entry for a command, in the caller's transaction (target_type `command`)."""
    conn.execute(
        "INSERT INTO audit_log (actor, action, target_type, target_id, city, details) "
        "VALUES (%s, %s, 'command', %s, %s, %s)",
        (actor, action, command_id, city, Jsonb(details)),
    )


def queue_command(
    conn: psycopg.Connection,
    *,
    device_id: str,
    city: str,
    device_type: str,
    command: str,
    params: dict[str, Any],
    actor: str,
    ttl_s: float,
    per_device_per_minute: int,
) -> dict[str, Any]:
    """Check and queue a command (awaiting approval when critical), audited; CommandRefused when the
    catalogue refuses it or the device has had `per_device_per_minute` commands in the last minute."""
    spec = check_command(device_type, command, params)
    with conn.transaction():
        # One request per device at a time, so two at once cannot both slip under the limit.
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('kota-command:' || %s, 0))", (device_id,))
        row = conn.execute(
            "SELECT count(*) FROM device_commands WHERE device_id = %s AND created_at > now() - interval '1 minute'",
            (device_id,),
        ).fetchone()
        if row is not None and row[0] >= per_device_per_minute:
            raise CommandRefused(
                Refusal.RATE_LIMITED, f"{device_id} has had {row[0]} commands in the last minute (the limit)"
            )
        status = Status.AWAITING_APPROVAL if spec.critical else Status.QUEUED
        created = conn.execute(
            f"INSERT INTO device_commands (command_id, device_id, city, command, params, critical, status, "  # noqa: S608
            f"requested_by, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now() + %s * interval '1 second') "
            f"RETURNING {COLUMNS}",
            (uuid.uuid4(), device_id, city, command, Jsonb(params), spec.critical, status, actor, ttl_s),
        ).fetchone()
        assert created is not None
        record = as_dict(created)
        audit(
            conn,
            actor,
            "command.requested",
            record["command_id"],
            city,
            {"device_id": device_id, "command": command, "params": params, "status": status.value},
        )
    return record


class ApprovalRefused(ValueError):
    """`code`: not_awaiting_approval (409) or own_command (403)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def approve_command(conn: psycopg.Connection, command_id: str, device_id: str, actor: str) -> dict[str, Any]:
    """A second operator's approval of a critical command: it is queued for sending."""
    with conn.transaction():
        row = conn.execute(
            "SELECT status, requested_by, city FROM device_commands WHERE command_id = %s AND device_id = %s "
            "FOR UPDATE",
            (command_id, device_id),
        ).fetchone()
        if row is None:
            raise LookupError(command_id)
        status, requested_by, city = row
        if status != Status.AWAITING_APPROVAL:
            raise ApprovalRefused("not_awaiting_approval", f"the command is {status}, not awaiting approval")
        if requested_by == actor:
            raise ApprovalRefused("own_command", "a critical command needs a second operator: not the one who asked")
        updated = conn.execute(
            f"UPDATE device_commands SET status = 'queued', approved_by = %s WHERE command_id = %s RETURNING {COLUMNS}",  # noqa: S608
            (actor, command_id),
        ).fetchone()
        assert updated is not None
        audit(conn, actor, "command.approved", command_id, city, {"device_id": device_id, "requested_by": requested_by})
    return as_dict(updated)


# -- on the wire -------------------------------------------------------------------------------
def command_message(command_id: str, command: str, params: dict[str, Any], expires_at: dt.datetime) -> bytes:
    """What the device receives on its command topic."""
    return orjson.dumps(
        {"v": COMMAND_VERSION, "id": command_id, "command": command, "params": params, "expires_at": expires_at},
        option=orjson.OPT_UTC_Z,
    )


class ReplyStatus(StrEnum):
    RECEIVED = "received"  # the device has the command (an acknowledgement, not a result)
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ReplyReason(StrEnum):
    """Why the commander refused a device's reply (logged with the device; stable codes)."""

    OVERSIZED = "oversized"
    NOT_UTF8 = "not_utf8"
    MALFORMED_JSON = "malformed_json"
    BAD_SHAPE = "bad_shape"
    BAD_ID = "bad_id"
    BAD_STATUS = "bad_status"
    BAD_TOPIC = "bad_topic"
    UNKNOWN_COMMAND = "unknown_command"  # no such command for this device (another's, or none)
    ALREADY_FINISHED = "already_finished"  # a result, or expiry, came first: nothing changes


@dataclass(frozen=True, slots=True)
class Reply:
    command_id: str
    status: ReplyStatus
    result: dict[str, Any] | None = None
    error: str | None = None


def parse_reply(payload: bytes) -> Reply | ReplyReason:
    """A reply payload → a Reply, or the reason it is refused. Never raises, whatever the bytes.

    {"id": "<command id>", "status": "received" | "succeeded" | "failed",
     "result": {...} (optional, at most 32 members), "error": "text" (optional, kept to 500 chars)}
    """
    if len(payload) > MAX_REPLY_BYTES:
        return ReplyReason.OVERSIZED
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return ReplyReason.NOT_UTF8
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:
        return ReplyReason.MALFORMED_JSON
    if not isinstance(body, dict):
        return ReplyReason.BAD_SHAPE
    raw_id, raw_status = body.get("id"), body.get("status")
    if not isinstance(raw_id, str):
        return ReplyReason.BAD_ID
    try:
        command_id = str(uuid.UUID(raw_id))
    except ValueError:
        return ReplyReason.BAD_ID
    if not isinstance(raw_status, str) or raw_status not in ReplyStatus.__members__.values():
        return ReplyReason.BAD_STATUS
    result, error = body.get("result"), body.get("error")
    if result is not None and (not isinstance(result, dict) or len(result) > MAX_RESULT_MEMBERS):
        return ReplyReason.BAD_SHAPE
    if error is not None and not isinstance(error, str):
        return ReplyReason.BAD_SHAPE
    # PostgreSQL's text and jsonb hold no NUL character: refused here, not by the database.
    if (error is not None and "\x00" in error) or (result is not None and b"\\u0000" in orjson.dumps(result)):
        return ReplyReason.BAD_SHAPE
    return Reply(command_id, ReplyStatus(raw_status), result, error[:500] if error is not None else None)


def apply_reply(conn: psycopg.Connection, device_id: str, reply: Reply) -> Status | ReplyReason:
    """Record a device's reply to one of its own commands; the new status, or why nothing changed.
    The device is the one whose reply topic it came on (the broker lets only it, or its gateway, write there)."""
    with conn.transaction():
        row = conn.execute(
            "SELECT status, city FROM device_commands WHERE command_id = %s AND device_id = %s FOR UPDATE",
            (reply.command_id, device_id),
        ).fetchone()
        if row is None:
            return ReplyReason.UNKNOWN_COMMAND
        status, city = Status(row[0]), row[1]
        if status in FINISHED or status == Status.AWAITING_APPROVAL:
            return ReplyReason.ALREADY_FINISHED if status in FINISHED else ReplyReason.UNKNOWN_COMMAND
        if reply.status == ReplyStatus.RECEIVED:
            if status == Status.ACKNOWLEDGED:
                return status  # a resend acknowledged again: nothing new
            conn.execute(
                "UPDATE device_commands SET status = 'acknowledged', acknowledged_at = now() WHERE command_id = %s",
                (reply.command_id,),
            )
            audit(conn, device_id, "command.acknowledged", reply.command_id, city, {"device_id": device_id})
            return Status.ACKNOWLEDGED
        new = Status.SUCCEEDED if reply.status == ReplyStatus.SUCCEEDED else Status.FAILED
        conn.execute(
            "UPDATE device_commands SET status = %s, acknowledged_at = coalesce(acknowledged_at, now()), "
            "finished_at = now(), result = %s, error = %s WHERE command_id = %s",
            (new, Jsonb(reply.result) if reply.result is not None else None, reply.error, reply.command_id),
        )
        audit(
            conn,
            device_id,
            f"command.{new.value}",
            reply.command_id,
            city,
            {"device_id": device_id, "result": reply.result, "error": reply.error},
        )
        return new


def expire_commands(conn: psycopg.Connection, actor: str) -> list[str]:
    """Commands whose time to live passed without a result become expired (audited); their ids."""
    with conn.transaction():
        rows = conn.execute(
            "UPDATE device_commands SET status = 'expired', finished_at = now() "
            "WHERE status = ANY(%s) AND expires_at <= now() RETURNING command_id, city, device_id, status",
            ([s.value for s in OPEN],),
        ).fetchall()
        for command_id, city, device_id, _ in rows:
            audit(conn, actor, "command.expired", str(command_id), city, {"device_id": device_id})
    return [str(r[0]) for r in rows]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A command due to be published: where, and what."""

    command_id: str
    topic: str
    payload: bytes
    city: str
    device_id: str


def due_commands(conn: psycopg.Connection, resend_after_s: float, limit: int = 500) -> list[Outgoing]:
    """Commands to publish now: queued ones, and sent ones not acknowledged within `resend_after_s`."""
    from kota.contract import device_command_topic

    rows = conn.execute(
        "SELECT c.command_id, c.command, c.params, c.expires_at, d.city, d.domain, d.device_id "
        "FROM device_commands c JOIN devices d USING (device_id) "
        "WHERE c.status = ANY(%s) AND c.expires_at > now() AND d.enabled "
        "AND (c.last_sent_at IS NULL OR c.last_sent_at <= now() - %s * interval '1 second') "
        "ORDER BY c.created_at LIMIT %s",
        ([s.value for s in TO_SEND], resend_after_s, limit),
    ).fetchall()
    return [
        Outgoing(
            str(command_id),
            device_command_topic(city, domain, device_id),
            command_message(str(command_id), command, params, expires_at),
            city,
            device_id,
        )
        for command_id, command, params, expires_at, city, domain, device_id in rows
    ]


def record_published(conn: psycopg.Connection, outgoing: Outgoing, actor: str) -> None:
    """The broker took the command (its PUBACK): it is sent, and published again after the resend
    interval until the device acknowledges it. Whether the device is online the broker cannot say:
    the ingest gateways' wildcard subscription matches every command topic (denied at delivery by
    its ACL), so a PUBACK never reports "no matching subscribers"."""
    with conn.transaction():
        row = conn.execute(
            "SELECT status, send_count FROM device_commands WHERE command_id = %s FOR UPDATE", (outgoing.command_id,)
        ).fetchone()
        if row is None or row[0] not in TO_SEND:
            return  # answered or expired meanwhile
        conn.execute(
            "UPDATE device_commands SET send_count = send_count + 1, last_sent_at = now(), status = 'sent', "
            "sent_at = coalesce(sent_at, now()) WHERE command_id = %s",
            (outgoing.command_id,),
        )
        if row[0] == Status.QUEUED:
            audit(conn, actor, "command.sent", outgoing.command_id, outgoing.city, {"device_id": outgoing.device_id})
