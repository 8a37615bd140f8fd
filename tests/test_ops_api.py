"""The ops API against the real stack: access and city scope, the Smart Environment and Smart Living
views, alerts, the audit log and the live feed.

Two fresh cities per run: `city_a` gets a full set of devices fed over MQTT; `city_b` one station.
Users are real accounts with real tokens; every answer comes from what the processor stored.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import time
from dataclasses import dataclass

import httpx
import psycopg
import pytest
import websockets

from kota.registry import Device
from kota.settings import StackSettings
from ops_api import accounts
from tests.helpers import PASSWORDS, provision, send, unique_id, wait_for

pytestmark = pytest.mark.stack


@dataclass
class World:
    stack: StackSettings
    city_a: str
    city_b: str
    devices: dict[str, Device]
    tokens: dict[str, str]  # role name in this test → token

    def client(self, who: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.stack.api_url, timeout=15, headers=headers)


def _seed_hourly(conn: psycopg.Connection, device_id: str, metric: str, bucket: dt.datetime, mean: float) -> None:
    """History older than the processor's lateness limit cannot come over MQTT: seed the hourly rollup."""
    conn.execute(
        "INSERT INTO agg_1h (device_id, metric, bucket, n, sum, sum_sq, min, max, first_ts, first_value, "
        "last_ts, last_value) VALUES (%s, %s, %s, 60, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (device_id, metric, bucket, mean * 60, mean * mean * 60, mean, mean, bucket, mean, bucket, mean),
    )


@pytest.fixture(scope="module")
def world(pipeline: StackSettings) -> World:
    city_a, city_b = unique_id("kota-a"), unique_id("kota-b")
    kinds = {
        "air": ("air_quality", "coblong"),
        "gate": ("water_level", "regol"),
        "noise": ("noise", "coblong"),
        "road": ("traffic_corridor", "coblong"),
        "meter": ("water_meter", "regol"),
        "meter_usual": ("water_meter", "regol"),
        "lamp_fault": ("street_light", "coblong"),
        "lamp_off": ("street_light", "coblong"),
    }
    devices = {
        name: provision(pipeline, device_type, city=city_a, district=district, lat=-6.9, lon=107.6)
        for name, (device_type, district) in kinds.items()
    }
    devices["air_b"] = provision(pipeline, "air_quality", city=city_b, district="kota-lama", lat=-7.0, lon=110.4)

    now = int(time.time() * 1000)
    hour = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    with psycopg.connect(pipeline.postgres_dsn) as conn:
        for weeks, speed in ((1, 50.0), (2, 40.0)):
            _seed_hourly(
                conn, devices["road"].device_id, "averageVehicleSpeed", hour - dt.timedelta(weeks=weeks), speed
            )
        for days in (1, 2):
            _seed_hourly(conn, devices["meter"].device_id, "waterConsumption", hour - dt.timedelta(days=days), 0.6)
            _seed_hourly(
                conn, devices["meter_usual"].device_id, "waterConsumption", hour - dt.timedelta(days=days), 1.0
            )
        users = {
            "operator_a": accounts.User(unique_id("op-a"), "operator", (city_a,)),
            "integrator_a": accounts.User(unique_id("int-a"), "integrator", (city_a,)),
            "operator_b": accounts.User(unique_id("op-b"), "operator", (city_b,)),
            "province": accounts.User(unique_id("prov"), "operator", (city_a, city_b)),
            "admin": accounts.User(unique_id("admin"), "admin", ()),
        }
        tokens = {}
        for name, user in users.items():
            accounts.upsert_user(conn, user, actor="tests")
            tokens[name] = accounts.issue_token(conn, user.user_id, actor="tests")

    send(
        pipeline,
        devices["air"],
        [{"ts": now - 60_000, "values": {"pm25": 100.0}}, {"ts": now, "values": {"pm25": 100.0}}],
    )
    send(pipeline, devices["air_b"], {"ts": now, "values": {"pm25": 10.0}})
    send(pipeline, devices["gate"], {"ts": now, "values": {"currentLevel": 160.0}})
    send(pipeline, devices["noise"], {"ts": now, "values": {"LAeq": 70.0, "LAmax": 82.0}})
    send(
        pipeline,
        devices["road"],
        {"ts": now, "values": {"averageVehicleSpeed": 20.0, "occupancy": 0.6, "intensity": 30.0}},
    )
    # Three hours of flow that never drops below 1.2 m3/h: a leak where the meter usually gets down to
    # 0.6 at these hours, but ordinary where it usually gets down to 1.0 (a building that never sleeps).
    for meter in ("meter", "meter_usual"):
        send(
            pipeline,
            devices[meter],
            [{"ts": now - i * 60_000, "values": {"waterConsumption": 1.2}} for i in range(180)],
        )
    send(pipeline, devices["lamp_fault"], {"ts": now, "values": {"powerState": 1, "powerConsumption": 0.0}})
    send(pipeline, devices["lamp_off"], {"ts": now, "values": {"powerState": 0, "powerConsumption": 0.0}})

    w = World(pipeline, city_a, city_b, devices, tokens)
    with w.client("admin") as admin:
        for meter in ("meter", "meter_usual"):
            wait_for(
                lambda m=meter: (
                    len(
                        admin.get(
                            f"/api/v1/devices/{devices[m].device_id}/series",
                            params={
                                "metric": "waterConsumption",
                                "resolution": "raw",
                                "start": _iso(now - 4 * 3_600_000),
                            },
                        ).json()["points"]
                    )
                    == 180
                ),
                what=f"the {meter}'s three hours stored",
            )
        for name in ("air", "gate", "noise", "road", "lamp_fault", "lamp_off", "air_b"):
            wait_for(
                lambda n=name: admin.get(f"/api/v1/devices/{devices[n].device_id}/latest").json()["values"],
                what=f"{name} stored",
            )
        wait_for(
            lambda: admin.get("/api/v1/alerts", params={"city": city_a, "state": "open"}).json()["alerts"],
            what="alerts raised in city A",
        )
    return w


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat()


