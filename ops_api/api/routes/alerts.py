"""Alerts: list and filter, detail with history, acknowledge and clear with a comment."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from kota import alerts as lifecycle
from kota.contract import Domain
from ops_api import accounts, queries
from ops_api.api.deps import Connection
from ops_api.api.errors import READ, responses
from ops_api.auth import Caller, require

router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"])
Severity = Literal["critical", "major", "minor", "warning"]
State = Literal["active", "acknowledged", "cleared"]
AlertId = Annotated[int, Path(ge=1, le=2**62)]


class Alert(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "alert_id": 17,
                    "device_id": "bandung-water-level-001",
                    "city": "bandung",
                    "domain": "environment",
                    "district": "regol",
                    "alert_type": "flood_siaga",
                    "metric": "currentLevel",
                    "severity": "major",
                    "state": "active",
                    "message": "Siaga 2 at 162 cm, up from Siaga 3",
                    "count": 12,
                    "first_ts": "2026-11-22T06:10:00Z",
                    "last_ts": "2026-11-22T07:58:00Z",
                    "last_value": 162.0,
                    "details": {},
                    "created_at": "2026-11-22T06:10:01Z",
                    "updated_at": "2026-11-22T07:58:01Z",
                    "acknowledged_at": None,
                    "acknowledged_by": None,
                    "cleared_at": None,
                    "cleared_by": None,
                }
            ]
        }
    )
    alert_id: int
    device_id: str
    city: str
    domain: str
    district: str | None
    alert_type: str
    metric: str
    severity: Severity
    state: State
    message: str
    count: int = Field(description="signals folded into this alert")
    first_ts: dt.datetime
    last_ts: dt.datetime
    last_value: float | None
    details: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime
    acknowledged_at: dt.datetime | None
    acknowledged_by: str | None
    cleared_at: dt.datetime | None
    cleared_by: str | None


class AlertEvent(BaseModel):
    event_id: int
    at: dt.datetime
    action: Literal["raised", "escalated", "acknowledged", "cleared"]
    actor: str
    severity: Severity
    comment: str | None


class AlertDetail(Alert):
    history: list[AlertEvent]


class AlertPage(BaseModel):
    alerts: list[Alert]
    next_before_id: int | None = Field(description="pass as `before_id` for the next page; null on the last")


class Comment(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"comment": "Petugas BPBD sudah di lokasi"}]})
    comment: str | None = Field(None, max_length=2000)


@router.get("", response_model=AlertPage, responses=READ)
async def list_alerts(
    caller: Caller,
    conn: Connection,
    city: str | None = None,
    domain: Domain | None = None,
    severity: Severity | None = None,
    state: Annotated[State | Literal["open"] | None, Query(description="open = active or acknowledged")] = None,
    device_id: str | None = None,
    since: Annotated[dt.datetime | None, Query(description="last signal at or after")] = None,
    until: Annotated[dt.datetime | None, Query(description="first signal before")] = None,
    before_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AlertPage:
    """Alerts of the caller's cities, newest first, filtered by city, domain, severity, state, device and time."""
    rows = await queries.alerts(
        conn,
        caller.city_filter(),
        city=city,
        domain=domain,
        severity=severity,
        state=state,
        device_id=device_id,
        since=since,
        until=until,
        before_id=before_id,
        limit=limit,
    )
    return AlertPage(
        alerts=[Alert(**r) for r in rows], next_before_id=rows[-1]["alert_id"] if len(rows) == limit else None
    )


async def _visible(conn: Connection, caller: Caller, alert_id: int) -> dict[str, Any]:
    row = await queries.alert(conn, caller.city_filter(), alert_id)
    if row is None:
        raise HTTPException(404, "alert not found")
    return row


@router.get("/{alert_id}", response_model=AlertDetail, responses=READ)
async def alert_detail(alert_id: AlertId, caller: Caller, conn: Connection) -> AlertDetail:
    """One alert with its history: raised, each escalation, acknowledged and cleared, with who and when."""
    return AlertDetail(**await _visible(conn, caller, alert_id))


async def _act(action: str, alert_id: int, body: Comment | None, caller: Caller, conn: Connection) -> AlertDetail:
    require(caller, "operator", doing=f"{action} alerts")
    row = await _visible(conn, caller, alert_id)
    comment = body.comment if body else None
    step = lifecycle.acknowledge if action == "acknowledge" else lifecycle.clear
    try:
        async with conn.transaction():
            await step(conn, alert_id, caller.user_id, comment)
            await accounts.record_async(
                conn,
                caller.user_id,
                f"alert.{action}",
                "alert",
                str(alert_id),
                row["city"],
                {"comment": comment, "device_id": row["device_id"]},
            )
    except lifecycle.AlertStateError as exc:
        raise HTTPException(409, str(exc)) from exc
    return AlertDetail(**await _visible(conn, caller, alert_id))


@router.post("/{alert_id}/acknowledge", response_model=AlertDetail, responses=responses(401, 403, 404, 409))
async def acknowledge(alert_id: AlertId, caller: Caller, conn: Connection, body: Comment | None = None) -> AlertDetail:
    """Acknowledge an active alert (operators and admins); recorded with who, when and the comment."""
    return await _act("acknowledge", alert_id, body, caller, conn)


@router.post("/{alert_id}/clear", response_model=AlertDetail, responses=responses(401, 403, 404, 409))
async def clear(alert_id: AlertId, caller: Caller, conn: Connection, body: Comment | None = None) -> AlertDetail:
    """Clear an open alert by hand (operators and admins); recorded with who, when and the comment."""
    return await _act("clear", alert_id, body, caller, conn)
