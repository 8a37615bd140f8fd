"""Alerts as operators expect them, shared by the processor (raise, update, auto-clear) and the API
(acknowledge, clear).

One open alert per (device, type): a repeat updates it (count, last value, last time) and can
only raise its severity; a new alert is raised only after the old one was cleared. Lifecycle:
active -> acknowledged -> cleared, each step written to `alert_events` with who and when. An
alert clears itself once its metric has reported for `clear_after_s` (event time) past its last
signal, so a flapping series keeps one alert instead of raising hundreds.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg.types.json import Jsonb

Severity = Literal["critical", "major", "minor", "warning"]
SEVERITY_RANK: dict[str, int] = {"warning": 1, "minor": 2, "major": 3, "critical": 4}
SYSTEM_ACTOR = "kota-processor"
INSERT_EVENT = "INSERT INTO alert_events (alert_id, action, actor, severity, comment) VALUES (%s, %s, %s, %s, %s)"


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


@dataclass(frozen=True, slots=True)
class AlertChange:
    alert_id: int
    device_id: str
    alert_type: str
    action: str  # raised, updated, escalated, acknowledged, cleared
    severity: str


# The alert types a repeat (a reading that would have been an anomaly but is not news:
# processing.kernels.REPEAT) keeps open: the detectors' own, but for dropouts (a timer's business).
HELD_BY_REPEATS = ("spike", "dip", "level_shift", "stuck", "rate_of_change", "inconsistent")


@dataclass(frozen=True, slots=True)
class Repeat:
    """A reading that would have been an anomaly but is not news: it counts on its metric's open
    detector alert and holds it open, without an event or a change of severity."""

    device_id: str
    metric: str
    ts_ms: int
    value: float


@dataclass(slots=True)
class _Episode:
    """What one batch does to one alert: the open alert it continues, or one it raises (is_new)."""

    device_id: str
    alert_type: str
    alert_id: int | None  # None for a new alert until it is inserted
    severity: str  # as stored before this batch, or as raised
    metric: str
    clear_after_ms: float
    last_ts: int
    signals: list[Signal] = field(default_factory=list)
    repeats: list[Repeat] = field(default_factory=list)
    cleared: bool = False
    is_new: bool = False  # raised by this batch, by its first signal

    def steps_up(self) -> list[Signal]:
        """The signals that raised the severity beyond every one before them (and beyond `severity`)."""
        steps = []
        rank = SEVERITY_RANK[self.severity]
        for signal in self.signals:
            if SEVERITY_RANK[signal.severity] > rank:
                steps.append(signal)
                rank = SEVERITY_RANK[signal.severity]
        return steps


def _cleared_between(times: list[int], after_ms: float, before_ms: int) -> bool:
    """Whether the sorted reading times hold one in (after_ms, before_ms): the metric reported normally
    past the clear-after time, so the alert cleared itself there."""
    i = bisect.bisect_right(times, after_ms)
    return i < len(times) and times[i] < before_ms


def _episodes(
    signals: Iterable[Signal],
    repeats: Iterable[Repeat],
    open_alerts: dict[tuple[str, str], tuple[Any, ...]],
    clear_after_ms: Callable[[str], float],
    times: dict[tuple[str, str], list[int]],
) -> list[_Episode]:
    """Walk each (device, type)'s signals and repeats in event time, as a live stream would have met
    them: an alert clears itself when its metric reported past its last time plus its clear-after
    time, and the next signal then raises a new one. `times` holds the batch's reading times per
    (device, metric), sorted; without them, nothing clears inside a batch."""
    events: dict[tuple[str, str], list[tuple[int, int, Signal | Repeat]]] = {}
    for signal in signals:
        events.setdefault((signal.device_id, signal.alert_type), []).append((signal.ts_ms, 0, signal))
    held: dict[str, list[Repeat]] = {}
    for repeat in repeats:
        held.setdefault(repeat.device_id, []).append(repeat)
    for device_id, alert_type in open_alerts:
        if alert_type in HELD_BY_REPEATS:
            events.setdefault((device_id, alert_type), [])
    for (device_id, alert_type), timeline in events.items():
        if alert_type in HELD_BY_REPEATS:
            timeline += [(r.ts_ms, 1, r) for r in held.get(device_id, ())]
    episodes: list[_Episode] = []
    for (device_id, alert_type), timeline in events.items():
        timeline.sort(key=lambda event: (event[0], event[1]))
        current: _Episode | None = None
        if (device_id, alert_type) in open_alerts:
            alert_id, severity, metric, last_ts, clear_after_s = open_alerts[(device_id, alert_type)]
            current = _Episode(device_id, alert_type, alert_id, severity, metric, clear_after_s * 1000, last_ts)
            episodes.append(current)
        for ts_ms, _, event in timeline:
            if current is not None and _cleared_between(
                times.get((device_id, current.metric), []), current.last_ts + current.clear_after_ms, ts_ms
            ):
                current.cleared = True
                current = None
            if isinstance(event, Signal):
                if current is None:
                    current = _Episode(
                        device_id,
                        alert_type,
                        None,
                        event.severity,
                        event.metric,
                        clear_after_ms(alert_type),
                        ts_ms,
                        is_new=True,
                    )
                    episodes.append(current)
                current.signals.append(event)
            elif current is None or event.metric != current.metric:
                continue  # a repeat holds only an open alert of its own metric
            else:
                current.repeats.append(event)
            current.last_ts = max(current.last_ts, ts_ms)
    return [e for e in episodes if e.signals or e.repeats or e.cleared]


async def apply_signals(
    conn: psycopg.AsyncConnection,
    signals: Iterable[Signal],
    clear_after_s: dict[str, float],
    default_clear_after_s: float,
    *,
    repeats: Iterable[Repeat] = (),
    times: dict[tuple[str, str], list[int]] | None = None,
) -> list[AlertChange]:
    """Raise, update and clear alerts for a batch's signals and repeats, inside the caller's transaction.

    `times`: the batch's reading times per (device, metric), sorted. With them, the outcome does not
    depend on how readings fell into batches: an alert that would have cleared itself between two of
    the batch's signals in a live stream clears there, and the later signal raises a new alert."""
    signals = list(signals)
    repeats = list(repeats)
    devices = sorted({s.device_id for s in signals} | {r.device_id for r in repeats})
    if not devices:
        return []
    cur = await conn.execute(
        "SELECT device_id, alert_type, alert_id, severity, metric, (extract(epoch FROM last_ts) * 1000)::bigint, "
        "clear_after_s FROM alerts WHERE device_id = ANY(%b::text[]) AND state <> 'cleared' "
        "ORDER BY alert_id FOR UPDATE",
        (devices,),
    )
    open_alerts = {(row[0], row[1]): row[2:] for row in await cur.fetchall()}
    episodes = _episodes(
        signals,
        repeats,
        open_alerts,
        lambda alert_type: clear_after_s.get(alert_type, default_clear_after_s) * 1000,
        times or {},
    )
    # Statement by statement in sequence: round trips batched by psycopg's executemany (pipeline
    # mode). One at a time, 2,000 series going silent together (a district's power cut) took 3.6 s
    # to raise and 1.4 s to update, with the processor's loop waiting; now about 1.1 and 0.5 s (bench/alerts.py).
    # One open alert per (device, type) is a unique index: the open alerts this batch clears are
    # cleared first, and a new alert that clears within the batch is inserted cleared.
    cleared = [e.alert_id for e in episodes if e.alert_id is not None and e.cleared]
    if cleared:
        await conn.execute(
            "UPDATE alerts SET state = 'cleared', cleared_at = now(), cleared_by = %s, "
            "updated_at = now() WHERE alert_id = ANY(%s)",
            (SYSTEM_ACTOR, cleared),
        )
    new = [e for e in episodes if e.is_new]
    if new:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO alerts (device_id, city, domain, alert_type, metric, severity, message, count, "
                "first_ts, last_ts, last_value, details, clear_after_s, state, cleared_at, cleared_by) "
                "SELECT device_id, city, domain, %s, %s, %s, %s, 0, kota_ms(%s), kota_ms(%s), %s, %s, %s, "
                "CASE WHEN %s THEN 'cleared' ELSE 'active' END, CASE WHEN %s THEN now() END, %s "
                "FROM devices WHERE device_id = %s RETURNING alert_id",
                [
                    (
                        e.alert_type,
                        r.metric,
                        r.severity,
                        r.message,
                        r.ts_ms,
                        r.ts_ms,
                        r.value,
                        Jsonb(r.details),
                        e.clear_after_ms / 1000,
                        e.cleared,
                        e.cleared,
                        SYSTEM_ACTOR if e.cleared else None,
                        e.device_id,
                    )
                    for e in new
                    for r in e.signals[:1]
                ],
                returning=True,
            )
            for e in new:
                row = await cur.fetchone()
                if row is not None:  # None: the device left the registry meanwhile; nobody to alert about
                    e.alert_id = row[0]
                cur.nextset()
    changes: list[AlertChange] = []
    events: list[tuple[int, str, str, str, str | None]] = []
    updates: list[tuple[Any, ...]] = []
    for e in episodes:
        if e.alert_id is None:
            continue
        alert_id = e.alert_id
        if e.is_new:
            raised = e.signals[0]
            events.append((alert_id, "raised", SYSTEM_ACTOR, raised.severity, raised.message))
            changes.append(AlertChange(alert_id, e.device_id, e.alert_type, "raised", raised.severity))
        steps = e.steps_up()
        for step in steps:  # each step up is its own escalation, even inside one batch
            events.append((alert_id, "escalated", SYSTEM_ACTOR, step.severity, step.message))
        severity = steps[-1].severity if steps else e.severity
        if e.signals or e.repeats:
            last = max(
                [(s.ts_ms, s.value) for s in e.signals] + [(r.ts_ms, r.value) for r in e.repeats], key=lambda tv: tv[0]
            )
            updates.append(
                (
                    len(e.signals) + len(e.repeats),
                    last[0],
                    last[0],
                    last[1],
                    severity,
                    steps[-1].message if steps else None,
                    Jsonb(e.signals[-1].details if e.signals else {}),
                    alert_id,
                )
            )
            if steps:
                changes.append(AlertChange(alert_id, e.device_id, e.alert_type, "escalated", severity))
            elif e.signals and (not changes or changes[-1].alert_id != alert_id):
                changes.append(AlertChange(alert_id, e.device_id, e.alert_type, "updated", severity))
        if e.cleared:
            events.append((alert_id, "cleared", SYSTEM_ACTOR, severity, "back to normal"))
            changes.append(AlertChange(alert_id, e.device_id, e.alert_type, "cleared", severity))
    async with conn.cursor() as cur:
        if updates:
            await cur.executemany(
                "UPDATE alerts SET count = count + %s, last_ts = greatest(last_ts, kota_ms(%s)), "
                "last_value = CASE WHEN kota_ms(%s) >= last_ts THEN %s ELSE last_value END, "
                "severity = %s, message = coalesce(%s, message), details = details || %s, updated_at = now() "
                "WHERE alert_id = %s",
                updates,
            )
        if events:
            await cur.executemany(INSERT_EVENT, events)
    return changes