# -- access --------------------------------------------------------------------------------------
def _alert_of(world: World, alert_type: str) -> dict:
    with world.client("admin") as admin:
        alerts = admin.get("/api/v1/alerts", params={"city": world.city_a, "state": "open"}).json()["alerts"]
    return next(a for a in alerts if a["alert_type"] == alert_type)


def _endpoints(world: World) -> list[tuple[str, str]]:
    air = world.devices["air"].device_id
    alert_id = _alert_of(world, "flood_siaga")["alert_id"]
    return [
        ("GET", "/api/v1/me"),
        ("GET", "/api/v1/cities"),
        ("GET", f"/api/v1/cities/{world.city_a}/environment"),
        ("GET", f"/api/v1/cities/{world.city_a}/living"),
        ("GET", "/api/v1/province"),
        ("GET", "/api/v1/devices"),
        ("GET", f"/api/v1/devices/{air}"),
        ("GET", f"/api/v1/devices/{air}/latest"),
        ("GET", f"/api/v1/devices/{air}/series?metric=pm25"),
        ("GET", f"/api/v1/devices/{air}/rejections"),
        ("POST", "/api/v1/devices"),
        ("PATCH", f"/api/v1/devices/{air}"),
        ("GET", "/api/v1/alerts"),
        ("GET", f"/api/v1/alerts/{alert_id}"),
        ("POST", f"/api/v1/alerts/{alert_id}/acknowledge"),
        ("POST", f"/api/v1/alerts/{alert_id}/clear"),
        ("GET", "/api/v1/audit"),
        ("GET", "/api/v1/live/sse"),
    ]


def test_every_endpoint_answers_401_without_a_token_or_with_a_wrong_one(world):
    endpoints = _endpoints(world)
    with world.client(None) as anonymous:
        for method, path in endpoints:
            response = anonymous.request(method, path, json={})
            assert response.status_code == 401, (method, path, response.text)
            assert response.json() == {"detail": "missing bearer token"}
            assert response.headers["www-authenticate"] == "Bearer"
            for token in ("kota_nothere_abc", "not-a-token", world.tokens["admin"] + "x"):
                wrong = anonymous.request(method, path, json={}, headers={"Authorization": f"Bearer {token}"})
                assert wrong.status_code == 401, (method, path, token)
                assert wrong.json() == {"detail": "invalid or revoked token"}


