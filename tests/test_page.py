"""The command-centre page in headless Chromium (Debian's, driven by Playwright) against the real stack:
it signs in with a token, draws the map, shows live values changing, and acknowledges an alert."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from playwright.sync_api import expect, sync_playwright

from deploy import install
from kota.settings import PROJECT_ROOT
from ops_api import accounts
from tests.helpers import provision, record_page_errors, send, unique_id, wait_for

pytestmark = pytest.mark.stack
SCREENSHOTS = PROJECT_ROOT / "test-output"


def test_operator_sees_map_live_values_and_acknowledges_an_alert(pipeline):
    chromium = install.ensure_chromium(print)
    city = unique_id("kota-page")
    gate = provision(pipeline, "water_level", city=city, district="regol", lat=-6.93, lon=107.60)
    air = provision(pipeline, "air_quality", city=city, district="coblong", lat=-6.89, lon=107.61)
    with psycopg.connect(pipeline.postgres_dsn) as conn:
        user = accounts.User(unique_id("op"), "operator", (city,))
        accounts.upsert_user(conn, user, actor="tests")
        token = accounts.issue_token(conn, user.user_id, actor="tests")

    def send_now(device, values: dict) -> None:
        send(pipeline, device, {"ts": int(time.time() * 1000), "values": values})

    send_now(air, {"pm25": 30.0})
    send_now(gate, {"currentLevel": 170.0})  # Siaga 2: an alert to acknowledge
    with psycopg.connect(pipeline.postgres_dsn) as conn:
        wait_for(
            lambda: conn.execute(
                "SELECT 1 FROM alerts WHERE device_id = %s AND state = 'active'", (gate.device_id,)
            ).fetchone(),
            what="the gate's alert",
        )

    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        record_page_errors(page, errors)
        page.goto(f"{pipeline.api_url}/#token={token}")

        expect(page.locator("#live-status")).to_have_class("ok", timeout=15_000)
        expect(page.locator("#device-count")).to_contain_text("2")
        expect(page.locator("#health span.ok").first).to_be_visible(timeout=10_000)  # signed in: the details
        assert "token=" not in page.url  # the token does not stay in the address bar
        assert page.evaluate("window.kotaMap.devices.size") == 2
        drawn = int(page.locator("#map").get_attribute("data-drawn"))
        assert drawn >= 1
        # The map really has coloured points on it, not just a background.
        coloured = page.evaluate("""() => { const c = document.getElementById('map');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i + 1] > 150 && d[i] < 100) n++; return n; }""")
        assert coloured > 20
        # A station at Berbahaya is drawn black: ringed in light, or it vanishes into the dark map.
        ringed = page.evaluate("""async () => {
            const { CityMap } = await import('./map.js');
            const canvas = document.createElement('canvas'); canvas.width = 200; canvas.height = 200;
            const map = new CityMap(canvas);
            map.setDevices([{ id: 'x', geometry: { coordinates: [107.6, -6.9] },
                              properties: { status: 'online', ispu: { hex: '#111111' } } }]);
            map.setColourBy('ispu'); map.draw();
            const d = canvas.getContext('2d').getImageData(0, 0, 200, 200).data; let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i] > 150 && d[i + 1] > 150 && d[i + 2] > 150) n++;
            return n; }""")
        assert ringed > 10

        gate_level = page.locator(f'td[data-device="{gate.device_id}"][data-metric="currentLevel"]')
        expect(gate_level).to_have_text("170 cm")
        send_now(gate, {"currentLevel": 182.0})  # arrives over the live feed, no reload
        expect(gate_level).to_have_text("182 cm", timeout=15_000)
        # It came over the feed, not with a refresh: the socket opens only once the API's Kafka
        # reader has its place at the end of the stream, so "connected" means live.
        expect(page.locator("#live-count")).not_to_have_text("0", timeout=10_000)

        alert_row = page.locator("#alerts li", has_text=gate.device_id).first
        expect(alert_row).to_contain_text("flood_siaga")
        alert_row.locator("button.ack").click()
        acknowledged = page.locator("#alerts li.acknowledged", has_text=gate.device_id)
        expect(acknowledged).to_have_count(1, timeout=10_000)
        # The list refreshes every 10 s but is drawn again only when it changes: a row stays the
        # same node, so a click never falls between an old list and a new one.
        acknowledged.evaluate("row => { row.dataset.seen = 'yes'; }")
        for _ in range(2):  # after the second answer, the first has certainly been drawn
            with page.expect_response(lambda r: "/api/v1/alerts?" in r.url, timeout=15_000):
                pass
        expect(page.locator("#alerts li.acknowledged[data-seen=yes]")).to_have_count(1)

        page.locator("#colour-by").select_option("ispu")
        page.locator("#lang").click()
        expect(page.locator("h2", has_text="Water levels")).to_be_visible()
        shot = SCREENSHOTS / "command-centre.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert not errors, errors
    assert Path(shot).stat().st_size > 10_000
    with psycopg.connect(pipeline.postgres_dsn) as conn:
        by = conn.execute(
            "SELECT acknowledged_by FROM alerts WHERE device_id = %s AND alert_type = 'flood_siaga'", (gate.device_id,)
        ).fetchone()
    assert by == (user.user_id,)