async def auto_clear(conn: psycopg.AsyncConnection, device_ids: list[str]) -> list[AlertChange]:
    """Clear open alerts whose metric has reported normally for their clear-after time since the last signal."""
    if not device_ids:
        return []
    cur = await conn.execute(
        "UPDATE alerts a SET state = 'cleared', cleared_at = now(), cleared_by = %s, updated_at = now() "
        "FROM latest_values lv WHERE a.state <> 'cleared' AND a.device_id = ANY(%b::text[]) "
        "AND lv.device_id = a.device_id AND lv.metric = a.metric "
        "AND lv.ts > a.last_ts + a.clear_after_s * interval '1 second' "
        "RETURNING a.alert_id, a.device_id, a.alert_type, a.severity",
        (SYSTEM_ACTOR, device_ids),
    )
    rows = await cur.fetchall()
    if rows:
        async with conn.cursor() as cur:
            await cur.executemany(
                INSERT_EVENT,
                [(alert_id, "cleared", SYSTEM_ACTOR, severity, "back to normal") for alert_id, _, _, severity in rows],
            )
    return [AlertChange(alert_id, d, t, "cleared", s) for alert_id, d, t, s in rows]


async def clear_back_to_normal(
    conn: psycopg.AsyncConnection, alert_type: str, normal: list[tuple[str, int]], comment: str
) -> list[AlertChange]:
    """Clear the open `alert_type` alerts of devices a rule found back to normal at a time (device,
    ts_ms) later than the alert's last signal: a rule that decides now and then (a night's minimum
    flow) instead of on every reading."""
    if not normal:
        return []
    devices, times = [d for d, _ in normal], [t for _, t in normal]
    cur = await conn.execute(
        "UPDATE alerts a SET state = 'cleared', cleared_at = now(), cleared_by = %s, updated_at = now() "
        "FROM (SELECT device_id, max(t) AS t FROM unnest(%b::text[], %b::bigint[]) AS n(device_id, t) GROUP BY 1) n "
        "WHERE a.device_id = n.device_id AND a.alert_type = %s AND a.state <> 'cleared' AND a.last_ts < kota_ms(n.t) "
        "RETURNING a.alert_id, a.device_id, a.alert_type, a.severity",
        (SYSTEM_ACTOR, devices, times, alert_type),
    )
    rows = await cur.fetchall()
    if rows:
        async with conn.cursor() as cur:
            await cur.executemany(
                INSERT_EVENT,
                [(alert_id, "cleared", SYSTEM_ACTOR, severity, comment) for alert_id, _, _, severity in rows],
            )
    return [AlertChange(alert_id, d, t, "cleared", s) for alert_id, d, t, s in rows]


