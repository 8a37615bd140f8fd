"""The operators' rules without the stack (processing/rulebook.py): how a custom rule judges a series,
that judging it batch by batch finds what judging it whole does (what makes the preview and the
processor agree), and that no rule body the API could be sent is stored invalid or crashes anything."""

from __future__ import annotations

import json
import math
import time

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from processing.rulebook import (
    DEFAULT_RULES,
    MAX_DURATION_S,
    MAX_GAP_MS,
    MINUTE_MS,
    CustomRule,
    DeviceInfo,
    Judge,
    Judged,
    Minute,
    RuleSet,
    episodes,
    judge,
    rules_for,
)
from processing.rules import ISPU_SEVERITY

T0 = 1_800_000_000_000 - 1_800_000_000_000 % MINUTE_MS


def minutes(values: list[float], start: int = T0) -> list[Minute]:
    return [Minute(start + i * MINUTE_MS, v) for i, v in enumerate(values)]


def rule(**fields: object) -> Judge:
    return Judge.of(CustomRule.model_validate({"id": "r", "metric": "pm25", "value": 5, **fields}))


def test_a_threshold_raises_once_it_has_held_for_its_duration_and_clears_past_the_deadband():
    series = minutes([1, 1, 10, 10, 10, 10, 10, 4.5, 10, 3.9, 1])
    judged, is_open = judge(rule(for_s=300, deadband=1), series, T0, open_at_start=False)
    assert judged == [
        Judged("signal", T0 + 6 * MINUTE_MS, 10),  # the fifth breaching minute: five minutes held
        # 4.5 is below 5 but within the deadband: the episode goes on, without a signal
        Judged("signal", T0 + 8 * MINUTE_MS, 10),
        Judged("clear", T0 + 9 * MINUTE_MS, 3.9),
    ]
    assert not is_open
    assert episodes(judged, "d", "above")[0].minutes == 2


def test_a_run_broken_by_a_normal_minute_starts_its_duration_again():
    judged, _ = judge(rule(for_s=180), minutes([10, 10, 1, 10, 10, 10]), T0, open_at_start=False)
    assert [j.ts_ms for j in judged] == [T0 + 5 * MINUTE_MS]


def test_a_long_silence_breaks_a_run():
    series = [Minute(T0, 10), Minute(T0 + MAX_GAP_MS + 2 * MINUTE_MS, 10)]
    judged, _ = judge(rule(for_s=120), series, T0, open_at_start=False)
    assert judged == [], "two breaching minutes an hour apart are not two minutes of breach"


def test_below_rules_and_an_open_episode_carried_in():
    judged, is_open = judge(rule(op="below", deadband=2), minutes([6, 4, 6.5, 8]), T0, open_at_start=True)
    assert judged == [Judged("signal", T0 + MINUTE_MS, 4), Judged("clear", T0 + 3 * MINUTE_MS, 8)]
    assert not is_open


def test_a_rate_rule_judges_the_change_per_hour_over_its_window():
    # +10 cm a minute: 600 cm/h over a 5-minute window
    series = minutes([100 + 10 * i for i in range(8)] + [170] * 10)
    judged, _ = judge(
        rule(kind="rate", metric="currentLevel", value=300, window_s=300), series, T0, open_at_start=False
    )
    signals = [j for j in judged if j.action == "signal"]
    assert signals[0].ts_ms == T0 + 5 * MINUTE_MS and signals[0].value == pytest.approx(600)
    assert judged[-1].action == "clear"


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.sampled_from([0.0, 4.0, 5.0, 5.5, 9.0]), min_size=1, max_size=60),
    gaps=st.lists(st.sampled_from([1, 1, 1, 2, 5, 70]), min_size=60, max_size=60),
    cuts=st.lists(st.integers(1, 59), max_size=6),
    for_s=st.sampled_from([0, 60, 180, 600]),
    deadband=st.sampled_from([0.0, 1.0]),
    op=st.sampled_from(["above", "below"]),
    kind=st.sampled_from(["threshold", "rate"]),
)
def test_judging_batch_by_batch_finds_what_judging_the_whole_series_does(values, gaps, cuts, for_s, deadband, op, kind):
    """The processor judges each batch's closed minutes from its watermark, with a lookback and the
    open alert as the state carried in; the preview judges the whole stored series at once. Wherever
    batches end, both must find the same signals and clears."""
    j = rule(for_s=for_s, deadband=deadband, op=op, kind=kind, window_s=120)
    t, series = T0, []
    for v, gap in zip(values, gaps, strict=False):
        series.append(Minute(t, v))
        t += gap * MINUTE_MS
    whole, _ = judge(j, series, T0, open_at_start=False)
    bounds = sorted({T0, *(series[c].bucket_ms for c in cuts if c < len(series)), t})
    pieces: list[Judged] = []
    is_open = False
    for start, before in zip(bounds, bounds[1:], strict=False):
        visible = [m for m in series if start - j.lookback_ms() <= m.bucket_ms < before]
        judged, is_open = judge(j, visible, start, open_at_start=is_open)
        pieces += judged
    assert pieces == whole


