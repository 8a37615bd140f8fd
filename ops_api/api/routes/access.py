"""Who am I, and the audit log."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from ops_api import queries
from ops_api.api.deps import Connection
from ops_api.api.errors import responses
from ops_api.auth import Caller, require

router = APIRouter(prefix="/api/v1", tags=["access"])


class Me(BaseModel):
    user_id: str
    role: str
    cities: list[str] | None = Field(description="null for an admin: every city")


class AuditEntry(BaseModel):
    event_id: int
    at: dt.datetime
    actor: str
    action: str = Field(examples=["alert.acknowledge", "device.created"])
    target_type: str
    target_id: str
    city: str | None
    details: dict[str, Any]


class AuditPage(BaseModel):
    entries: list[AuditEntry]
    next_before_id: int | None


@router.get("/me", response_model=Me, responses=responses(401))
async def me(caller: Caller) -> Me:
    """The caller's account: role and cities."""
    return Me(user_id=caller.user_id, role=caller.role, cities=caller.city_filter())


@router.get("/audit", response_model=AuditPage, responses=responses(401, 403))
async def audit(
    caller: Caller,
    conn: Connection,
    city: str | None = None,
    before_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AuditPage:
    """Alert actions, device changes, accounts and tokens: who, what, when (operators and admins,
    for their cities)."""
    require(caller, "operator", doing="read the audit log")
    rows = await queries.audit(conn, caller.city_filter(), city=city, before_id=before_id, limit=limit)
    return AuditPage(
        entries=[AuditEntry(**r) for r in rows], next_before_id=rows[-1]["event_id"] if len(rows) == limit else None
    )
