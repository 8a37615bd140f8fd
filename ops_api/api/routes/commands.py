"""Commands to devices: send one, follow it, approve a critical one (kota/commands.py).

Operators and admins send and approve, in their cities; integrators read. A refusal carries a stable
`code` beside its message: unknown_command, bad_parameters (422), rate_limited (429), own_command
(403: a critical command is approved by a second operator), not_awaiting_approval (409).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from kota import commands
from ops_api.api.deps import Connection, Settings, Stack
from ops_api.api.errors import READ, responses
from ops_api.auth import Caller, Principal, require

router = APIRouter(prefix="/api/v1/devices", tags=["commands"])
CommandId = Annotated[uuid.UUID, Path(description="the command's id (a UUID)")]


class NewCommand(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"command": "dim", "params": {"level": 40}, "ttl_s": 600}]}
    )
    command: str = Field(min_length=1, max_length=64, description="a command of the device type's catalogue")
    params: dict[str, Any] = Field(default_factory=dict, max_length=16)
    ttl_s: float | None = Field(
        None, ge=10, le=7 * 86400, description="expire if no result by then (default KOTA_API_COMMAND_TTL_S)"
    )


class CommandView(BaseModel):
    command_id: str
    device_id: str
    city: str
    command: str
    params: dict[str, Any]
    critical: bool = Field(description="needs a second operator's approval before it is sent")
    status: commands.Status
    requested_by: str
    approved_by: str | None
    created_at: dt.datetime
    expires_at: dt.datetime
    sent_at: dt.datetime | None
    send_count: int = Field(description="times published to the broker (resends included)")
    acknowledged_at: dt.datetime | None
    finished_at: dt.datetime | None
    result: dict[str, Any] | None
    error: str | None


class CommandSpecView(BaseModel):
    command: str
    description: str
    critical: bool
    params: dict[str, dict[str, Any]]


class CommandList(BaseModel):
    device_id: str
    catalogue: list[CommandSpecView] = Field(description="what this device obeys")
    commands: list[CommandView] = Field(description="newest first")


async def _device(conn: Any, caller: Principal, device_id: str) -> tuple[str, str]:
    """The device's (city, type) if the caller may see it; else 404."""
    cur = await conn.execute(
        "SELECT city, device_type FROM devices WHERE device_id = %s AND (%s::text[] IS NULL OR city = ANY(%s))",
        (device_id, caller.city_filter(), caller.city_filter()),
    )
    row = await cur.fetchone()
    if row is None:
        raise HTTPException(404, "device not found")
    return row[0], row[1]


def _refused(status: int, code: str, message: str) -> HTTPException:
    return HTTPException(status, {"code": code, "message": message})


REFUSALS: dict[int | str, dict[str, Any]] = {
    422: {"description": "unknown_command or bad_parameters: `detail` is {code, message}"},
    429: {"description": "rate_limited: too many commands for this device in the last minute"},
}


@router.post(
    "/{device_id}/commands",
    response_model=CommandView,
    status_code=201,
    responses={**responses(401, 403, 404), **REFUSALS},
)
async def send_command(
    device_id: str, body: NewCommand, caller: Caller, conn: Connection, stack: Stack, settings: Settings
) -> dict[str, Any]:
    """Queue a command for a device (operators and admins). A critical one (the flood siren's `sound`)
    waits for a second operator's approval; the commander sends the rest at once, and again until the
    device acknowledges, within the time to live."""
    require(caller, "operator", doing="send commands")
    city, device_type = await _device(conn, caller, device_id)

    def queue() -> dict[str, Any]:
        with psycopg.connect(stack.postgres_dsn) as sync_conn:
            return commands.queue_command(
                sync_conn,
                device_id=device_id,
                city=city,
                device_type=device_type,
                command=body.command,
                params=body.params,
                actor=caller.user_id,
                ttl_s=body.ttl_s or settings.command_ttl_s,
                per_device_per_minute=settings.commands_per_device_per_minute,
            )

    try:
        return await asyncio.to_thread(queue)
    except commands.CommandRefused as refused:
        status = 429 if refused.code == commands.Refusal.RATE_LIMITED else 422
        raise _refused(status, refused.code.value, refused.message) from None


@router.get("/{device_id}/commands", response_model=CommandList, responses=READ)
async def list_commands(
    device_id: str, caller: Caller, conn: Connection, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict[str, Any]:
    """A device's commands, newest first, with the catalogue of what it obeys (every role, in its cities)."""
    _, device_type = await _device(conn, caller, device_id)
    cur = await conn.execute(
        f"SELECT {commands.COLUMNS} FROM device_commands WHERE device_id = %s "  # noqa: S608
        "ORDER BY created_at DESC LIMIT %s",
        (device_id, limit),
    )
    spec = [
        {
            "command": s.name,
            "description": s.description,
            "critical": s.critical,
            "params": {name: {"low": p.low, "high": p.high, "integer": p.integer} for name, p in s.params.items()},
        }
        for s in commands.catalogue(device_type).values()
    ]
    return {"device_id": device_id, "catalogue": spec, "commands": [commands.as_dict(r) for r in await cur.fetchall()]}


@router.get("/{device_id}/commands/{command_id}", response_model=CommandView, responses=READ)
async def command_status(device_id: str, command_id: CommandId, caller: Caller, conn: Connection) -> dict[str, Any]:
    """One command and where it is in its lifecycle."""
    await _device(conn, caller, device_id)
    cur = await conn.execute(
        f"SELECT {commands.COLUMNS} FROM device_commands WHERE command_id = %s AND device_id = %s",  # noqa: S608
        (str(command_id), device_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise HTTPException(404, "command not found")
    return commands.as_dict(row)


@router.post(
    "/{device_id}/commands/{command_id}/approve", response_model=CommandView, responses=responses(401, 403, 404, 409)
)
async def approve_command(
    device_id: str, command_id: CommandId, caller: Caller, conn: Connection, stack: Stack
) -> dict[str, Any]:
    """Approve a critical command (an operator or admin other than the one who asked): it is sent."""
    require(caller, "operator", doing="approve commands")
    await _device(conn, caller, device_id)

    def approve() -> dict[str, Any]:
        with psycopg.connect(stack.postgres_dsn) as sync_conn:
            return commands.approve_command(sync_conn, str(command_id), device_id, caller.user_id)

    try:
        return await asyncio.to_thread(approve)
    except LookupError:
        raise HTTPException(404, "command not found") from None
    except commands.ApprovalRefused as refused:
        raise _refused(403 if refused.code == "own_command" else 409, refused.code, str(refused)) from None
