"""The page's device commands panel in headless Chromium against the real stack: an operator dims a
street light from the page, the device (a real MQTT client) answers, and the page shows it succeeded;
a critical command waits there for a second operator, who approves it from the page."""

from __future__ import annotations

import psycopg
import pytest
from playwright.sync_api import expect, sync_playwright

from deploy import install
from ops_api import accounts
from tests.helpers import provision, record_page_errors, unique_id, wait_for
from tests.test_commands_stack import FakeDevice

pytestmark = pytest.mark.stack


def _operator(pipeline, city: str) -> str:
    with psycopg.connect(pipeline.postgres_dsn) as conn:
        user = accounts.User(unique_id("op"), "operator", (city,))
        accounts.upsert_user(conn, user, actor="tests")
        return accounts.issue_token(conn, user.user_id, actor="tests")


def test_an_operator_commands_a_light_and_approves_a_siren_from_the_page(pipeline):
    chromium = install.ensure_chromium(print)
    city = unique_id("kota-cmd-page")
    light = provision(pipeline, "street_light", city=city, lat=-6.90, lon=107.61)
    siren = provision(pipeline, "flood_siren", city=city, lat=-6.93, lon=107.60)
    first, second = _operator(pipeline, city), _operator(pipeline, city)
    device = FakeDevice(pipeline, light)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
            errors: list[str] = []
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            record_page_errors(page, errors)
            page.goto(f"{pipeline.api_url}/#token={first}")
            panel = page.locator("#commands-panel")
            panel.locator("#command-device").select_option(light.device_id)
            panel.locator('input[data-param="level"]').fill("30")
            # The panel looks again every 3 s; what an operator is typing must outlive that. After
            # the second answer has arrived the first has certainly been drawn.
            for _ in range(2):
                with page.expect_response(lambda r: "/commands?limit=" in r.url, timeout=10_000):
                    pass
            expect(panel.locator('input[data-param="level"]')).to_have_value("30")
            panel.locator('button[data-command="dim"]').click()
            wait_for(lambda: device.received, what="the light's command from the page")
            command = device.received[0][1]
            assert (command["command"], command["params"]) == ("dim", {"level": 30})
            device.reply(command["id"], "succeeded", result={"level": 30})
            # The panel looks again every few seconds: the device's answer shows without a click.
            row = panel.locator(f'li[data-command-id="{command["id"]}"]')
            expect(row).to_have_attribute("data-status", "succeeded", timeout=30_000)
            # A critical command: asked by the first operator, refused to them, approved by the second.
            panel.locator("#command-device").select_option(siren.device_id)
            panel.locator('button[data-command="sound"]').click()
            pending = panel.locator('li[data-status="awaiting_approval"]')
            expect(pending).to_have_count(1, timeout=10_000)
            pending.locator("button.command-approve").click()
            expect(panel.locator("#command-message")).to_contain_text("own_command", timeout=10_000)
            other = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            other.on("pageerror", lambda exc: errors.append(str(exc)))
            other.goto(f"{pipeline.api_url}/#token={second}")
            second_panel = other.locator("#commands-panel")
            second_panel.locator("#command-device").select_option(siren.device_id)
            approve = second_panel.locator('li[data-status="awaiting_approval"] button.command-approve')
            expect(approve).to_have_count(1, timeout=10_000)
            # Drawn once, the button stays the same node across refreshes, and when another command
            # comes into the list: a click cannot fall between an old list and a new one.
            approve.evaluate("button => { button.dataset.seen = 'yes'; }")
            for _ in range(2):
                with other.expect_response(lambda r: "/commands?limit=" in r.url, timeout=10_000):
                    pass
            panel.locator('button[data-command="sound"]').click()  # the first operator asks again
            pending = second_panel.locator('li[data-status="awaiting_approval"]')
            expect(pending).to_have_count(2, timeout=10_000)
            marked = second_panel.locator("button.command-approve[data-seen=yes]")
            expect(marked).to_have_count(1)
            marked.click()
            expect(pending).to_have_count(1, timeout=10_000)
            expect(second_panel.locator("#command-message")).to_have_text("")
            browser.close()
        assert errors == []
        with psycopg.connect(pipeline.postgres_dsn) as conn:
            commands = conn.execute(
                "SELECT requested_by, approved_by, status FROM device_commands WHERE device_id = %s "
                "ORDER BY created_at",
                (siren.device_id,),
            ).fetchall()
        (asked, approved, _), (_, still_unapproved, status) = commands
        assert asked != approved and approved is not None  # the first, marked and clicked, was approved
        assert (still_unapproved, status) == (None, "awaiting_approval")
    finally:
        device.close()