def test_another_citys_data_answers_404_as_if_it_did_not_exist(world):
    air_a = world.devices["air"].device_id
    alert_id = _alert_of(world, "flood_siaga")["alert_id"]
    with world.client("operator_b") as op_b:
        for path, detail in (
            (f"/api/v1/devices/{air_a}", "device not found"),
            (f"/api/v1/devices/{air_a}/latest", "device not found"),
            (f"/api/v1/devices/{air_a}/series?metric=pm25", "device not found"),
            (f"/api/v1/devices/{air_a}/rejections", "device not found"),
            (f"/api/v1/cities/{world.city_a}/environment", "city not found"),
            (f"/api/v1/cities/{world.city_a}/living", "city not found"),
            (f"/api/v1/alerts/{alert_id}", "alert not found"),
            ("/api/v1/devices/no-such-device", "device not found"),
            ("/api/v1/alerts/999999999", "alert not found"),
        ):
            response = op_b.get(path)
            assert (response.status_code, response.json()) == (404, {"detail": detail}), path
        for action in ("acknowledge", "clear"):
            response = op_b.post(f"/api/v1/alerts/{alert_id}/{action}", json={"comment": "not mine"})
            assert (response.status_code, response.json()["detail"]) == (404, "alert not found")
        assert op_b.get("/api/v1/devices", params={"city": world.city_a}).status_code == 404

        # Lists only ever hold the caller's cities.
        features = op_b.get("/api/v1/devices").json()["features"]
        assert {f["properties"]["city"] for f in features} == {world.city_b}
        assert [c["city"] for c in op_b.get("/api/v1/cities").json()] == [world.city_b]
        assert all(a["city"] == world.city_b for a in op_b.get("/api/v1/alerts").json()["alerts"])
        assert [c["city"] for c in op_b.get("/api/v1/province").json()["cities"]] == [world.city_b]
        assert op_b.get("/api/v1/me").json() == {
            "user_id": op_b.get("/api/v1/me").json()["user_id"],
            "role": "operator",
            "cities": [world.city_b],
        }
    with world.client("admin") as admin:
        assert {world.city_a, world.city_b} <= {c["city"] for c in admin.get("/api/v1/cities").json()}
        assert admin.get(f"/api/v1/devices/{air_a}").status_code == 200
        assert admin.get("/api/v1/cities/no-such-city/environment").json() == {"detail": "city not found"}


def test_roles_answer_403_with_a_stable_detail(world):
    alert_id = _alert_of(world, "flood_siaga")["alert_id"]
    new = {"device_id": unique_id("noise"), "city": world.city_a, "device_type": "noise"}
    with world.client("integrator_a") as integrator:
        response = integrator.post(f"/api/v1/alerts/{alert_id}/acknowledge", json={})
        assert (response.status_code, response.json()) == (
            403,
            {"detail": "role integrator may not acknowledge alerts"},
        )
        response = integrator.post(f"/api/v1/alerts/{alert_id}/clear", json={})
        assert (response.status_code, response.json()) == (403, {"detail": "role integrator may not clear alerts"})
        assert integrator.get("/api/v1/audit").json() == {"detail": "role integrator may not read the audit log"}
    with world.client("operator_a") as operator:
        response = operator.post("/api/v1/devices", json=new)
        assert (response.status_code, response.json()) == (403, {"detail": "role operator may not manage devices"})
        response = operator.patch(f"/api/v1/devices/{world.devices['air'].device_id}", json={"enabled": False})
        assert (response.status_code, response.json()) == (403, {"detail": "role operator may not manage devices"})


