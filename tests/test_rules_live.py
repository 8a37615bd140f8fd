"""Rules operators edit, on the real stack (docs/rules.md): a change through the API reaches the
running processor without a restart, readings published through the broker raise (or no longer
raise) the alert with the version recorded, a rollback brings the old rule back, the preview over
the stored aggregates finds what the processor raised, and the rules are city-scoped and audited."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy import components, procs
from ops_api import accounts
from processing.rulebook import MINUTE_MS, CustomRule, Judge, Minute, RuleSet, episodes, judge
from tests.helpers import (
    kota_ok,
    mqtt_client,
    provision,
    publish,
    publish_series,
    query,
    stored_readings,
    unique_id,
    wait_for,
)

HOT = {
    "id": "hot",
    "metric": "temperature",
    "op": "above",
    "value": 30,
    "for_s": 120,
    "deadband": 2,
    "severity": "major",
}


def client(stack, user_id: str, role: str, cities: tuple[str, ...]) -> httpx.Client:
    with psycopg.connect(stack.postgres_dsn) as conn:
        accounts.upsert_user(conn, accounts.User(user_id, role, cities), actor="tests")  # type: ignore[arg-type]
        token = accounts.issue_token(conn, user_id, actor="tests")
    return httpx.Client(base_url=stack.api_url, timeout=20, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def city(pipeline):
    name = unique_id("rules")
    device = provision(pipeline, "air_quality", city=name, district="coblong")
    operator = client(pipeline, unique_id("op"), "operator", (name,))
    yield name, device, operator
    operator.close()


def episode(start_ms: int, hot: float) -> list[tuple[int, float]]:
    """15 minutes of temperature, three readings a minute: 25 for 5 minutes, `hot` for 5, 25 for 5."""
    values = [25.0] * 5 + [hot] * 5 + [25.0] * 5
    return [(start_ms + i * MINUTE_MS + s * 20_000, v) for i, v in enumerate(values) for s in range(3)]


def judged_past(stack, device_id: str, ts_ms: int) -> None:
    def past() -> bool:
        rows = query(
            stack,
            "SELECT (extract(epoch FROM judged_before) * 1000)::bigint FROM rule_watermarks "
            "WHERE device_id = %s AND metric = 'temperature'",
            (device_id,),
        )
        return bool(rows) and rows[0][0] > ts_ms

    wait_for(past, timeout_s=90, what=f"the processor to judge {device_id} past {ts_ms}")


def rule_alerts(stack, device_id: str) -> list[tuple]:
    return query(
        stack,
        "SELECT (extract(epoch FROM first_ts) * 1000)::bigint, (extract(epoch FROM last_ts) * 1000)::bigint, count, "
        "state, details->>'rules_version', severity, cleared_by FROM alerts "
        "WHERE device_id = %s AND alert_type = 'rule:hot' ORDER BY first_ts",
        (device_id,),
    )


def test_a_rule_changed_through_the_api_applies_live_rolls_back_and_previews_what_the_processor_raised(pipeline, city):
    name, device, operator = city
    processor_pid = procs.running_pid(pipeline, "processor")
    base = int(time.time() * 1000) - 3 * 3_600_000
    base -= base % MINUTE_MS

    # Version 1: temperature above 30 for two minutes. The first episode (35 for five minutes) raises it.
    saved = operator.put(
        f"/api/v1/cities/{name}/rules", json={"rules": {"rules": [HOT]}, "comment": "hot", "expected_version": 0}
    )
    assert saved.status_code == 200, saved.text
    assert saved.json()["version"] == 1 and saved.json()["author"].startswith("op-")
    publish_series(pipeline, device, "temperature", episode(base, 35.0), per_message=15)
    judged_past(pipeline, device.device_id, base + 10 * MINUTE_MS)
    first = rule_alerts(pipeline, device.device_id)
    # Raised at the second minute at 35 (two minutes held), counted on the next three, cleared at 25.
    assert first == [(base + 6 * MINUTE_MS, base + 9 * MINUTE_MS, 4, "cleared", "1", "major", "kota-processor")]

    # Version 2: above 40. The same episode again raises nothing.
    higher = operator.put(
        f"/api/v1/cities/{name}/rules",
        json={"rules": {"rules": [{**HOT, "value": 40}]}, "comment": "too noisy", "expected_version": 1},
    )
    assert higher.status_code == 200 and higher.json()["version"] == 2
    stale = operator.put(f"/api/v1/cities/{name}/rules", json={"rules": {}, "comment": "late", "expected_version": 1})
    assert stale.status_code == 409, "an edit from a version that is no longer current is refused"
    publish_series(pipeline, device, "temperature", episode(base + 20 * MINUTE_MS, 35.0), per_message=15)
    judged_past(pipeline, device.device_id, base + 30 * MINUTE_MS)
    assert rule_alerts(pipeline, device.device_id) == first, "version 2 no longer raises at 35"

    # Roll back to version 1 (as version 3): the third episode raises again, recorded with version 3.
    back = operator.post(f"/api/v1/cities/{name}/rules/rollback", json={"version": 1, "comment": "storm season"})
    assert back.status_code == 200, back.text
    assert back.json()["version"] == 3 and back.json()["rolled_back_to"] == 1
    assert back.json()["rules"]["rules"][0]["value"] == 30
    publish_series(pipeline, device, "temperature", episode(base + 40 * MINUTE_MS, 36.0), per_message=15)
    judged_past(pipeline, device.device_id, base + 50 * MINUTE_MS)
    alerts = rule_alerts(pipeline, device.device_id)
    assert alerts[1:] == [(base + 46 * MINUTE_MS, base + 49 * MINUTE_MS, 4, "cleared", "3", "major", "kota-processor")]
    assert procs.running_pid(pipeline, "processor") == processor_pid, "applied without restarting the processor"

    # The preview of version 1's rule over the stored aggregates: the two episodes the processor
    # raised, exactly, and the one version 2 kept quiet.
    preview = operator.post(f"/api/v1/cities/{name}/rules/preview", json={"rule": HOT, "days": 1})
    assert preview.status_code == 200, preview.text
    found = preview.json()
    assert found["alerts"] == 3 and found["devices_alerted"] == [device.device_id] and found["devices_judged"] == 1

    def ms(text: str | None) -> int | None:
        return None if text is None else int(dt.datetime.fromisoformat(text).timestamp() * 1000)

    shown = [(ms(e["raised_at"]), ms(e["last_at"]), e["minutes"], ms(e["cleared_at"])) for e in found["episodes"]]
    raised = [(first_ts, last_ts, count, last_ts + MINUTE_MS) for first_ts, last_ts, count, *_ in alerts]
    assert [shown[0], shown[2]] == raised
    assert shown[1] == (base + 26 * MINUTE_MS, base + 29 * MINUTE_MS, 4, base + 30 * MINUTE_MS)
    assert found["episodes"][2]["worst"] == pytest.approx(36.0)

    # History and audit: three versions with their authors and comments, each change in audit_log.
    history = operator.get(f"/api/v1/cities/{name}/rules/versions").json()
    assert [(v["version"], v["comment"]) for v in history] == [
        (3, "storm season"),
        (2, "too noisy"),
        (1, "hot"),
        (0, "today's behaviour"),
    ]
    audit = query(
        pipeline,
        "SELECT action, target_id, details->>'comment' FROM audit_log WHERE city = %s AND target_type = 'rules' "
        "ORDER BY event_id",
        (name,),
    )
    assert audit == [
        ("rules.changed", f"{name}@1", "hot"),
        ("rules.changed", f"{name}@2", "too noisy"),
        ("rules.rolled_back", f"{name}@3", "storm season"),
    ]


def test_rules_are_city_scoped_and_only_operators_and_admins_edit_them(pipeline, city):
    name, device, operator = city
    other_city = unique_id("rules")
    provision(pipeline, "air_quality", city=other_city)
    outsider = client(pipeline, unique_id("op"), "operator", (other_city,))
    integrator = client(pipeline, unique_id("int"), "integrator", (name,))
    body = {"rules": {"rules": [HOT]}, "comment": "x"}
    with outsider, integrator:
        for response in (
            outsider.get(f"/api/v1/cities/{name}/rules"),
            outsider.get(f"/api/v1/cities/{name}/rules/versions"),
            outsider.put(f"/api/v1/cities/{name}/rules", json=body),
            outsider.post(f"/api/v1/cities/{name}/rules/rollback", json={"version": 0}),
            outsider.post(f"/api/v1/cities/{name}/rules/preview", json={"rule": HOT}),
        ):
            assert response.status_code == 404, response.text
        assert integrator.get(f"/api/v1/cities/{name}/rules").status_code == 200
        assert integrator.put(f"/api/v1/cities/{name}/rules", json=body).status_code == 403
        assert integrator.post(f"/api/v1/cities/{name}/rules/rollback", json={"version": 0}).status_code == 403
        # A rule naming another city's device is refused, as is one that does not validate; nothing is stored.
        foreign = {**HOT, "scope": {"device_id": device.device_id}}
        assert (
            outsider.put(
                f"/api/v1/cities/{other_city}/rules", json={"rules": {"rules": [foreign]}, "comment": "x"}
            ).status_code
            == 422
        )
        for bad in ({**HOT, "metric": "warmth"}, {**HOT, "for_s": 10**12}, {**HOT, "value": 1e300}):
            refused = operator.put(f"/api/v1/cities/{name}/rules", json={"rules": {"rules": [bad]}, "comment": "x"})
            assert refused.status_code == 422, bad
        for number in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):  # JSON as Python's parser takes it
            refused = operator.put(
                f"/api/v1/cities/{name}/rules",
                content=b'{"rules": {"rules": [{"id": "a", "metric": "pm25", "value": %s}]}, "comment": "x"}' % number,
                headers={"content-type": "application/json"},
            )
            assert refused.status_code == 422, number
    assert operator.get(f"/api/v1/cities/{name}/rules").json()["version"] == 0
    assert query(pipeline, "SELECT count(*) FROM rule_versions WHERE city IN (%s, %s)", (name, other_city)) == [(0,)]


def test_flood_gate_ispu_and_noise_rules_are_data_too_and_the_cli_edits_them(pipeline, city):
    """Today's domain rules read their thresholds from the city's rules: a gate's Siaga levels, the
    ISPU categories that alert, a sensor's noise limit (which alerts once given a severity)."""
    name, station, operator = city
    gate = provision(pipeline, "water_level", city=name)
    meter = provision(pipeline, "noise", city=name)
    body = {
        "flood": {
            "gates": {gate.device_id: {"siaga3_cm": 10, "siaga2_cm": 20, "siaga1_cm": 30, "rise_cm_per_h": 5000}}
        },
        "ispu": {"Sedang": "warning"},
        "noise": {"sensors": {meter.device_id: 60}, "severity": "minor"},
    }
    rules_file = pipeline.state_dir / f"{name}.json"
    rules_file.write_text(json.dumps(body))
    out = kota_ok(pipeline, "rules", "set", name, "--file", f"@{rules_file}", "--comment", "from the cli")
    assert "version 1 saved" in out
    base = int(time.time() * 1000) - 3_600_000
    base -= base % MINUTE_MS
    publish_series(pipeline, gate, "currentLevel", [(base + i * 20_000, 25.0) for i in range(9)])
    publish_series(pipeline, station, "pm25", [(base + i * 20_000, 30.0) for i in range(9)])  # ISPU about 68: Sedang
    publish_series(pipeline, meter, "LAeq", [(base + i * 20_000, 70.0 if i < 6 else 50.0) for i in range(12)])

    def alert(device_id: str, alert_type: str) -> list[tuple]:
        return query(
            pipeline,
            "SELECT severity, details->>'rules_version', details FROM alerts WHERE device_id = %s AND alert_type = %s",
            (device_id, alert_type),
        )

    flood = wait_for(lambda: alert(gate.device_id, "flood_siaga"), timeout_s=90, what="the gate's Siaga alert")
    assert flood[0][:2] == ("major", "1") and flood[0][2]["thresholds_cm"] == [10, 20, 30], "25 cm is Siaga 2 here"
    air = wait_for(lambda: alert(station.device_id, "air_quality_unhealthy"), timeout_s=90, what="the ISPU alert")
    assert air[0][:2] == ("warning", "1") and air[0][2]["category"] == "Sedang"
    noise = wait_for(lambda: alert(meter.device_id, "noise_limit"), timeout_s=90, what="the noise alert")
    assert noise[0][:2] == ("minor", "1") and noise[0][2]["threshold"] == 60

    # The environment view shows the limits and thresholds the processor judges by.
    env = operator.get(f"/api/v1/cities/{name}/environment").json()
    assert [(n["limit_dba"], n["exceeds_limit"]) for n in env["noise"]] == [(60, False)]  # newest LAeq is 50
    assert [(w["siaga3_cm"], w["siaga2_cm"], w["siaga1_cm"]) for w in env["water_levels"]] == [(10, 20, 30)]

    # The CLI: add a custom rule, see the history, preview, roll back to the defaults.
    hot = json.dumps({"id": "loud", "metric": "LAeq", "value": 65, "severity": "major"})
    assert "version 2 saved" in kota_ok(pipeline, "rules", "set", name, "--add-rule", hot, "--comment", "loud")
    listed = kota_ok(pipeline, "rules", "list", name)
    assert "loud: LAeq above 65" in listed and "version 2" in listed
    preview = kota_ok(pipeline, "rules", "preview", name, hot, "--days", "1")
    assert "1 alerts on 1 of 1 devices" in preview and meter.device_id in preview
    assert "version 3 saved" in kota_ok(pipeline, "rules", "rollback", name, "0")
    history = kota_ok(pipeline, "rules", "history", name)
    assert "v3" in history and "rollback to version 0" in history and "cli:" in history
    assert operator.get(f"/api/v1/cities/{name}/rules").json()["rules"] == json.loads(
        kota_ok(pipeline, "rules", "show", name, "--version", "0")
    )


