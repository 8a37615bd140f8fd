"""Alerts as operators expect them, shared by the processor (raise, update, auto-clear) and the API
(acknowledge, clear).

One open alert per (device, type): a repeat updates it (count, last value, last time) and can
only raise its severity; a new alert is raised only after the old one was cleared. Lifecycle:
active -> acknowledged -> cleared, each step written to `alert_events` with who and when. An
alert clears itself once its metric has reported for `clear_after_s` (event time) past its last
signal, so a flapping series keeps one alert instead of raising hundreds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import psycopg
from psycopg.types.json import Jsonb

Severity = Literal["critical", "major", "minor", "warning"]
SEVERITY_RANK: dict[str, int] = {"warning": 1, "minor": 2, "major": 3, "critical": 4}
SYSTEM_ACTOR = "kota-processor"


class AlertStateError(ValueError):
    """An action that the alert's state does not allow (acknowledging a cleared alert)."""


@dataclass(frozen=True, slots=True)
class Signal:
    """One observation that an alert condition holds, from a detector or a domain rule."""

    device_id: str
    alert_type: str
    metric: str
    severity: Severity
    ts_ms: int
    value: float | None
    message: str
    details: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class _Merged:
    """The signals of one (device, type) in a batch, in time order."""

    signals: list[Signal]

    @property
    def first(self) -> Signal:
        return self.signals[0]

    @property
    def last(self) -> Signal:
        return self.signals[-1]

    def steps_up(self, above: str | None = None) -> list[Signal]:
        """The signals that raised the severity beyond every one before them (and beyond `above`)."""
        steps = []
        rank = SEVERITY_RANK[above] if above else 0
        for signal in self.signals:
            if SEVERITY_RANK[signal.severity] > rank:
                steps.append(signal)
                rank = SEVERITY_RANK[signal.severity]
        return steps


@dataclass(frozen=True, slots=True)
class AlertChange:
    alert_id: int
    device_id: str
    alert_type: str
    action: str  # raised, updated, escalated, acknowledged, cleared
    severity: str


def _merge(signals: Iterable[Signal]) -> dict[tuple[str, str], _Merged]:
    merged: dict[tuple[str, str], _Merged] = {}
    for signal in signals:
        merged.setdefault((signal.device_id, signal.alert_type), _Merged([])).signals.append(signal)
    for m in merged.values():
        m.signals.sort(key=lambda signal: signal.ts_ms)
    return merged


async def apply_signals(conn: psycopg.AsyncConnection, signals: Iterable[Signal],
                        clear_after_s: dict[str, float], default_clear_after_s: float) -> list[AlertChange]:
    """Raise or update alerts for the signals, inside the caller's transaction."""
    merged = _merge(signals)
    if not merged:
        return []
    devices = [k[0] for k in merged]
    types = [k[1] for k in merged]
    cur = await conn.execute(
        "SELECT a.device_id, a.alert_type, a.alert_id, a.severity FROM alerts a "
        "JOIN unnest(%s::text[], %s::text[]) AS k(device_id, alert_type) USING (device_id, alert_type) "
        "WHERE a.state <> 'cleared' ORDER BY a.alert_id FOR UPDATE OF a", (devices, types))
    open_alerts = {(d, t): (alert_id, severity) for d, t, alert_id, severity in await cur.fetchall()}
    changes: list[AlertChange] = []
    for (device_id, alert_type), m in merged.items():
        count = len(m.signals)
        if (device_id, alert_type) in open_alerts:
            alert_id, old = open_alerts[(device_id, alert_type)]
            steps = m.steps_up(above=old)
        else:
            steps = m.steps_up()
            raised = steps.pop(0)
            cur = await conn.execute(
                "INSERT INTO alerts (device_id, city, domain, alert_type, metric, severity, message, count, "
                "first_ts, last_ts, last_value, details, clear_after_s) SELECT device_id, city, domain, %s, %s, %s, "
                "%s, 0, kota_ms(%s), kota_ms(%s), %s, %s, %s FROM devices WHERE device_id = %s RETURNING alert_id",
                (alert_type, raised.metric, raised.severity, raised.message, m.first.ts_ms, m.first.ts_ms,
                 raised.value, Jsonb(raised.details), clear_after_s.get(alert_type, default_clear_after_s), device_id))
            row = await cur.fetchone()
            if row is None:
                continue  # the device was deleted from the registry meanwhile: nobody to alert about
            alert_id, old = row[0], raised.severity
            await _event(conn, alert_id, "raised", SYSTEM_ACTOR, raised.severity, raised.message)
            changes.append(AlertChange(alert_id, device_id, alert_type, "raised", raised.severity))
        for step in steps:  # each step up is its own escalation, even inside one batch
            await _event(conn, alert_id, "escalated", SYSTEM_ACTOR, step.severity, step.message)
        severity = steps[-1].severity if steps else old
        message = steps[-1].message if steps else None
        await conn.execute(
            "UPDATE alerts SET count = count + %s, last_ts = greatest(last_ts, kota_ms(%s)), "
            "last_value = CASE WHEN kota_ms(%s) >= last_ts THEN %s ELSE last_value END, "
            "severity = %s, message = coalesce(%s, message), details = details || %s, updated_at = now() "
            "WHERE alert_id = %s",
            (count, m.last.ts_ms, m.last.ts_ms, m.last.value, severity, message, Jsonb(m.last.details), alert_id))
        if steps:
            changes.append(AlertChange(alert_id, device_id, alert_type, "escalated", severity))
        elif not changes or changes[-1].alert_id != alert_id:
            changes.append(AlertChange(alert_id, device_id, alert_type, "updated", severity))
    return changes