def test_an_integrator_manages_devices_of_their_city_only_and_each_change_is_audited(world):
    device_id = unique_id("noise")
    with world.client("integrator_a") as integrator:
        outside = integrator.post(
            "/api/v1/devices", json={"device_id": device_id, "city": world.city_b, "device_type": "noise"}
        )
        assert (outside.status_code, outside.json()) == (404, {"detail": "city not found"})
        created = integrator.post(
            "/api/v1/devices",
            json={
                "device_id": device_id,
                "city": world.city_a,
                "device_type": "noise",
                "district": "coblong",
                "lat": -6.88,
                "lon": 107.61,
            },
        )
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["device"]["metrics"]["LAeq"] == {"unit": "dB", "low": 0.0, "high": 160.0}
        assert body["device"]["status"] == "offline"
        assert (
            integrator.post(
                "/api/v1/devices", json={"device_id": device_id, "city": world.city_a, "device_type": "noise"}
            ).status_code
            == 409
        )
        changed = integrator.patch(f"/api/v1/devices/{device_id}", json={"enabled": False, "district": "regol"})
        assert (changed.json()["enabled"], changed.json()["district"]) == (False, "regol")
    # The device's new MQTT account works at once (the broker was reloaded), then closes when disabled.
    device = Device(device_id, world.city_a, "environment", "noise")
    with world.client("integrator_a") as integrator:
        integrator.patch(f"/api/v1/devices/{device_id}", json={"enabled": True})
    PASSWORDS[device_id] = body["mqtt_password"]
    send(world.stack, device, {"LAeq": 51.0})
    with world.client("operator_a") as operator:
        wait_for(lambda: operator.get(f"/api/v1/devices/{device_id}/latest").json()["values"], what="new device")
        audit = operator.get("/api/v1/audit", params={"city": world.city_a}).json()["entries"]
    mine = [(e["action"], e["target_id"]) for e in audit if e["target_id"] == device_id]
    assert mine == [("device.changed", device_id), ("device.changed", device_id), ("device.created", device_id)]
    assert all(e["actor"].startswith("int-a-") for e in audit if e["target_id"] == device_id)


# -- views ---------------------------------------------------------------------------------------
def test_an_integrator_sees_why_their_devices_messages_were_refused(world):
    """What `kota deadletters --device` shows, for whoever holds a token of the device's city: the
    device's dead letters, newest first, with their reasons counted and what to fix."""
    air, gate = world.devices["air"], world.devices["gate"]
    send(world.stack, air, {"pm25": -4, "pm10": 40, "rainbow": 1})
    send(world.stack, air, b"\x1b[2J not json")
    with world.client("integrator_a") as integrator:

        def letters() -> list[dict]:
            return integrator.get(f"/api/v1/devices/{air.device_id}/rejections").json()["dead_letters"]

        newest, older = wait_for(lambda: (got := letters()) and len(got) >= 2 and got, what="two dead letters")[:2]
        assert newest["reasons"] == {"malformed_json": 1}
        assert base64.b64decode(newest["payload_start_b64"]) == b"\x1b[2J not json"
        assert older["reasons"] == {"out_of_range": 1, "unknown_metric": 1}
        assert older["topic"] == f"kota/{world.city_a}/environment/{air.device_id}/telemetry"
        assert any("pm25 = -4 is outside" in r["message"] for r in older["rejections"])
        # A device with nothing refused has an empty list, from a reader that has caught up;
        # another city's device does not exist.
        assert integrator.get(f"/api/v1/devices/{gate.device_id}/rejections").json() == {
            "device_id": gate.device_id,
            "reader": "live",
            "dead_letters": [],
        }
        assert integrator.get(f"/api/v1/devices/{world.devices['air_b'].device_id}/rejections").status_code == 404


