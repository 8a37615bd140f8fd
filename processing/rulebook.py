"""Alert rules operators edit (docs/rules.md): each city's rule set as versioned data, how it is
checked, and how its custom rules judge a series, for the processor and for the API's preview alike.

A city's rule set holds which ISPU categories raise an alert and how severe, the Siaga thresholds per
flood gate, noise limits per sensor, and custom rules: a metric above or below a value for a
duration, or rising (falling) faster than a rate, with a severity, a deadband and a scope. Each
change is a new row of `rule_versions` (migration 0015); a city without one is judged by
`RuleSet()`, the defaults, which are today's behaviour.

Custom rules judge one-minute aggregates, never single readings: a minute's value is its mean (or,
for a rate rule, the change of the mean per hour over the rule's window). A minute is judged once,
when the series has data in a later minute (then it is closed), by `judge`; the processor keeps how
far each series was judged in `rule_watermarks`, in the batch's transaction, and whether an episode
is open is the rule's open alert. The preview runs the same `judge` over the stored aggregates of
the last days, so what it shows is what the processor would have raised.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import psycopg
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from kota.alerts import Severity, Signal
from kota.contract import METRICS, Reading
from kota.registry import DEVICE_TYPES
from processing import ispu

log = logging.getLogger("kota.processor")

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
# A silence longer than this breaks a run of breaching minutes ("for 10 minutes" means 10 minutes
# with data all along, give or take a missed report), and bounds how far back a judgement looks.
MAX_GAP_MS = HOUR_MS
MAX_DURATION_S = 7 * 86_400
MAX_RATE_WINDOW_S = 86_400
MAX_RULES = 200
MAX_ABS_VALUE = 1e9  # far beyond any metric's range (kota.contract.METRICS), still a finite double
# Custom-rule alerts clear by their deadband, never by the processor's clear-after timer.
RULE_CLEAR_AFTER_S = 10 * 365 * 86_400.0
RULE_ALERT_PREFIX = "rule:"
NOISE_ALERT = "noise_limit"
NOISE_METRIC = "LAeq"

Identifier = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
RuleId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
Finite = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]
NonNegative = Annotated[float, Field(allow_inf_nan=False, ge=0, le=MAX_ABS_VALUE)]
Positive = Annotated[float, Field(allow_inf_nan=False, gt=0, le=MAX_ABS_VALUE)]
CategoryName = Literal["Baik", "Sedang", "Tidak Sehat", "Sangat Tidak Sehat", "Berbahaya"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Scope(_Strict):
    """Which of the city's devices a rule judges: all of them (empty), or those in a district, of a
    device type, or one device (every field given must match)."""

    district: Identifier | None = None
    device_type: str | None = None
    device_id: Identifier | None = None

    @field_validator("device_type")
    @classmethod
    def _known_type(cls, device_type: str | None) -> str | None:
        if device_type is not None and device_type not in DEVICE_TYPES:
            raise ValueError(f"unknown device type {device_type[:64]!r}")
        return device_type

    def matches(self, device: DeviceInfo) -> bool:
        return (
            (self.district is None or self.district == device.district)
            and (self.device_type is None or self.device_type == device.device_type)
            and (self.device_id is None or self.device_id == device.device_id)
        )


class CustomRule(_Strict):
    """`kind` threshold: the minute's mean `op` `value`; rate: its change per hour over `window_s`
    `op` `value` (above 30 on currentLevel: rising faster than 30 cm/h). Raised once that holds for
    `for_s` seconds of data; cleared once the minute's value is back past `value` by `deadband`."""

    id: RuleId
    kind: Literal["threshold", "rate"] = "threshold"
    metric: str
    op: Literal["above", "below"] = "above"
    value: Finite
    for_s: Annotated[int, Field(ge=0, le=MAX_DURATION_S)] = 0
    deadband: NonNegative = 0.0
    severity: Severity = "major"
    window_s: Annotated[int, Field(ge=60, le=MAX_RATE_WINDOW_S)] = 900
    scope: Scope = Scope()
    description: Annotated[str, StringConstraints(max_length=300)] = ""

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric[:64]!r}")
        return metric

    @property
    def alert_type(self) -> str:
        return f"{RULE_ALERT_PREFIX}{self.id}"