# -- validation ------------------------------------------------------------------------------------
def test_the_defaults_are_todays_behaviour():
    assert DEFAULT_RULES.ispu_severity() == ISPU_SEVERITY
    assert DEFAULT_RULES.flood.default.as_tuple() == (80.0, 150.0, 200.0, 30.0)
    assert DEFAULT_RULES.rules == [] and DEFAULT_RULES.noise.severity is None
    assert RuleSet.model_validate({}) == DEFAULT_RULES


@pytest.mark.parametrize(
    "bad",
    [
        {"metric": "pm2.5"},  # not in the catalogue
        {"value": math.nan},
        {"value": math.inf},
        {"value": "nan"},
        {"value": 1e300},
        {"for_s": MAX_DURATION_S + 1},
        {"for_s": 10**30},
        {"for_s": -1},
        {"deadband": -0.5},
        {"window_s": 10},
        {"severity": "catastrophic"},
        {"op": "equals"},
        {"id": "Has Spaces"},
        {"scope": {"device_type": "toaster"}},
        {"scope": {"city": "other"}},  # a rule's city is its rule set's
        {"unknown": 1},
    ],
)
def test_a_bad_rule_is_refused(bad):
    with pytest.raises(ValidationError):
        CustomRule.model_validate({"id": "r", "metric": "pm25", "value": 5, **bad})


def test_bad_rule_sets_are_refused():
    for bad in (
        {"rules": [{"id": "a", "metric": "pm25", "value": 1}] * 2},  # the same id twice
        {"flood": {"default": {"siaga3_cm": 150, "siaga2_cm": 80, "siaga1_cm": 200, "rise_cm_per_h": 30}}},
        {"flood": {"gates": {"g": {"siaga3_cm": 1, "siaga2_cm": 2, "siaga1_cm": math.inf, "rise_cm_per_h": 1}}}},
        {"ispu": {"Hijau": "minor"}},
        {"noise": {"default_dba": 0}},
    ):
        with pytest.raises(ValidationError):
            RuleSet.model_validate(bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
rule_fields = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=60) | st.just("ok-id"),
        "kind": st.sampled_from(["threshold", "rate", "other"]),
        "metric": st.sampled_from(["pm25", "currentLevel", "LAeq", "nope"]) | st.text(max_size=10),
        "op": st.sampled_from(["above", "below"]) | json_values,
        "value": st.floats() | st.integers() | json_values,
        "for_s": st.integers() | st.floats() | json_values,
        "deadband": st.floats() | json_values,
        "severity": st.sampled_from(["minor", "major", "critical", "warning", "x"]),
        "window_s": st.integers(),
        "scope": st.dictionaries(st.sampled_from(["district", "device_type", "device_id", "city"]), json_values),
    },
)


@settings(max_examples=400, deadline=None)
@given(rules=st.lists(rule_fields, max_size=4), extra=st.dictionaries(st.text(max_size=8), json_values, max_size=2))
def test_any_body_is_either_a_valid_rule_set_or_refused_and_a_valid_one_judges_without_crashing(rules, extra):
    body = {"rules": rules, **extra}
    try:
        parsed = RuleSet.model_validate(body)
    except ValidationError:
        return
    # Stored as JSON and loaded again (the processor's path) it is the same rule set.
    again = RuleSet.model_validate(json.loads(json.dumps(parsed.model_dump(mode="json"), allow_nan=False)))
    assert again == parsed
    device = DeviceInfo("dev", "coblong", "air_quality")
    for r in parsed.rules:
        assert math.isfinite(r.value) and math.isfinite(r.deadband) and 0 <= r.for_s <= MAX_DURATION_S
        for applied in rules_for(parsed, device, r.metric, {}):
            judge(applied.judge, minutes([0.0, 1e9, -1e9, 5.0]), T0, open_at_start=False)


# -- through processing.store against PostgreSQL -----------------------------------------------------
def _temperature(minute: int) -> float:
    """Two hot spells (minutes 10-19 and 40-44) with a dip into the deadband (minute 15), in mild air."""
    if minute == 15:
        return 29.5
    return 35.0 if 10 <= minute < 20 or 40 <= minute < 45 else 25.0