def test_devices_are_a_geojson_map_with_status_latest_values_and_ispu(world):
    with world.client("operator_a") as operator:
        collection = operator.get("/api/v1/devices", params={"city": world.city_a}).json()
    assert collection["type"] == "FeatureCollection"
    by_id = {f["id"]: f for f in collection["features"]}
    air = by_id[world.devices["air"].device_id]
    assert air["geometry"] == {"type": "Point", "coordinates": [107.6, -6.9]}
    assert air["properties"]["status"] == "online"
    assert air["properties"]["latest"]["pm25"]["value"] == 100.0
    assert air["properties"]["ispu"]["category"] == "Tidak Sehat"
    assert by_id[world.devices["gate"].device_id]["properties"]["ispu"] is None
    with world.client("operator_a") as operator:
        detail = operator.get(f"/api/v1/devices/{world.devices['gate'].device_id}").json()
    assert detail["metrics"]["currentLevel"]["unit"] == "cm"
    assert detail["open_alerts"] >= 1
    assert [v["value"] for v in detail["latest"]] == [160.0]


def test_smart_environment_ispu_noise_and_water_levels(world):
    with world.client("operator_a") as operator:
        env = operator.get(f"/api/v1/cities/{world.city_a}/environment").json()
        district = operator.get(f"/api/v1/cities/{world.city_a}/environment", params={"district": "regol"}).json()
    [station] = env["air_quality"]
    # pm25 100 µg/m3 over the window: band 55.4-150.4 → ISPU 101-200.
    assert station["ispu"] == {
        "value": 147,
        "display": "147",
        "category": "Tidak Sehat",
        "category_en": "Unhealthy",
        "colour": "kuning",
        "hex": "#f2c200",
    }
    assert station["critical"] == "pm25"
    noise = next(n for n in env["noise"] if n["device_id"] == world.devices["noise"].device_id)
    assert env["noise"][0] == noise  # loudest first
    assert (noise["laeq"], noise["limit_dba"], noise["exceeds_limit"], noise["excess_db"]) == (70.0, 55.0, True, 15.0)
    assert noise["laeq_1h"] == pytest.approx(70.0)
    [gate] = env["water_levels"]
    assert (gate["level_cm"], gate["siaga"], gate["siaga2_cm"]) == (160.0, 2, 150.0)
    assert gate["siaga_label"].startswith("Siaga 2")
    assert district["air_quality"] == [] and len(district["water_levels"]) == 1


def test_smart_living_traffic_utilities_and_street_lighting(world):
    with world.client("operator_a") as operator:
        living = operator.get(f"/api/v1/cities/{world.city_a}/living").json()
    [road] = living["traffic"]
    # Usual for this hour and weekday: the seeded 50 and 40 km/h a week and two weeks ago.
    assert road["usual_speed_kmh"] == pytest.approx(45.0)
    assert road["usual_hours"] == 2
    assert road["free_flow_kmh"] == pytest.approx(49.5)  # 95th percentile of the hourly means
    assert road["congestion_index"] == pytest.approx(1 - 20 / 49.5, abs=1e-3)
    assert road["speed_vs_usual_pct"] == pytest.approx(-55.6)
    assert road["congested"] is True
    meters = {m["device_id"]: m for m in living["utilities"]}
    meter, usual = meters[world.devices["meter"].device_id], meters[world.devices["meter_usual"].device_id]
    assert meter["suspected_leak"] is True
    assert (meter["leak_window_min_flow"], meter["leak_usual_min_flow"], meter["leak_history_days"]) == (1.2, 0.6, 2)
    assert meter["last_hour_mean"] == pytest.approx(1.2)
    assert meter["baseline_mean"] == pytest.approx(0.6)
    assert meter["vs_baseline_pct"] == pytest.approx(100.0)
    # The same flow where the meter usually gets no lower than 1.0: within the 0.5 m3/h margin.
    assert (usual["suspected_leak"], usual["leak_usual_min_flow"]) == (False, 1.0)
    assert living["street_lighting"] == [
        {"district": "coblong", "total": 2, "on": 0, "off": 1, "fault": 1, "offline": 0}
    ]


