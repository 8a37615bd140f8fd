"""A city's alert rules (docs/rules.md): read them, change them as a new version, see the versions,
roll back, and preview what a rule would have raised over the stored data before saving it.

Everyone who sees the city reads its rules; operators and admins change them (integrators may not:
403); another city's rules answer 404, as if the city did not exist. Every change is a version with
its author and comment and an audit_log entry (processing.rulebook.save_version).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field

from ops_api import queries
from ops_api.api.deps import Connection
from ops_api.api.errors import READ, responses
from ops_api.auth import Caller, require, require_city
from processing import rulebook
from processing.rulebook import CustomRule, RuleSet

router = APIRouter(prefix="/api/v1/cities/{city}/rules", tags=["rules"])
MAX_PREVIEW_DAYS = 31  # agg_1m's retention is longer; a month of minutes per device is 45,000 rows
EDIT = responses(401, 403, 404, 409)  # and 422: a rule set that does not validate

RULE_EXAMPLE: dict[str, Any] = {
    "id": "pm25-high",
    "kind": "threshold",
    "metric": "pm25",
    "op": "above",
    "value": 55.4,
    "for_s": 600,
    "deadband": 5,
    "severity": "major",
    "scope": {"district": "coblong"},
}


class RulesVersion(BaseModel):
    city: str
    version: int = Field(description="0: the defaults (the city's rules were never changed)")
    author: str
    comment: str
    created_at: dt.datetime | None
    rolled_back_to: int | None = Field(description="the version this one copies, for a rollback")
    rules: RuleSet


class VersionSummary(BaseModel):
    version: int
    author: str
    comment: str
    created_at: dt.datetime | None
    rolled_back_to: int | None
    custom_rules: int


class RulesChange(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"rules": {"rules": [RULE_EXAMPLE]}, "comment": "PM2.5 over Coblong's schools"}]
        },
    )
    rules: RuleSet
    comment: str = Field(max_length=2000)
    expected_version: int | None = Field(
        None, ge=0, description="the version this change starts from: 409 if the rules changed since"
    )


class Rollback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=0, le=2**31 - 1, description="the version to restore (0: the defaults)")
    comment: str = Field("", max_length=2000)


class PreviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"rule": RULE_EXAMPLE, "days": 7}]})
    rule: CustomRule
    days: float = Field(7, gt=0, le=MAX_PREVIEW_DAYS, allow_inf_nan=False)


class PreviewEpisode(BaseModel):
    device_id: str
    raised_at: dt.datetime = Field(description="start of the minute that raised the alert")
    last_at: dt.datetime = Field(description="start of the last minute that signalled")
    cleared_at: dt.datetime | None = Field(description="start of the minute back past the deadband; null: open")
    minutes: int = Field(description="minutes that signalled (the alert's count)")
    worst: float


class PreviewResult(BaseModel):
    city: str
    rule: CustomRule
    since: dt.datetime
    devices_judged: int
    alerts: int
    devices_alerted: list[str]
    episodes: list[PreviewEpisode]


async def apply_to_environment(
    conn: Connection, city: str, noise: list[dict[str, Any]], water: list[dict[str, Any]]
) -> None:
    """The environment view's noise limits and gate thresholds as the processor judges them, for a
    city whose rules were edited (version 0 keeps the API's own defaults, as before): the rule set's
    per-device values, else the device's table row, else the rule set's default."""
    current = await rulebook.city_version(conn, city)
    if current is None or current.version == 0:
        return
    rules = current.rules
    for r in noise:
        limit = rules.noise.sensors.get(r["device_id"])
        if limit is None and not r.get("own_limit"):
            limit = rules.noise.default_dba
        if limit is not None:
            r["limit_dba"] = limit
            r["exceeds_limit"] = r["laeq"] is not None and r["laeq"] > limit
            r["excess_db"] = round(r["laeq"] - limit, 1) if r["exceeds_limit"] else 0.0
    for r in water:
        gate = rules.flood.gates.get(r["device_id"])
        if gate is None and not r.get("own_thresholds"):
            gate = rules.flood.default
        if gate is not None:
            r["siaga3_cm"], r["siaga2_cm"], r["siaga1_cm"], r["rise_limit_cm_per_h"] = gate.as_tuple()
            r["rising_fast"] = r["rise_cm_per_h"] is not None and r["rise_cm_per_h"] > gate.rise_cm_per_h


async def _visible_city(conn: Connection, caller: Caller, city: str) -> None:
    require_city(caller, city)
    if not await queries.city_exists(conn, city):
        raise HTTPException(404, "city not found")


def _at(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def _view(v: rulebook.Version) -> RulesVersion:
    return RulesVersion(
        city=v.city,
        version=v.version,
        author=v.author,
        comment=v.comment,
        created_at=v.created_at,
        rolled_back_to=v.rolled_back_to,
        rules=v.rules,
    )


CityName = Annotated[str, Path(max_length=64)]


@router.get("", response_model=RulesVersion, responses=READ)
async def current_rules(city: CityName, caller: Caller, conn: Connection) -> RulesVersion:
    """The city's rules now: ISPU categories that alert, flood-gate thresholds, noise limits and
    custom rules, with the version, who made it and why."""
    await _visible_city(conn, caller, city)
    found = await rulebook.city_version(conn, city)
    assert found is not None
    return _view(found)


@router.put("", response_model=RulesVersion, responses=EDIT)
async def change_rules(city: CityName, body: RulesChange, caller: Caller, conn: Connection) -> RulesVersion:
    """Replace the city's rules with a new version (operators and admins). The processor applies it
    within seconds, from its next batch; alerts it raises record the version (details.rules_version)."""
    await _visible_city(conn, caller, city)
    require(caller, "operator", doing="change alert rules")
    return await _save(conn, caller, city, body.rules, body.comment, body.expected_version, None)


async def _save(
    conn: Connection,
    caller: Caller,
    city: str,
    rules: RuleSet,
    comment: str,
    expected: int | None,
    rolled_back_to: int | None,
) -> RulesVersion:
    if foreign := await rulebook.foreign_devices(conn, city, rules):
        raise HTTPException(422, f"not devices of {city}: {', '.join(foreign[:10])}")
    try:
        version = await rulebook.save_version(
            conn,
            city,
            rules,
            author=caller.user_id,
            comment=comment,
            expected_version=expected,
            rolled_back_to=rolled_back_to,
        )
    except rulebook.RulesConflict as exc:
        raise HTTPException(409, str(exc)) from exc
    saved = await rulebook.city_version(conn, city, version)
    assert saved is not None
    return _view(saved)


@router.get("/versions", response_model=list[VersionSummary], responses=READ)
async def versions(city: CityName, caller: Caller, conn: Connection) -> list[VersionSummary]:
    """Every version of the city's rules, newest first, down to version 0 (the defaults)."""
    await _visible_city(conn, caller, city)
    return [
        VersionSummary(
            version=v.version,
            author=v.author,
            comment=v.comment,
            created_at=v.created_at,
            rolled_back_to=v.rolled_back_to,
            custom_rules=len(v.rules.rules),
        )
        for v in await rulebook.city_versions(conn, city)
    ]


@router.get("/versions/{version}", response_model=RulesVersion, responses=READ)
async def one_version(
    city: CityName, version: Annotated[int, Path(ge=0, le=2**31 - 1)], caller: Caller, conn: Connection
) -> RulesVersion:
    """One version of the city's rules."""
    await _visible_city(conn, caller, city)
    found = await rulebook.city_version(conn, city, version)
    if found is None:
        raise HTTPException(404, "version not found")
    return _view(found)


@router.post("/rollback", response_model=RulesVersion, responses=EDIT)
async def rollback(city: CityName, body: Rollback, caller: Caller, conn: Connection) -> RulesVersion:
    """Restore an earlier version (operators and admins): a new version with its rules, so the
    history keeps what was undone."""
    await _visible_city(conn, caller, city)
    require(caller, "operator", doing="change alert rules")
    found = await rulebook.city_version(conn, city, body.version)
    if found is None:
        raise HTTPException(404, "version not found")
    comment = body.comment or f"rollback to version {body.version}"
    return await _save(conn, caller, city, found.rules, comment, None, body.version)


@router.post("/preview", response_model=PreviewResult, responses=READ)
async def preview(city: CityName, body: PreviewRequest, caller: Caller, conn: Connection) -> PreviewResult:
    """What a proposed custom rule would have raised over the last `days` of stored one-minute
    aggregates: how many alerts, on which devices, from when to when. Judged by the processor's own
    code (processing.rulebook.judge), so it is what the processor would have raised. Saves nothing."""
    await _visible_city(conn, caller, city)
    if foreign := await rulebook.foreign_devices(conn, city, RuleSet(rules=[body.rule])):
        raise HTTPException(422, f"not devices of {city}: {', '.join(foreign)}")
    since_ms = int((time.time() - body.days * 86_400) * 1000)
    try:
        judged, found = await rulebook.preview(conn, city, body.rule, since_ms)
    except rulebook.PreviewTooLarge as exc:
        raise HTTPException(422, str(exc)) from exc
    return PreviewResult(
        city=city,
        rule=body.rule,
        since=_at(since_ms),
        devices_judged=len(judged),
        alerts=len(found),
        devices_alerted=sorted({e.device_id for e in found}),
        episodes=[
            PreviewEpisode(
                device_id=e.device_id,
                raised_at=_at(e.raised_ms),
                last_at=_at(e.last_ms),
                cleared_at=_at(e.cleared_ms) if e.cleared_ms is not None else None,
                minutes=e.minutes,
                worst=e.worst,
            )
            for e in found
        ],
    )
