"""Detection, domain rules and alerts through the real pipeline (MQTT -> gateway -> Kafka -> processor -> DB)."""

import asyncio
import math
import time

import psycopg
import pytest
from aiokafka.partitioner import DefaultPartitioner

from deploy import components, procs
from kota import alerts
from kota.contract import gateway_telemetry_topic
from tests.helpers import (
    mqtt_client,
    provision,
    provision_gateway,
    publish,
    publish_series,
    query,
    stored_readings,
    wait_for,
)

pytestmark = pytest.mark.stack

MINUTE = 60_000


def _alerts(stack, device_id: str) -> list[tuple]:
    return query(
        stack,
        "SELECT alert_id, alert_type, severity, state, count, cleared_by, message FROM alerts "
        "WHERE device_id = %s ORDER BY alert_id",
        (device_id,),
    )


def _events(stack, alert_id: int) -> list[tuple]:
    return query(
        stack, "SELECT action, actor, severity FROM alert_events WHERE alert_id = %s ORDER BY event_id", (alert_id,)
    )


def _steady(start_ms: int, n: int, step_ms: int, level: float) -> list[tuple[int, float]]:
    return [(start_ms + i * step_ms, level + 0.01 * (i % 7)) for i in range(n)]


def test_a_flapping_series_raises_one_alert_that_counts_repeats_and_clears_itself(pipeline):
    meter = provision(pipeline, "water_meter")
    # On an hour boundary: the detectors keep an hour-of-day profile, so where the hours fall in the
    # stream decides which spikes score; aligned, the stream scores the same in every run.
    start = (int(time.time() * 1000) // 3_600_000 - 5) * 3_600_000
    step = 10_000
    normal = _steady(start, 200, step, 3.0)
    # Spikes every 20th reading for 400 readings: far more often than the clear-after time (600 s).
    flapping = [(start + (200 + i) * step, 40.0 if i % 20 == 0 else 3.0 + 0.01 * (i % 7)) for i in range(400)]
    calm = _steady(start + 600 * step, 100, step, 3.0)  # 1,000 s of normal readings: longer than 600 s
    publish_series(pipeline, meter, "pressure", normal + flapping)
    wait_for(lambda: len(stored_readings(pipeline, meter.device_id)) == 600, what="the flapping readings")
    [(alert_id, alert_type, severity, state, count, _, message)] = wait_for(
        lambda: _alerts(pipeline, meter.device_id), what="an alert"
    )
    anomalies = query(pipeline, "SELECT count(*) FROM anomalies WHERE device_id = %s", (meter.device_id,))[0][0]
    assert (alert_type, state) == ("spike", "active")
    # The first flaps are anomalies; the rest are not news (quiet period, then routine for this
    # sensor), but each still counts on the one alert (written with the readings: final now).
    # Each flap counts, and so may the step back from it, which the rate-of-change detector calls
    # sudden (processing/kernels.py: on under the anomaly likelihood, as the processor runs it).
    assert 20 <= count <= 40, "every flap counted"
    assert 1 <= anomalies < 20
    assert "pressure" in message

    publish_series(pipeline, meter, "pressure", calm)
    wait_for(lambda: _alerts(pipeline, meter.device_id)[0][3] == "cleared", what="the automatic clear")
    [(_, _, _, state, _, cleared_by, _)] = _alerts(pipeline, meter.device_id)
    assert cleared_by == alerts.SYSTEM_ACTOR
    assert [e[0] for e in _events(pipeline, alert_id)] == ["raised", "cleared"]


async def _act(stack, action, alert_id: int, actor: str, comment: str):
    async with await psycopg.AsyncConnection.connect(stack.postgres_dsn) as conn:
        return await action(conn, alert_id, actor, comment)


def test_operators_acknowledge_and_clear_and_a_new_anomaly_then_raises_a_new_alert(pipeline):
    meter = provision(pipeline, "electricity_meter")
    start = int(time.time() * 1000) - 4 * 3_600_000
    publish_series(pipeline, meter, "activePower", _steady(start, 100, 10_000, 5.0) + [(start + 100 * 10_000, 500.0)])
    [(alert_id, _, severity, *_)] = wait_for(lambda: _alerts(pipeline, meter.device_id), what="an alert")
    assert severity == "major"

    asyncio.run(_act(pipeline, alerts.acknowledge, alert_id, "operator-ani", "looking"))
    with pytest.raises(alerts.AlertStateError, match="already acknowledged"):
        asyncio.run(_act(pipeline, alerts.acknowledge, alert_id, "operator-ani", "again"))
    asyncio.run(_act(pipeline, alerts.clear, alert_id, "operator-budi", "meter replaced"))
    with pytest.raises(alerts.AlertStateError, match="already cleared"):
        asyncio.run(_act(pipeline, alerts.clear, alert_id, "operator-budi", "twice"))
    with pytest.raises(LookupError):
        asyncio.run(_act(pipeline, alerts.clear, 10**12, "operator-budi", "no such alert"))
    assert _events(pipeline, alert_id) == [
        ("raised", alerts.SYSTEM_ACTOR, "major"),
        ("acknowledged", "operator-ani", "major"),
        ("cleared", "operator-budi", "major"),
    ]
    acked_by, cleared_by = query(
        pipeline, "SELECT acknowledged_by, cleared_by FROM alerts WHERE alert_id = %s", (alert_id,)
    )[0]
    assert (acked_by, cleared_by) == ("operator-ani", "operator-budi")

    later = start + 101 * 10_000  # on without a silence (which would be a dropout of its own)
    publish_series(pipeline, meter, "activePower", _steady(later, 150, 10_000, 5.0) + [(later + 150 * 10_000, 900.0)])
    wait_for(lambda: len(_alerts(pipeline, meter.device_id)) == 2, what="a second, new alert")
    assert [a[3] for a in _alerts(pipeline, meter.device_id)] == ["cleared", "active"]


def test_air_quality_station_gets_ispu_and_an_alert_when_it_turns_unhealthy(pipeline):
    station = provision(pipeline, "air_quality")
    start = (int(time.time() * 1000) // MINUTE - 30) * MINUTE
    publish_series(pipeline, station, "pm10", [(start + i * MINUTE, 40.0) for i in range(10)])
    publish_series(pipeline, station, "pm25", [(start + i * MINUTE, 12.0) for i in range(10)])
    wait_for(
        lambda: query(pipeline, "SELECT 1 FROM station_ispu WHERE device_id = %s", (station.device_id,)),
        what="the station's ISPU",
    )
    assert _alerts(pipeline, station.device_id) == []  # Baik: no alert
    # An episode: PM2.5 at 300 ug/m3 for 20 minutes; the mean over the hour moves into Sangat Tidak Sehat.
    publish_series(pipeline, station, "pm25", [(start + (10 + i) * MINUTE, 300.0) for i in range(20)])
    wait_for(
        lambda: (
            query(pipeline, "SELECT category FROM station_ispu WHERE device_id = %s", (station.device_id,))[0][0]
            == "Sangat Tidak Sehat"
        ),
        what="the episode in the ISPU",
    )
    ispu, critical, subs = query(
        pipeline, "SELECT ispu, critical, sub_indices FROM station_ispu WHERE device_id = %s", (station.device_id,)
    )[0]
    mean_pm25 = (10 * 12.0 + 20 * 300.0) / 30
    assert critical == "pm25" and 200 < ispu <= 300
    assert subs["pm25"] == pytest.approx(round((300 - 200) / (250.4 - 150.4) * (mean_pm25 - 150.4) + 200, 1))
    [(_, alert_type, severity, state, *_)] = wait_for(lambda: _alerts(pipeline, station.device_id), what="alert")
    assert (alert_type, severity, state) == ("air_quality_unhealthy", "major", "active")


def test_flood_gate_steps_up_through_siaga_levels_and_a_fast_rise_alerts_first(pipeline):
    gate = provision(pipeline, "water_level")
    with psycopg.connect(pipeline.postgres_dsn) as conn:  # this gate's own thresholds (cm)
        conn.execute("INSERT INTO flood_gates VALUES (%s, 100, 150, 200, 40)", (gate.device_id,))
    start = (int(time.time() * 1000) // MINUTE - 120) * MINUTE
    rising = [(start + i * MINUTE, 20.0 + 2.0 * i) for i in range(100)]  # 2 cm a minute: 120 cm/h, up to 218 cm
    publish_series(pipeline, gate, "currentLevel", rising[:30], per_message=10)  # up to 78 cm: Siaga 4
    wait_for(lambda: _alerts(pipeline, gate.device_id), what="the fast-rise alert")
    assert [a[1] for a in _alerts(pipeline, gate.device_id)] == ["flood_rising"], "rise alert before any threshold"
    publish_series(pipeline, gate, "currentLevel", rising[30:], per_message=10)
    wait_for(
        lambda: query(pipeline, "SELECT siaga FROM gate_status WHERE device_id = %s", (gate.device_id,))[0][0] == 1,
        what="Siaga 1",
    )
    siaga = {a[1]: a for a in _alerts(pipeline, gate.device_id)}["flood_siaga"]
    assert (siaga[2], siaga[3]) == ("critical", "active")
    assert [(e[0], e[2]) for e in _events(pipeline, siaga[0])] == [
        ("raised", "minor"),
        ("escalated", "major"),
        ("escalated", "critical"),
    ], "one alert, escalated each step up"
    level, rise = query(
        pipeline, "SELECT level_cm, rise_cm_per_h FROM gate_status WHERE device_id = %s", (gate.device_id,)
    )[0]
    assert level == 218.0 and rise == pytest.approx(120.0, rel=0.05)


def test_a_reading_later_than_the_allowed_lateness_is_kept_aside_and_counted(pipeline):
    meter = provision(pipeline, "water_meter")
    three_days_ago = int(time.time() * 1000) - 3 * 86_400_000  # the gateway takes up to 7 days; windows close at 2
    publish_series(pipeline, meter, "pressure", [(three_days_ago, 2.5)])
    [(reason,)] = wait_for(
        lambda: query(pipeline, "SELECT reason FROM late_readings WHERE device_id = %s", (meter.device_id,)),
        what="the late reading",
    )
    assert "allowed lateness is 48.0 h" in reason
    assert stored_readings(pipeline, meter.device_id) == []
    assert query(pipeline, "SELECT count(*) FROM agg_1m WHERE device_id = %s", (meter.device_id,)) == [(0,)]


def test_a_silent_series_raises_a_dropout_alert_on_the_timer_and_clears_when_data_returns(pipeline):
    light = provision(pipeline, "street_light")
    now = int(time.time() * 1000)
    publish_series(pipeline, light, "powerConsumption", _steady(now - 40_000, 40, 1000, 60.0))  # one a second
    [(alert_id, alert_type, severity, state, *_)] = wait_for(
        lambda: _alerts(pipeline, light.device_id), timeout_s=60, what="the dropout alert"
    )
    assert (alert_type, severity, state) == ("dropout", "minor", "active")
    publish_series(pipeline, light, "powerConsumption", [(int(time.time() * 1000), 61.0)])
    wait_for(lambda: _alerts(pipeline, light.device_id)[0][3] == "cleared", what="clear on return")


def test_a_silence_raises_its_dropout_alert_in_event_time_while_it_lasts(pipeline):
    """A replay, however fast: a meter's flow falls silent while its pressure reports on, and the
    alert is raised at the event time the silence passed five usual intervals, with the batch that
    shows it, not when data comes back nor when the wall-clock timer would notice (five minutes)."""
    meter = provision(pipeline, "water_meter")
    start = (int(time.time() * 1000) // MINUTE - 180) * MINUTE
    flow = [(start + i * MINUTE, 2.0 + 0.01 * (i % 7)) for i in range(60)]
    pressure = [(start + i * MINUTE, 3.0 + 0.01 * (i % 5)) for i in range(90)]
    publish_series(pipeline, meter, "waterConsumption", flow)
    publish_series(pipeline, meter, "pressure", pressure)
    asked = time.monotonic()
    [(alert_id, alert_type, severity, state, *_)] = wait_for(
        lambda: _alerts(pipeline, meter.device_id), timeout_s=60, what="the dropout alert"
    )
    assert time.monotonic() - asked < 5 * 60, "raised before the wall-clock timer could have"
    assert (alert_type, severity, state) == ("dropout", "minor", "active")
    silent_since = flow[-1][0] + 5 * MINUTE  # five usual intervals after the last reading
    [(metric, first_ms)] = query(
        pipeline,
        "SELECT metric, (extract(epoch FROM first_ts) * 1000)::bigint FROM alerts WHERE alert_id = %s",
        (alert_id,),
    )
    assert (metric, first_ms) == ("waterConsumption", silent_since)
    assert query(
        pipeline,
        "SELECT reason, (extract(epoch FROM ts) * 1000)::bigint FROM anomalies WHERE device_id = %s",
        (meter.device_id,),
    ) == [("dropout", silent_since)]
    # The flow comes back: the alert clears, and the gap it ends is stored, not alerted again.
    publish_series(pipeline, meter, "waterConsumption", [(start + 90 * MINUTE, 2.0)])
    wait_for(lambda: _alerts(pipeline, meter.device_id)[0][3] == "cleared", what="clear on return")
    assert len(_alerts(pipeline, meter.device_id)) == 1


def test_a_device_silent_while_its_gateway_sends_the_others_raises_a_dropout_in_event_time(pipeline):
    """Devices behind one gateway come the same way, at one pace: one of them silent while the
    gateway goes on sending the others is a dropout, found in event time from their readings."""
    gateway = provision_gateway(pipeline)
    partitions = list(range(pipeline.kafka_partitions))
    partition_of = DefaultPartitioner()
    devices: list = []
    while len(devices) < 3:  # three on one partition: the processor judges a partition's devices together
        device = provision(pipeline, "noise", gateway_id=gateway.gateway_id)
        if not devices or partition_of(device.device_id.encode(), partitions, partitions) == partition_of(
            devices[0].device_id.encode(), partitions, partitions
        ):
            devices.append(device)
    silent = devices[2]
    start = (int(time.time() * 1000) // MINUTE - 180) * MINUTE
    client = mqtt_client(pipeline, gateway.gateway_id)
    topic = gateway_telemetry_topic(gateway.city, gateway.gateway_id)
    try:
        for i in range(90):
            reporting = devices if i < 40 else devices[:2]
            body = {
                d.device_id: [{"ts": start + i * MINUTE, "values": {"LAeq": 50.0 + 0.1 * (i % 7)}}] for d in reporting
            }
            publish(client, devices[0], body, topic=topic)
    finally:
        client.disconnect()
    [(alert_id, alert_type, *_)] = wait_for(lambda: _alerts(pipeline, silent.device_id), what="the dropout alert")
    [(first_ms,)] = query(
        pipeline, "SELECT (extract(epoch FROM first_ts) * 1000)::bigint FROM alerts WHERE alert_id = %s", (alert_id,)
    )
    assert (alert_type, first_ms) == ("dropout", start + 39 * MINUTE + 5 * MINUTE)
    assert _alerts(pipeline, devices[0].device_id) == _alerts(pipeline, devices[1].device_id) == []


def test_a_silence_that_begins_and_ends_within_one_batch_is_a_dropout_dated_when_it_began(pipeline):
    """A fast replay puts hours of event time in one batch: a sensor silent for an hour in the
    middle of it raised nothing, because its state had moved past the silence by the time the batch
    was judged. Its alert is dated five usual intervals into the silence, and cleared by the return."""
    light = provision(pipeline, "street_light")
    start = (int(time.time() * 1000) // MINUTE - 240) * MINUTE
    publish_series(pipeline, light, "powerState", [(start + i * MINUTE, 1.0) for i in range(30)])
    wait_for(lambda: len(stored_readings(pipeline, light.device_id)) == 30, what="its first half hour")
    minutes = [*range(30, 60), *range(120, 180)]  # then one message, silent from minute 60 to 119
    publish_series(pipeline, light, "powerState", [(start + i * MINUTE, 1.0) for i in minutes], per_message=90)
    [(alert_id, alert_type, _, state, *_)] = wait_for(lambda: _alerts(pipeline, light.device_id), what="the dropout")
    [(first_ms,)] = query(
        pipeline, "SELECT (extract(epoch FROM first_ts) * 1000)::bigint FROM alerts WHERE alert_id = %s", (alert_id,)
    )
    assert (alert_type, first_ms) == ("dropout", start + 59 * MINUTE + 5 * MINUTE)
    wait_for(lambda: _alerts(pipeline, light.device_id)[0][3] == "cleared", what="cleared by the return")


def test_a_restarted_processor_does_not_signal_an_open_dropout_again(pipeline):
    quiet = provision(pipeline, "water_meter")
    now = int(time.time() * 1000)
    publish_series(pipeline, quiet, "pressure", _steady(now - 40_000, 40, 1000, 3.0))  # then silence
    [(alert_id, _, _, state, count, *_)] = wait_for(
        lambda: _alerts(pipeline, quiet.device_id), timeout_s=60, what="the dropout alert"
    )
    assert state == "active"

    assert procs.stop(pipeline, "processor", hard=True)
    components.start_component(pipeline, "processor")
    # The restarted processor's timer proves it has run past the quiet series' silence by raising
    # a dropout for a series that falls silent after the restart (the restart marks every known
    # series as just arrived; the quiet one, reporting every second, is due five seconds later).
    control = provision(pipeline, "water_meter")
    now = int(time.time() * 1000)
    publish_series(pipeline, control, "pressure", _steady(now - 40_000, 40, 1000, 3.0))
    wait_for(lambda: _alerts(pipeline, control.device_id), timeout_s=90, what="the control's dropout alert")
    assert _alerts(pipeline, quiet.device_id)[0][:5] == (alert_id, "dropout", "minor", "active", count)


def test_a_street_light_switching_off_and_on_is_not_an_anomaly(pipeline):
    # powerState is a state code (judged only by its range); power resting at 0 W by day is "off",
    # not a stuck sensor. Before both rules, the first simulated day had 38 such false detections.
    light = provision(pipeline, "street_light")
    start = (int(time.time() * 1000) // 3_600_000 - 5) * 3_600_000
    night = range(0, 120)  # then 120 minutes of day
    state = [(start + i * MINUTE, 1.0 if i in night else 0.0) for i in range(240)]
    power = [(start + i * MINUTE, 120.0 + (i * 7 % 5) if i in night else 0.0) for i in range(240)]
    publish_series(pipeline, light, "powerState", state)
    publish_series(pipeline, light, "powerConsumption", power)
    wait_for(lambda: len(stored_readings(pipeline, light.device_id)) == 480, what="the street light's readings")
    # Anomalies are written in the transaction that stores their readings: all are there now.
    reasons = query(pipeline, "SELECT metric, reason FROM anomalies WHERE device_id = %s", (light.device_id,))
    assert not [r for r in reasons if r[0] == "powerState"], reasons
    assert ("powerConsumption", "stuck") not in reasons, reasons
    # powerConsumption is a switched load: switching off at dawn is not a dip (kernels.SWITCHED).
    assert not [r for r in reasons if r[0] == "powerConsumption"], reasons


def test_a_pm25_sensor_drifting_away_from_pm10_raises_an_inconsistent_warning_within_two_hours(pipeline):
    # Four hours of a station sending both sizes in each message every 10 s (within the processor's
    # allowed lateness), then PM2.5 alone drifts +60 ug/m3 over an hour: the relation between the
    # two (kota.contract.RELATIONS) breaks as it builds.
    station = provision(pipeline, "air_quality")
    step = 10_000
    start = (int(time.time() * 1000) // MINUTE - 6 * 60) * MINUTE
    drift_from, drift_ticks = 4 * 360, 360
    points = []
    for t in range(drift_from + drift_ticks):
        minutes = t * step / MINUTE
        air = 30 + 15 * math.sin(minutes / 1440 * 2 * math.pi) + 3 * math.sin(t * 1.7)  # a day's cycle and wiggles
        pm25 = air + 60 * max(0, t - drift_from) / drift_ticks
        pm10 = 1.6 * air + 2 * math.cos(t * 2.3)
        points.append({"ts": start + t * step, "values": {"pm25": round(pm25, 2), "pm10": round(pm10, 2)}})
    client = mqtt_client(pipeline, station.device_id)
    try:
        for first in range(0, len(points), 200):
            publish(client, station, points[first : first + 200])
    finally:
        client.disconnect()
    wait_for(
        lambda: len(stored_readings(pipeline, station.device_id)) == 2 * len(points), what="the readings", timeout_s=120
    )
    [(metric, ts_ms, score)] = wait_for(
        lambda: query(
            pipeline,
            "SELECT metric, (extract(epoch FROM ts) * 1000)::bigint, score FROM anomalies "
            "WHERE device_id = %s AND reason = 'inconsistent' ORDER BY ts LIMIT 1",
            (station.device_id,),
        ),
        what="the inconsistent anomaly",
    )
    assert metric == "pm25" and score >= 0.3
    assert 0 <= ts_ms - (start + drift_from * step) <= 60 * MINUTE
    warnings = [a for a in _alerts(pipeline, station.device_id) if a[1] == "inconsistent"]
    assert len(warnings) == 1 and warnings[0][2] == "warning" and "pm10" in warnings[0][6], warnings