# The alert types a repeat (a reading that would have been an anomaly but is not news:
# processing.kernels.REPEAT) keeps open: the detectors' own, but for dropouts (a timer's business).
HELD_BY_REPEATS = ("spike", "dip", "level_shift", "stuck", "rate_of_change")


async def apply_repeats(conn: psycopg.AsyncConnection, repeats: Iterable[tuple[str, str, int, float]]) -> int:
    """Count repeats (device_id, metric, ts_ms, value) on their metric's open detector alert and move its
    last time and value to the newest: the series is not back to normal, so the clear-after time starts
    again. No event and no change of severity: a repeat is not news. Returns the alerts updated."""
    newest: dict[tuple[str, str], tuple[int, float, int]] = {}
    for device_id, metric, ts_ms, value in repeats:
        last_ts, last_value, n = newest.get((device_id, metric), (-1, 0.0, 0))
        newest[(device_id, metric)] = (ts_ms, value, n + 1) if ts_ms > last_ts else (last_ts, last_value, n + 1)
    if not newest:
        return 0
    cur = await conn.execute(
        "UPDATE alerts a SET count = a.count + k.n, last_ts = greatest(a.last_ts, kota_ms(k.ts_ms)), "
        "last_value = CASE WHEN kota_ms(k.ts_ms) > a.last_ts THEN k.value ELSE a.last_value END, updated_at = now() "
        "FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::float8[], %s::int[]) "
        "AS k(device_id, metric, ts_ms, value, n) "
        "WHERE a.device_id = k.device_id AND a.metric = k.metric AND a.alert_type = ANY(%s) AND a.state <> 'cleared'",
        ([key[0] for key in newest], [key[1] for key in newest], [v[0] for v in newest.values()],
         [v[1] for v in newest.values()], [v[2] for v in newest.values()], list(HELD_BY_REPEATS)))
    return cur.rowcount


async def auto_clear(conn: psycopg.AsyncConnection, device_ids: list[str]) -> list[AlertChange]:
    """Clear open alerts whose metric has reported normally for their clear-after time since the last signal."""
    if not device_ids:
        return []
    cur = await conn.execute(
        "UPDATE alerts a SET state = 'cleared', cleared_at = now(), cleared_by = %s, updated_at = now() "
        "FROM latest_values lv WHERE a.state <> 'cleared' AND a.device_id = ANY(%s) "
        "AND lv.device_id = a.device_id AND lv.metric = a.metric "
        "AND lv.ts > a.last_ts + a.clear_after_s * interval '1 second' "
        "RETURNING a.alert_id, a.device_id, a.alert_type, a.severity", (SYSTEM_ACTOR, device_ids))
    rows = await cur.fetchall()
    for alert_id, _, _, severity in rows:
        await _event(conn, alert_id, "cleared", SYSTEM_ACTOR, severity, "back to normal")
    return [AlertChange(alert_id, d, t, "cleared", s) for alert_id, d, t, s in rows]


async def acknowledge(conn: psycopg.AsyncConnection, alert_id: int, actor: str, comment: str | None = None
                      ) -> AlertChange:
    return await _operator_action(conn, alert_id, "acknowledged", actor, comment)


async def clear(conn: psycopg.AsyncConnection, alert_id: int, actor: str, comment: str | None = None) -> AlertChange:
    return await _operator_action(conn, alert_id, "cleared", actor, comment)


async def _operator_action(conn: psycopg.AsyncConnection, alert_id: int, action: str, actor: str,
                           comment: str | None) -> AlertChange:
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT device_id, alert_type, state, severity FROM alerts WHERE alert_id = %s FOR UPDATE", (alert_id,))
        row = await cur.fetchone()
        if row is None:
            raise LookupError(f"alert {alert_id} not found")
        device_id, alert_type, state, severity = row
        if state == "cleared":
            raise AlertStateError("alert is already cleared")
        if action == "acknowledged":
            if state == "acknowledged":
                raise AlertStateError("alert is already acknowledged")
            await conn.execute(
                "UPDATE alerts SET state = 'acknowledged', acknowledged_at = now(), acknowledged_by = %s, "
                "updated_at = now() WHERE alert_id = %s", (actor, alert_id))
        else:
            await conn.execute(
                "UPDATE alerts SET state = 'cleared', cleared_at = now(), cleared_by = %s, updated_at = now() "
                "WHERE alert_id = %s", (actor, alert_id))
        await _event(conn, alert_id, action, actor, severity, comment)
    return AlertChange(alert_id, device_id, alert_type, action, severity)


async def _event(conn: psycopg.AsyncConnection, alert_id: int, action: str, actor: str, severity: str,
                 comment: str | None) -> None:
    await conn.execute("INSERT INTO alert_events (alert_id, action, actor, severity, comment) "
                       "VALUES (%s, %s, %s, %s, %s)", (alert_id, action, actor, severity, comment))