def test_province_view_sets_the_cities_side_by_side(world):
    with world.client("province") as province:
        cities = {c["city"]: c for c in province.get("/api/v1/province").json()["cities"]}
    assert set(cities) == {world.city_a, world.city_b}
    a, b = cities[world.city_a], cities[world.city_b]
    assert (a["worst_ispu"]["category"], b["worst_ispu"]["category"]) == ("Tidak Sehat", "Baik")
    assert a["worst_ispu"]["device_id"] == world.devices["air"].device_id
    assert (a["gates_at_siaga"], a["worst_siaga"], b["gates_at_siaga"]) == (1, 2, 0)
    assert a["open_alerts"]["major"] >= 1 and a["open_alerts"]["minor"] >= 1  # Siaga 2; Tidak Sehat
    assert sum(b["open_alerts"].values()) == 0
    assert a["devices"] >= len(world.devices) - 1 and (b["devices"], b["devices_offline"]) == (1, 0)


def test_series_pages_through_raw_and_minute_resolution(world):
    meter = world.devices["meter"].device_id
    start = _iso(int(time.time() * 1000) - 4 * 3_600_000)
    with world.client("operator_a") as operator:
        first = operator.get(
            f"/api/v1/devices/{meter}/series",
            params={"metric": "waterConsumption", "resolution": "1m", "start": start, "limit": 100},
        ).json()
        second = operator.get(
            f"/api/v1/devices/{meter}/series",
            params={"metric": "waterConsumption", "resolution": "1m", "start": first["next_start"], "limit": 100},
        ).json()
        hourly = operator.get(
            f"/api/v1/devices/{meter}/series",
            params={
                "metric": "waterConsumption",
                "resolution": "1h",
                "start": _iso(int(time.time() * 1000) - 3 * 86_400_000),
            },
        ).json()
        bad = operator.get(
            f"/api/v1/devices/{meter}/series",
            params={"metric": "waterConsumption", "start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"},
        )
    assert len(first["points"]) == 100 and first["next_start"] is not None
    assert len(second["points"]) == 80 and second["next_start"] is None
    assert first["points"][-1]["ts"] < second["points"][0]["ts"]
    assert all(p["mean"] == 1.2 and p["count"] == 1 for p in first["points"] + second["points"])
    assert [p["mean"] for p in hourly["points"]][:2] == [0.6, 0.6]  # the seeded days
    assert (bad.status_code, bad.json()) == (422, {"detail": "start must be before end"})


# -- alerts --------------------------------------------------------------------------------------
def test_alerts_filter_acknowledge_and_clear_with_history_and_audit(world):
    with world.client("operator_a") as operator:
        listed = operator.get(
            "/api/v1/alerts",
            params={"city": world.city_a, "domain": "environment", "severity": "major", "state": "active"},
        ).json()["alerts"]
        gate_alert = next(a for a in listed if a["alert_type"] == "flood_siaga")
        assert gate_alert["device_id"] == world.devices["gate"].device_id and gate_alert["district"] == "regol"
        assert (
            operator.get("/api/v1/alerts", params={"city": world.city_a, "severity": "critical"}).json()["alerts"] == []
        )
        page = operator.get("/api/v1/alerts", params={"city": world.city_a, "limit": 1}).json()
        assert len(page["alerts"]) == 1 and page["next_before_id"] == page["alerts"][0]["alert_id"]

        alert_id = gate_alert["alert_id"]
        acked = operator.post(f"/api/v1/alerts/{alert_id}/acknowledge", json={"comment": "petugas di lokasi"})
        assert acked.status_code == 200, acked.text
        assert acked.json()["state"] == "acknowledged"
        again = operator.post(f"/api/v1/alerts/{alert_id}/acknowledge", json={})
        assert (again.status_code, again.json()) == (409, {"detail": "alert is already acknowledged"})
        cleared = operator.post(f"/api/v1/alerts/{alert_id}/clear", json={"comment": "air surut"}).json()
        detail = operator.get(f"/api/v1/alerts/{alert_id}").json()
        audit = operator.get("/api/v1/audit", params={"city": world.city_a}).json()["entries"]
    me = acked.json()["acknowledged_by"]
    assert cleared["state"] == "cleared" and cleared["cleared_by"] == me
    assert [(h["action"], h["actor"], h["comment"]) for h in detail["history"]] == [
        ("raised", "kota-processor", detail["history"][0]["comment"]),
        ("acknowledged", me, "petugas di lokasi"),
        ("cleared", me, "air surut"),
    ]
    actions = [(e["action"], e["actor"], e["details"]["comment"]) for e in audit if e["target_id"] == str(alert_id)]
    assert actions == [("alert.clear", me, "air surut"), ("alert.acknowledge", me, "petugas di lokasi")]