rule_bodies = st.fixed_dictionaries(
    {
        "id": st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
        "metric": st.sampled_from(["temperature", "pm25", "x"]),
    },
    optional={
        "kind": st.sampled_from(["threshold", "rate", "ratio"]),
        "op": st.sampled_from(["above", "below", "near"]),
        "value": st.floats(allow_nan=False, allow_infinity=False)
        | st.integers(-(10**20), 10**20)
        | st.text(max_size=4),
        "for_s": st.integers(-5, 10**7) | st.floats(allow_nan=False, allow_infinity=False),
        "deadband": st.floats(allow_nan=False, allow_infinity=False),
        "window_s": st.integers(0, 10**6),
        "severity": st.sampled_from(["minor", "critical", "loud"]),
        "scope": st.fixed_dictionaries(
            {}, optional={"district": st.text(max_size=8), "device_type": st.sampled_from(["air_quality", "toaster"])}
        ),
    },
)


def test_any_rule_sent_to_the_api_is_stored_as_checked_or_refused_and_the_processor_goes_on(pipeline, city):
    """Hypothesis against the real API: every body is a 200 (stored exactly as the checks read it) or
    a 422 (nothing stored), never a 500; and whatever was stored, the processor keeps storing readings."""
    name, device, operator = city
    processor_pid = procs.running_pid(pipeline, "processor")
    outcomes: list[int] = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(rules=st.lists(rule_bodies, max_size=3))
    def put(rules) -> None:
        before = operator.get(f"/api/v1/cities/{name}/rules").json()["version"]
        response = operator.put(f"/api/v1/cities/{name}/rules", json={"rules": {"rules": rules}, "comment": "fuzz"})
        outcomes.append(response.status_code)
        after = operator.get(f"/api/v1/cities/{name}/rules").json()
        if response.status_code == 200:
            assert after["version"] == before + 1
            assert after["rules"] == RuleSet.model_validate({"rules": rules}).model_dump(mode="json")
        else:
            assert response.status_code == 422, response.text
            assert after["version"] == before

    put()
    assert 200 in outcomes and 422 in outcomes, "both valid and invalid bodies were tried"
    ts = int(time.time() * 1000)
    publish_series(pipeline, device, "temperature", [(ts + i * 20_000, 20.0 + i) for i in range(6)])
    wait_for(
        lambda: (
            query(
                pipeline,
                "SELECT count(*) FROM readings WHERE device_id = %s AND ts >= kota_ms(%s)",
                (device.device_id, ts),
            )[0][0]
            == 6
        ),
        timeout_s=60,
        what="readings stored under the fuzzed rules",
    )
    assert procs.running_pid(pipeline, "processor") == processor_pid