class GateThresholds(_Strict):
    """A flood gate's Siaga thresholds (cm, Siaga 3 < 2 < 1) and the rise that alerts (cm/h)."""

    siaga3_cm: Annotated[float, Field(allow_inf_nan=False, ge=-500, le=5000)]
    siaga2_cm: Annotated[float, Field(allow_inf_nan=False, ge=-500, le=5000)]
    siaga1_cm: Annotated[float, Field(allow_inf_nan=False, ge=-500, le=5000)]
    rise_cm_per_h: Annotated[float, Field(allow_inf_nan=False, gt=0, le=10_000)]

    @model_validator(mode="after")
    def _ordered(self) -> GateThresholds:
        if not self.siaga3_cm < self.siaga2_cm < self.siaga1_cm:
            raise ValueError("thresholds must rise from Siaga 3 to Siaga 1")
        return self

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.siaga3_cm, self.siaga2_cm, self.siaga1_cm, self.rise_cm_per_h)


# Today's defaults (processing.rules): Katulampa's gate, ISPU from Tidak Sehat up, noise 55 dB(A).
DEFAULT_GATE = GateThresholds(siaga3_cm=80.0, siaga2_cm=150.0, siaga1_cm=200.0, rise_cm_per_h=30.0)
DEFAULT_ISPU: dict[CategoryName, Severity] = {
    "Tidak Sehat": "minor",
    "Sangat Tidak Sehat": "major",
    "Berbahaya": "critical",
}


class FloodRules(_Strict):
    """Thresholds per gate; a gate not named uses its flood_gates row, else `default`."""

    default: GateThresholds = DEFAULT_GATE
    gates: dict[Identifier, GateThresholds] = Field(default_factory=dict, max_length=10_000)


class NoiseRules(_Strict):
    """Noise limits (LAeq, dB(A)) per sensor; a sensor not named uses its noise_limits row, else
    `default_dba`. With a `severity`, a sensor's minute LAeq above its limit for `for_s` raises a
    `noise_limit` alert (none by default: today the limits only colour the map)."""

    default_dba: Annotated[float, Field(allow_inf_nan=False, gt=0, le=160)] = 55.0
    sensors: dict[Identifier, Annotated[float, Field(allow_inf_nan=False, gt=0, le=160)]] = Field(
        default_factory=dict, max_length=10_000
    )
    severity: Severity | None = None
    for_s: Annotated[int, Field(ge=0, le=MAX_DURATION_S)] = 0
    deadband: Annotated[float, Field(allow_inf_nan=False, ge=0, le=160)] = 0.0


class RuleSet(_Strict):
    """One city's rules, as stored in a version's body."""

    ispu: dict[CategoryName, Severity] = Field(default_factory=lambda: dict(DEFAULT_ISPU))
    flood: FloodRules = FloodRules()
    noise: NoiseRules = NoiseRules()
    rules: list[CustomRule] = Field(default_factory=list, max_length=MAX_RULES)

    @field_validator("rules")
    @classmethod
    def _unique_ids(cls, rules: list[CustomRule]) -> list[CustomRule]:
        seen: set[str] = set()
        for rule in rules:
            if rule.id in seen:
                raise ValueError(f"rule id {rule.id!r} is used twice")
            seen.add(rule.id)
        return rules

    def ispu_severity(self) -> dict[int, Severity]:
        """Severity by category index (processing.ispu.CATEGORIES), as processing.rules uses it."""
        names = [c.name for c in ispu.CATEGORIES]
        return {names.index(name): severity for name, severity in self.ispu.items()}

    def devices_named(self) -> set[str]:
        """Every device id the rule set names (each must be one of the city's)."""
        named = set(self.flood.gates) | set(self.noise.sensors)
        return named | {r.scope.device_id for r in self.rules if r.scope.device_id is not None}