# -- live feed -----------------------------------------------------------------------------------
def _ws_url(world: World, who: str, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"token": world.tokens[who], **params}.items())
    return f"ws://127.0.0.1:{world.stack.api_port}/api/v1/live?{query}"


async def _next_event(ws: websockets.ClientConnection, kind: str, timeout_s: float = 20) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
        for event in frame:
            if event["type"] == kind:
                return event


async def test_websocket_feed_carries_readings_of_the_callers_cities_only(world):
    async with (
        websockets.connect(_ws_url(world, "operator_b")) as ws_b,
        websockets.connect(_ws_url(world, "operator_a", city=world.city_a)) as ws_a,
    ):
        await asyncio.sleep(1.0)  # the hub reads Kafka from its end: let the subscriptions settle
        await asyncio.to_thread(send, world.stack, world.devices["noise"], {"LAeq": 61.5, "LAmax": 70.0})
        await asyncio.to_thread(send, world.stack, world.devices["air_b"], {"pm25": 12.5})
        event_a = await _next_event(ws_a, "readings")
        event_b = await _next_event(ws_b, "readings")
    assert event_a["device_id"] == world.devices["noise"].device_id
    assert {r["metric"]: r["value"] for r in event_a["readings"]} == {"LAeq": 61.5, "LAmax": 70.0}
    assert event_b["device_id"] == world.devices["air_b"].device_id  # never city A's reading, sent first


async def test_websocket_refuses_a_city_outside_scope_and_a_missing_token(world):
    async with websockets.connect(_ws_url(world, "operator_b", city=world.city_a)) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4404, "city not found")
    async with websockets.connect(f"ws://127.0.0.1:{world.stack.api_port}/api/v1/live") as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4401, "missing bearer token")


async def test_server_sent_events_carry_alert_changes(world):
    alert_id = _alert_of(world, "air_quality_unhealthy")["alert_id"]
    headers = {"Authorization": f"Bearer {world.tokens['operator_a']}"}
    async with httpx.AsyncClient(base_url=world.stack.api_url, headers=headers, timeout=20) as client:
        async with client.stream("GET", "/api/v1/live/sse", params={"type": "alert"}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            assert await anext(lines) == ": connected"
            async with httpx.AsyncClient(base_url=world.stack.api_url, headers=headers) as other:
                acked = await other.post(f"/api/v1/alerts/{alert_id}/acknowledge", json={"comment": "dicek"})
                assert acked.status_code == 200
            while not (line := await asyncio.wait_for(anext(lines), 20)).startswith("data: "):
                pass
    event = json.loads(line.removeprefix("data: "))
    assert (event["type"], event["alert_id"], event["action"], event["comment"]) == (
        "alert",
        alert_id,
        "acknowledged",
        "dicek",
    )
    assert event["actor"] == acked.json()["acknowledged_by"]


def test_health_reports_lag_throughput_and_prometheus_metrics(world):
    # Signed in: the details (anyone else gets only ok or degraded); /metrics: admins only.
    with world.client("operator_a") as client:
        health = wait_for(
            lambda: (h := client.get("/health").json())["processor"]["readings_per_s"] is not None and h,
            what="a throughput sample",
        )
    with world.client("admin") as client:
        metrics = client.get("/metrics").text
    assert health["processor"]["consumer_lag"] is not None and health["processor"]["consumer_lag"] >= 0
    assert set(health["processor"]["lag_by_partition"]) == {str(p) for p in range(world.stack.kafka_partitions)}
    assert health["last_reading_at"] is not None
    assert "kota_api_request_seconds_bucket" in metrics and "kota_api_live_clients" in metrics