async def _store_custom(
    dsn: str, city: str, device_id: str, start: int, minutes: int, per_batch: int, first_minute: int = 0
) -> None:
    from kota.contract import READINGS_TOPIC, Reading
    from processing.rulebook import RuleBook
    from processing.store import Batch, PartitionSlice, WritePolicy, write_batch
    from tests.helpers import unique_id

    readings = [
        Reading(
            start + m * MINUTE_MS + s, city, "environment", device_id, "temperature", _temperature(m), "Cel", start, "t"
        )
        for m in range(first_minute, minutes)
        for s in (5_000, 35_000)
    ]
    policy, group = WritePolicy(rulebook=RuleBook()), unique_id("custom")
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for first in range(0, len(readings), 2 * per_batch):
            chunk = readings[first : first + 2 * per_batch]
            batch = PartitionSlice(0, first, first + len(chunk), [(first + i, [r]) for i, r in enumerate(chunk)])
            for _ in range(2):  # each batch twice, as a replay after a crash would bring it: applied once
                await write_batch(conn, Batch(group, READINGS_TOPIC, [batch]), policy)


@pytest.mark.stack
def test_custom_rule_alerts_through_the_store_do_not_depend_on_batches_and_match_the_preview(stack):
    import asyncio

    from processing import rulebook
    from tests.helpers import provision, query, unique_id

    city = unique_id("custom")
    rules = RuleSet.model_validate(
        {"rules": [{"id": "hot", "metric": "temperature", "value": 30, "for_s": 180, "deadband": 1}]}
    )

    async def save() -> None:
        async with await psycopg.AsyncConnection.connect(stack.postgres_dsn, autocommit=True) as conn:
            await rulebook.save_version(conn, city, rules, author="tests", comment="hot")

    start = (int(time.time() * 1000) // 3_600_000 - 3) * 3_600_000
    outcomes = []
    for per_batch in (1, 7, 60):
        device = provision(stack, "air_quality", city=city)
        if per_batch == 1:
            asyncio.run(save())
        asyncio.run(_store_custom(stack.postgres_dsn, city, device.device_id, start, 60, per_batch))
        outcomes.append(
            query(
                stack,
                "SELECT (extract(epoch FROM first_ts) * 1000)::bigint - %s, "
                "(extract(epoch FROM last_ts) * 1000)::bigint - %s, count, state, details->>'rules_version' "
                "FROM alerts WHERE device_id = %s AND alert_type = 'rule:hot' ORDER BY alert_id",
                (start, start, device.device_id),
            )
        )
    # Raised at the third hot minute; the dip to 29.5 is within the deadband (the run starts again,
    # but the open alert goes on); cleared at 25. The second spell again from its third minute.
    assert outcomes[0] == [
        (12 * MINUTE_MS, 19 * MINUTE_MS, 7, "cleared", "1"),
        (42 * MINUTE_MS, 44 * MINUTE_MS, 3, "cleared", "1"),
    ]
    assert outcomes[1] == outcomes[0], "seven minutes a batch"
    assert outcomes[2] == outcomes[0], "the whole hour in one batch: clear and raise again inside it"

    async def preview() -> list[rulebook.Episode]:
        async with await psycopg.AsyncConnection.connect(stack.postgres_dsn, autocommit=True) as conn:
            return (await rulebook.preview(conn, city, rules.rules[0], start - 3_600_000))[1]

    # A rule removed and added again judges its series from then on, not the minutes stored meanwhile.
    later_city = unique_id("custom")
    device = provision(stack, "air_quality", city=later_city)

    async def store_under(rule_set: RuleSet, first: int, last: int) -> None:
        async with await psycopg.AsyncConnection.connect(stack.postgres_dsn, autocommit=True) as conn:
            await rulebook.save_version(conn, later_city, rule_set, author="tests", comment="-")
        await _store_custom(stack.postgres_dsn, later_city, device.device_id, start, last, 5, first_minute=first)

    asyncio.run(store_under(rules, 0, 5))  # the rule judges minutes 0-4: its watermark is at minute 4
    asyncio.run(store_under(RuleSet(), 5, 30))  # no rule while the first spell is stored
    asyncio.run(store_under(rules, 30, 60))
    assert query(
        stack,
        "SELECT (extract(epoch FROM first_ts) * 1000)::bigint - %s, count FROM alerts WHERE device_id = %s "
        "AND alert_type = 'rule:hot'",
        (start, device.device_id),
    ) == [(42 * MINUTE_MS, 3)], "the first spell was stored while no rule judged it: not alerted"

    async def preview_too_long() -> None:
        async with await psycopg.AsyncConnection.connect(stack.postgres_dsn, autocommit=True) as conn:
            far = start - (rulebook.PREVIEW_MAX_MINUTES // 3 + 1) * MINUTE_MS  # three devices judged
            await rulebook.preview(conn, city, rules.rules[0], far, now_ms=start)

    with pytest.raises(rulebook.PreviewTooLarge):
        asyncio.run(preview_too_long())

    shown = asyncio.run(preview())
    assert len(shown) == 6
    assert {(e.raised_ms - start, e.last_ms - start, e.minutes, "cleared") for e in shown} == {
        a[:4] for a in outcomes[0]
    }