DEFAULT_RULES = RuleSet()


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    device_id: str
    district: str | None
    device_type: str


@dataclass(frozen=True, slots=True)
class CityRules:
    """A city's rule set as of one version (0: the defaults)."""

    version: int
    rules: RuleSet


@dataclass(frozen=True, slots=True)
class RuleSnapshot:
    """Every city's current rules, as one read of `rule_versions` gave them: a batch is judged by one."""

    counter: int
    cities: dict[str, CityRules] = field(default_factory=dict)
    # The metrics each city's custom rules (and alerting noise limits) judge: a batch's readings are
    # looked up here, and most cities have none.
    watched: dict[str, frozenset[str]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        for city, city_rules in self.cities.items():
            metrics = {r.metric for r in city_rules.rules.rules}
            if city_rules.rules.noise.severity is not None:
                metrics.add(NOISE_METRIC)
            if metrics:
                self.watched[city] = frozenset(metrics)

    def of(self, city: str) -> CityRules:
        return self.cities.get(city) or CityRules(0, DEFAULT_RULES)


async def load_snapshot(conn: psycopg.AsyncConnection) -> RuleSnapshot:
    """The counter and each city's newest version, in one statement (one view of the database). A body
    that no longer validates (a metric removed from the catalogue since) leaves that city on its
    defaults, logged, rather than stopping the processor."""
    cur = await conn.execute(
        "SELECT v.version, r.city, r.version, r.body FROM rules_version v LEFT JOIN LATERAL ("
        " SELECT DISTINCT ON (city) city, version, body FROM rule_versions ORDER BY city, version DESC) r ON true"
    )
    rows = await cur.fetchall()
    cities: dict[str, CityRules] = {}
    for _, city, version, body in rows:
        if city is None:
            continue
        try:
            cities[city] = CityRules(version, RuleSet.model_validate(body))
        except ValueError as exc:
            log.error("rules of %s version %s do not validate (%s); judged by the defaults", city, version, exc)
    return RuleSnapshot(rows[0][0] if rows else 0, cities)


class RuleBook:
    """The processor's current rules: the counter read once per batch, the rule sets again only when
    it moved (a change is applied from the next batch, without restart)."""

    def __init__(self) -> None:
        self.snapshot: RuleSnapshot | None = None

    async def current(self, conn: psycopg.AsyncConnection) -> RuleSnapshot:
        cur = await conn.execute("SELECT version FROM rules_version")
        row = await cur.fetchone()
        counter = row[0] if row else 0
        if self.snapshot is None or self.snapshot.counter != counter:
            self.snapshot = await load_snapshot(conn)
            log.info(
                "rules loaded: %s",
                {city: c.version for city, c in sorted(self.snapshot.cities.items())} or "defaults everywhere",
            )
        return self.snapshot


# -- judging a series ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Minute:
    """One one-minute aggregate of a series: its start (epoch ms) and mean."""

    bucket_ms: int
    mean: float


@dataclass(frozen=True, slots=True)
class Judged:
    """What a judged minute did: `signal` (the condition holds; the first of an episode raises it) or
    `clear` (back past the deadband while an episode was open)."""

    action: Literal["signal", "clear"]
    ts_ms: int
    value: float


@dataclass(frozen=True, slots=True)
class Judge:
    """A custom rule as `judge` applies it: the series value (mean or rate) against a threshold."""

    kind: Literal["threshold", "rate"]
    op: Literal["above", "below"]
    value: float
    for_s: int
    deadband: float
    window_s: int

    @classmethod
    def of(cls, rule: CustomRule) -> Judge:
        return cls(rule.kind, rule.op, rule.value, rule.for_s, rule.deadband, rule.window_s)

    def lookback_ms(self) -> int:
        """How much data before the first minute judged is read: the run a duration needs, the window
        of a rate, and a gap at each (see `judge`). None for a threshold that holds at once: each
        minute is judged on its own, and the processor reads no more than the minutes it judges."""
        if self.kind == "threshold" and self.for_s == 0:
            return 0
        rate = self.window_s * 1000 + MAX_GAP_MS if self.kind == "rate" else 0
        return self.for_s * 1000 + MAX_GAP_MS + rate


def series_values(judge: Judge, minutes: Sequence[Minute]) -> list[tuple[int, float]]:
    """(minute, value) in time order: the mean, or for a rate rule the change of the mean per hour
    from the newest minute at least `window_s` earlier (within a gap); minutes without one are left out."""
    if judge.kind == "threshold":
        return [(m.bucket_ms, m.mean) for m in minutes]
    window_ms = judge.window_s * 1000
    values: list[tuple[int, float]] = []
    j = -1  # index of the newest minute at least window_ms before minutes[i]
    for i, m in enumerate(minutes):
        while j + 1 < i and minutes[j + 1].bucket_ms <= m.bucket_ms - window_ms:
            j += 1
        if j >= 0 and m.bucket_ms - minutes[j].bucket_ms <= window_ms + MAX_GAP_MS:
            earlier = minutes[j]
            values.append((m.bucket_ms, (m.mean - earlier.mean) * HOUR_MS / (m.bucket_ms - earlier.bucket_ms)))
    return values


def judge(
    rule: Judge,
    minutes: Sequence[Minute],
    judge_from_ms: int,
    *,
    open_at_start: bool,
    unjudged: tuple[int, int] | None = None,
) -> tuple[list[Judged], bool]:
    """Judge the minutes at or after `judge_from_ms` (those before are the lookback: they only say how
    long a run has lasted). A minute breaches when its value is `op` the rule's value; the condition
    holds once breaching minutes, none more than MAX_GAP_MS apart, span `for_s`. An open episode
    (`open_at_start`: the rule's alert is open) goes on while minutes stay within the deadband of the
    value, and clears at the first past it. Minutes strictly inside `unjudged` (start, end) count
    for runs but are not judged. Returns what the judged minutes did, and whether an episode is open
    after them."""
    above = rule.op == "above"
    is_open = open_at_start
    run_start: int | None = None
    previous: int | None = None
    out: list[Judged] = []
    for ts_ms, value in series_values(rule, minutes):
        breach = value > rule.value if above else value < rule.value
        if not math.isfinite(value):
            breach = False
        if breach and run_start is not None and previous is not None and ts_ms - previous <= MAX_GAP_MS + MINUTE_MS:
            pass  # the run goes on
        elif breach:
            run_start = ts_ms
        else:
            run_start = None
        previous = ts_ms
        if ts_ms < judge_from_ms or unjudged is not None and unjudged[0] < ts_ms < unjudged[1]:
            continue
        if breach and (is_open or run_start is not None and ts_ms + MINUTE_MS - run_start >= rule.for_s * 1000):
            out.append(Judged("signal", ts_ms, value))
            is_open = True
        elif is_open and not breach:
            back = value <= rule.value - rule.deadband if above else value >= rule.value + rule.deadband
            if back:
                out.append(Judged("clear", ts_ms, value))
                is_open = False
    return out, is_open


@dataclass(frozen=True, slots=True)
class Applied:
    """A rule (custom, or a noise limit) applied to one device: its judge, alert type and severity."""

    alert_type: str
    metric: str
    severity: Severity
    judge: Judge
    rule_id: str


def rules_for(rules: RuleSet, device: DeviceInfo, metric: str, noise_limits: dict[str, float]) -> list[Applied]:
    """The custom rules (and the noise limit, when it alerts) that judge this device's metric.
    `noise_limits`: the noise_limits table's rows, under the rule set's own."""
    applied = [
        Applied(r.alert_type, r.metric, r.severity, Judge.of(r), r.id)
        for r in rules.rules
        if r.metric == metric and r.scope.matches(device)
    ]
    noise = rules.noise
    if metric == NOISE_METRIC and noise.severity is not None and device.device_type == "noise":
        limit = noise.sensors.get(device.device_id, noise_limits.get(device.device_id, noise.default_dba))
        judge_noise = Judge("threshold", "above", limit, noise.for_s, noise.deadband, 900)
        applied.append(Applied(NOISE_ALERT, metric, noise.severity, judge_noise, "noise"))
    return applied


def describe(applied: Applied, value: float, version: int) -> tuple[str, dict[str, object]]:
    """The alert message and details of a signal of `applied`."""
    j = applied.judge
    what = (
        f"{applied.metric} {'rising' if j.op == 'above' else 'falling'} at {value:.4g}/h"
        if j.kind == "rate"
        else (f"{applied.metric} at {value:.4g}")
    )
    limit = f"{j.op} {j.value:g}{'/h' if j.kind == 'rate' else ''}"
    held = f" for {j.for_s} s" if j.for_s else ""
    details: dict[str, object] = {
        "rule_id": applied.rule_id,
        "rules_version": version,
        "threshold": j.value,
        "op": j.op,
        "kind": j.kind,
        "for_s": j.for_s,
        "deadband": j.deadband,
    }
    return f"{what}, {limit}{held} (rule {applied.rule_id}, rules v{version})", details


# -- reading stored aggregates -------------------------------------------------------------------
async def minute_means(
    conn: psycopg.AsyncConnection, ranges: Sequence[tuple[str, str, int, int]]
) -> dict[tuple[str, str], list[Minute]]:
    """Each (device, metric)'s one-minute means with start in [from_ms, before_ms), in time order, in
    one query for all `ranges` (device, metric, from_ms, before_ms)."""
    if not ranges:
        return {}
    columns = [list(c) for c in zip(*ranges, strict=True)]
    cur = await conn.execute(
        "SELECT k.device_id, k.metric, (extract(epoch FROM a.bucket) * 1000)::bigint, a.sum / a.n "
        "FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::bigint[]) AS k(device_id, metric, f, b) "
        "JOIN agg_1m a ON a.device_id = k.device_id AND a.metric = k.metric "
        "AND a.bucket >= kota_ms(k.f) AND a.bucket < kota_ms(k.b) AND a.n > 0 ORDER BY 1, 2, 3",
        columns,
    )
    out: dict[tuple[str, str], list[Minute]] = {}
    for device_id, metric, bucket_ms, mean in await cur.fetchall():
        out.setdefault((device_id, metric), []).append(Minute(int(bucket_ms), float(mean)))
    return out


async def device_info(conn: psycopg.AsyncConnection, device_ids: Iterable[str]) -> dict[str, DeviceInfo]:
    cur = await conn.execute(
        "SELECT device_id, district, device_type FROM devices WHERE device_id = ANY(%b::text[])", (sorted(device_ids),)
    )
    return {d: DeviceInfo(d, district, device_type) for d, district, device_type in await cur.fetchall()}


async def noise_limit_rows(conn: psycopg.AsyncConnection, device_ids: Iterable[str]) -> dict[str, float]:
    cur = await conn.execute(
        "SELECT device_id, limit_dba FROM noise_limits WHERE device_id = ANY(%b::text[])", (sorted(device_ids),)
    )
    return {d: float(limit) for d, limit in await cur.fetchall()}


# -- the processor's batch -----------------------------------------------------------------------
@dataclass(slots=True)
class CustomVerdicts:
    """What the custom rules found in a batch, in rounds: each round's signals are applied, then its
    clears (so an episode that clears and is raised again within one batch is two alerts)."""

    rounds: list[tuple[list[Signal], list[tuple[str, str, int]]]] = field(default_factory=list)
    alert_types: set[str] = field(default_factory=set)

    def add(self, depth: int, signal: Signal | None = None, clear: tuple[str, str, int] | None = None) -> None:
        while len(self.rounds) <= depth:
            self.rounds.append(([], []))
        if signal is not None:
            self.rounds[depth][0].append(signal)
        if clear is not None:
            self.rounds[depth][1].append(clear)


async def judge_batch(
    conn: psycopg.AsyncConnection, snapshot: RuleSnapshot, fresh: Sequence[Reading]
) -> CustomVerdicts:
    """Judge the minutes this batch closed, for every series a custom rule (or an alerting noise limit)
    of its city applies to: from the series' watermark (or its first reading here) to the minute of
    its newest reading here, exclusive; the watermark moves there in this transaction."""
    verdicts = CustomVerdicts()
    span: dict[tuple[str, str], tuple[int, int]] = {}
    city_of: dict[str, str] = {}
    watched = snapshot.watched
    if not watched:
        return verdicts
    for r in fresh:
        if r.metric not in watched.get(r.city, ()):
            continue
        key = (r.device_id, r.metric)
        first, last = span.get(key, (r.ts_ms, r.ts_ms))
        span[key] = (min(first, r.ts_ms), max(last, r.ts_ms))
        city_of[r.device_id] = r.city
    if not span:
        return verdicts
    devices = await device_info(conn, city_of)
    noise_rows = await noise_limit_rows(conn, [d for d, i in devices.items() if i.device_type == "noise"])
    applied: dict[tuple[str, str], list[Applied]] = {}
    for key in span:
        device = devices.get(key[0])
        if device is not None and (found := rules_for(snapshot.of(city_of[key[0]]).rules, device, key[1], noise_rows)):
            applied[key] = found
    if not applied:
        return verdicts
    keys = sorted(applied)
    cur = await conn.execute(
        "SELECT w.device_id, w.metric, (extract(epoch FROM w.judged_before) * 1000)::bigint FROM rule_watermarks w "
        "JOIN unnest(%b::text[], %b::text[]) AS k(device_id, metric) USING (device_id, metric)",
        ([k[0] for k in keys], [k[1] for k in keys]),
    )
    watermark = {(d, m): int(t) for d, m, t in await cur.fetchall()}
    windows: dict[tuple[str, str], tuple[int, int]] = {}
    # Minutes stored between a series' watermark minute and this batch's first were stored while no
    # rule judged the series (a rule added since): judging them now would raise alerts about the
    # past on a rule change. They only count for runs.
    unjudged: dict[tuple[str, str], tuple[int, int]] = {}
    for key in keys:
        first, last = span[key]
        before = last - last % MINUTE_MS
        start = watermark.get(key, first - first % MINUTE_MS)
        unjudged[key] = (start, first - first % MINUTE_MS)
        if before > start or key not in watermark:
            # A series' first batch may close no minute (all its readings in one): its watermark is
            # written all the same, or the next batch would start from its own first minute and that
            # minute would never be judged.
            windows[key] = (start, before)
    if not windows:
        return verdicts
    lookback = {k: max(a.judge.lookback_ms() for a in applied[k]) for k in windows}
    means = await minute_means(conn, [(k[0], k[1], s - lookback[k], b) for k, (s, b) in windows.items()])
    alert_types = sorted({a.alert_type for k in windows for a in applied[k]})
    verdicts.alert_types.update(alert_types)
    cur = await conn.execute(
        "SELECT device_id, alert_type FROM alerts WHERE device_id = ANY(%b::text[]) AND alert_type = ANY(%b::text[]) "
        "AND state <> 'cleared'",
        (sorted({k[0] for k in windows}), alert_types),
    )
    open_now = set(await cur.fetchall())
    for key, (start, _) in windows.items():
        device_id, metric = key
        version = snapshot.of(city_of[device_id]).version
        for a in applied[key]:
            judged, _ = judge(
                a.judge,
                means.get(key, []),
                start,
                open_at_start=(device_id, a.alert_type) in open_now,
                unjudged=unjudged[key],
            )
            depth = 0
            for verdict in judged:
                if verdict.action == "signal":
                    message, details = describe(a, verdict.value, version)
                    signal = Signal(
                        device_id, a.alert_type, metric, a.severity, verdict.ts_ms, verdict.value, message, details
                    )
                    verdicts.add(depth, signal=signal)
                else:
                    verdicts.add(depth, clear=(a.alert_type, device_id, verdict.ts_ms))
                    depth += 1
    await conn.execute(
        "INSERT INTO rule_watermarks (device_id, metric, judged_before) "
        "SELECT d, m, kota_ms(b) FROM unnest(%b::text[], %b::text[], %b::bigint[]) AS w(d, m, b) "
        "ON CONFLICT (device_id, metric) DO UPDATE SET judged_before = EXCLUDED.judged_before "
        "WHERE rule_watermarks.judged_before < EXCLUDED.judged_before",
        ([k[0] for k in windows], [k[1] for k in windows], [b for _, b in windows.values()]),
    )
    return verdicts


# -- preview -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Episode:
    """One alert a rule would have raised: when (the first and last minute that signalled), its
    worst value, how many minutes signalled, and when it would have cleared (None: still open)."""

    device_id: str
    raised_ms: int
    last_ms: int
    cleared_ms: int | None
    minutes: int
    worst: float


def episodes(judged: Iterable[Judged], device_id: str, op: str) -> list[Episode]:
    out: list[Episode] = []
    current: dict[str, Any] | None = None
    worse = max if op == "above" else min
    for v in judged:
        if v.action == "signal":
            if current is None:
                current = {"raised_ms": v.ts_ms, "last_ms": v.ts_ms, "minutes": 0, "worst": v.value}
            current["last_ms"] = v.ts_ms
            current["minutes"] += 1
            current["worst"] = worse(current["worst"], v.value)
        elif current is not None:
            out.append(Episode(device_id, cleared_ms=v.ts_ms, **current))
            current = None
    if current is not None:
        out.append(Episode(device_id, cleared_ms=None, **current))
    return out


# The most one-minute aggregates a preview reads (devices x minutes): a month of 100 stations. Past
# it the caller narrows the scope or the days rather than hold an API worker for a minute.
PREVIEW_MAX_MINUTES = 5_000_000


class PreviewTooLarge(ValueError):
    """A preview that would read more than PREVIEW_MAX_MINUTES aggregates."""


async def preview(
    conn: psycopg.AsyncConnection, city: str, rule: CustomRule, since_ms: int, now_ms: int | None = None
) -> tuple[list[str], list[Episode]]:
    """What `rule` would have raised in `city` from `since_ms` on, over the stored one-minute
    aggregates: the devices it judges and the episodes, judged by `judge` as the processor does
    (each series up to its newest minute, exclusive, which is not closed yet)."""
    cur = await conn.execute(
        "SELECT device_id, district, device_type FROM devices WHERE city = %s AND metrics ? %s ORDER BY device_id",
        (city, rule.metric),
    )
    devices = [DeviceInfo(d, district, t) for d, district, t in await cur.fetchall()]
    devices = [d for d in devices if rule.scope.matches(d)]
    if not devices:
        return [], []
    span_minutes = ((now_ms or int(time.time() * 1000)) - since_ms) // MINUTE_MS
    if len(devices) * span_minutes > PREVIEW_MAX_MINUTES:
        raise PreviewTooLarge(
            f"{len(devices)} devices over {span_minutes / 1440:.1f} days is more than {PREVIEW_MAX_MINUTES:,} "
            "minutes of data: narrow the rule's scope or the days"
        )
    cur = await conn.execute(
        "SELECT device_id, (extract(epoch FROM max(bucket)) * 1000)::bigint FROM agg_1m "
        "WHERE device_id = ANY(%b::text[]) AND metric = %s AND bucket >= kota_ms(%s) GROUP BY 1",
        ([d.device_id for d in devices], rule.metric, since_ms),
    )
    newest = {d: int(t) for d, t in await cur.fetchall()}
    j = Judge.of(rule)
    means = await minute_means(
        conn, [(d, rule.metric, since_ms - j.lookback_ms(), before) for d, before in sorted(newest.items())]
    )
    found: list[Episode] = []
    for device_id in sorted(newest):
        judged, _ = judge(j, means.get((device_id, rule.metric), []), since_ms, open_at_start=False)
        found += episodes(judged, device_id, rule.op)
    return [d.device_id for d in devices], found


async def foreign_devices(conn: psycopg.AsyncConnection, city: str, rules: RuleSet) -> list[str]:
    """The device ids the rule set names that are not devices of `city` (another city's, or none)."""
    named = sorted(rules.devices_named())
    if not named:
        return []
    cur = await conn.execute(
        "SELECT device_id FROM devices WHERE city = %s AND device_id = ANY(%b::text[])", (city, named)
    )
    mine = {row[0] for row in await cur.fetchall()}
    return [d for d in named if d not in mine]


# -- versions ------------------------------------------------------------------------------------
class RulesConflict(Exception):
    """The city's rules changed since the version the editor started from."""


@dataclass(frozen=True, slots=True)
class Version:
    city: str
    version: int
    author: str
    comment: str
    created_at: Any  # datetime; None for version 0 (the defaults)
    rolled_back_to: int | None
    rules: RuleSet


DEFAULTS_AUTHOR = "kota (defaults)"


async def city_versions(conn: psycopg.AsyncConnection, city: str) -> list[Version]:
    """The city's versions, newest first; a city never edited has only version 0, the defaults."""
    cur = await conn.execute(
        "SELECT version, author, comment, created_at, rolled_back_to, body FROM rule_versions WHERE city = %s "
        "ORDER BY version DESC",
        (city,),
    )
    found = [
        Version(city, v, author, comment, at, back, RuleSet.model_validate(body))
        for v, author, comment, at, back, body in await cur.fetchall()
    ]
    return found + [Version(city, 0, DEFAULTS_AUTHOR, "today's behaviour", None, None, DEFAULT_RULES)]


async def city_version(conn: psycopg.AsyncConnection, city: str, version: int | None = None) -> Version | None:
    """One version of the city's rules (None: the current one); None if there is no such version."""
    versions = await city_versions(conn, city)
    if version is None:
        return versions[0]
    return next((v for v in versions if v.version == version), None)


async def save_version(
    conn: psycopg.AsyncConnection,
    city: str,
    rules: RuleSet,
    *,
    author: str,
    comment: str,
    expected_version: int | None = None,
    rolled_back_to: int | None = None,
) -> int:
    """Store `rules` as the city's next version, with an audit_log entry, in one transaction; the
    processor applies it from its next batch. `expected_version`: the version the editor started
    from; RulesConflict if another change came first (also when two save at once)."""
    async with conn.transaction():
        # The counter's row lock queues writers of any city: rule changes are rare and short.
        await conn.execute("SELECT version FROM rules_version FOR UPDATE")
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM rule_versions WHERE city = %s", (city,))
        row = await cur.fetchone()
        current = int(row[0]) if row else 0
        if expected_version is not None and expected_version != current:
            raise RulesConflict(f"rules are at version {current}, not {expected_version}")
        version = current + 1
        body = rules.model_dump(mode="json")
        await conn.execute(
            "INSERT INTO rule_versions (city, version, body, author, comment, rolled_back_to) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (city, version, Jsonb(body), author, comment, rolled_back_to),
        )
        await conn.execute(
            "INSERT INTO audit_log (actor, action, target_type, target_id, city, details) "
            "VALUES (%s, %s, 'rules', %s, %s, %s)",
            (
                author,
                "rules.rolled_back" if rolled_back_to is not None else "rules.changed",
                f"{city}@{version}",
                city,
                Jsonb({"version": version, "comment": comment, "rolled_back_to": rolled_back_to, "rules": body}),
            ),
        )
    return version