def test_a_processor_killed_mid_episode_raises_each_alert_once_as_the_rule_says(pipeline, city):
    """kill -9 of the processor while a custom rule's episodes stream in: after the restart the
    alerts are exactly those the judge finds over the whole series (none doubled, none lost, counts
    right), because what the rule has judged lives in the batch transactions, not in memory."""
    name, device, operator = city
    rule = {"id": "hot", "metric": "temperature", "value": 30, "for_s": 120, "deadband": 2, "severity": "major"}
    assert operator.put(f"/api/v1/cities/{name}/rules", json={"rules": {"rules": [rule]}, "comment": "k"}).is_success
    start = int(time.time() * 1000) - 4 * 3_600_000
    start -= start % MINUTE_MS
    hot = {*range(5, 10), *range(20, 31), *range(40, 45), *range(50, 56)}
    per_minute = [35.0 if m in hot else 25.0 for m in range(60)]
    points = [(start + m * MINUTE_MS + s * 5_000, v) for m, v in enumerate(per_minute) for s in range(12)]
    killed = threading.Event()

    def stream() -> None:
        client = mqtt_client(pipeline, device.device_id)
        try:
            for i in range(0, len(points), 6):
                if i == len(points) // 2:
                    killed.wait(timeout=120)
                publish(client, device, [{"ts": ts, "values": {"temperature": v}} for ts, v in points[i : i + 6]])
                time.sleep(0.01)
        finally:
            client.disconnect()

    publisher = threading.Thread(target=stream)
    publisher.start()
    try:
        wait_for(lambda: len(stored_readings(pipeline, device.device_id)) > 100, what="the first readings")
        assert procs.stop(pipeline, "processor", hard=True), "processor was not running"
        killed.set()
        stored_at_kill = len(stored_readings(pipeline, device.device_id))
        time.sleep(1.0)
        components.start_component(pipeline, "processor")
    finally:
        publisher.join(timeout=120)
    assert stored_at_kill < len(points), "the kill came too late to prove anything"
    judged_past(pipeline, device.device_id, start + 58 * MINUTE_MS)

    expected_judged, _ = judge(
        Judge.of(CustomRule.model_validate(rule)),
        [Minute(start + m * MINUTE_MS, v) for m, v in enumerate(per_minute[:59])],  # minute 59 is not closed
        start,
        open_at_start=False,
    )
    expected = [
        (e.raised_ms, e.last_ms, e.minutes, "cleared" if e.cleared_ms else "active")
        for e in episodes(expected_judged, device.device_id, "above")
    ]
    assert len(expected) == 4
    assert [a[:4] for a in rule_alerts(pipeline, device.device_id)] == expected
    assert len(stored_readings(pipeline, device.device_id)) == len(points)