async def acknowledge(
    conn: psycopg.AsyncConnection, alert_id: int, actor: str, comment: str | None = None
) -> AlertChange:
    return await _operator_action(conn, alert_id, "acknowledged", actor, comment)


async def clear(conn: psycopg.AsyncConnection, alert_id: int, actor: str, comment: str | None = None) -> AlertChange:
    return await _operator_action(conn, alert_id, "cleared", actor, comment)


async def _operator_action(
    conn: psycopg.AsyncConnection, alert_id: int, action: str, actor: str, comment: str | None
) -> AlertChange:
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT device_id, alert_type, state, severity FROM alerts WHERE alert_id = %s FOR UPDATE", (alert_id,)
        )
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
                "updated_at = now() WHERE alert_id = %s",
                (actor, alert_id),
            )
        else:
            await conn.execute(
                "UPDATE alerts SET state = 'cleared', cleared_at = now(), cleared_by = %s, updated_at = now() "
                "WHERE alert_id = %s",
                (actor, alert_id),
            )
        await _event(conn, alert_id, action, actor, severity, comment)
    return AlertChange(alert_id, device_id, alert_type, action, severity)


async def _event(
    conn: psycopg.AsyncConnection, alert_id: int, action: str, actor: str, severity: str, comment: str | None
) -> None:
    await conn.execute(INSERT_EVENT, (alert_id, action, actor, severity, comment))


async def escalate_to_tier(
    conn: psycopg.AsyncConnection, alert_id: int, tier: int, actor: str, comment: str
) -> AlertChange | None:
    """Escalate a still active (unacknowledged) alert to notification tier `tier`: an 'escalated'
    event that the notification outbox routes to subscriptions up to that tier. None when the alert
    was acknowledged, cleared or escalated that far meanwhile."""
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE alerts SET notify_tier = %s, updated_at = now() "
            "WHERE alert_id = %s AND state = 'active' AND notify_tier < %s "
            "RETURNING device_id, alert_type, severity",
            (tier, alert_id, tier),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        device_id, alert_type, severity = row
        await _event(conn, alert_id, "escalated", actor, severity, comment)
    return AlertChange(alert_id, device_id, alert_type, "escalated", severity)
