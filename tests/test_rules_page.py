"""The page's alert-rules editor in headless Chromium against the real stack: an operator opens the
city's rules, previews a rule over the stored data, saves it as a version and rolls it back."""

from __future__ import annotations

import json
import time

import psycopg
import pytest
from playwright.sync_api import expect, sync_playwright

from deploy import install
from ops_api import accounts
from processing.rulebook import MINUTE_MS
from tests.helpers import provision, publish_series, query, record_page_errors, unique_id, wait_for

pytestmark = pytest.mark.stack
RULE = {"id": "hot", "metric": "temperature", "value": 30, "for_s": 120, "severity": "major"}


def test_operator_previews_saves_and_rolls_back_rules_on_the_page(pipeline):
    chromium = install.ensure_chromium(print)
    city = unique_id("kota-rules-page")
    station = provision(pipeline, "air_quality", city=city, district="coblong", lat=-6.89, lon=107.61)
    with psycopg.connect(pipeline.postgres_dsn) as conn:
        user = accounts.User(unique_id("op"), "operator", (city,))
        accounts.upsert_user(conn, user, actor="tests")
        token = accounts.issue_token(conn, user.user_id, actor="tests")
    start = int(time.time() * 1000) - 2 * 3_600_000
    start -= start % MINUTE_MS
    hot = [35.0 if 5 <= m < 10 else 25.0 for m in range(15)]
    publish_series(pipeline, station, "temperature", [(start + m * MINUTE_MS, v) for m, v in enumerate(hot)])
    wait_for(
        lambda: query(pipeline, "SELECT count(*) FROM agg_1m WHERE device_id = %s", (station.device_id,))[0][0] == 15,
        timeout_s=60,
        what="the readings stored",
    )

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        record_page_errors(page, errors)
        page.goto(f"{pipeline.api_url}/#token={token}")
        expect(page.locator("#device-count")).to_contain_text("1", timeout=15_000)

        page.locator("#rules-panel summary").click()
        expect(page.locator("#rules-version")).to_contain_text("v0")
        assert json.loads(page.locator("#rules-json").input_value())["rules"] == []

        page.locator("#rules-preview-rule").fill(json.dumps(RULE))
        page.locator("#rules-preview-days").fill("1")
        page.locator("#rules-preview").click()
        # 35 for minutes 5-9: raised at minute 6 (two minutes held), cleared at minute 10.
        expect(page.locator("#rules-preview-summary")).to_contain_text("1 ", timeout=10_000)
        expect(page.locator("#rules-preview-result li")).to_have_count(1)
        expect(page.locator("#rules-preview-result li")).to_contain_text(station.device_id)

        page.locator("#rules-json").fill(json.dumps({"rules": [RULE]}))
        page.locator("#rules-comment").fill("heat on the page")
        page.locator("#rules-save").click()
        expect(page.locator("#rules-version")).to_contain_text("v1", timeout=10_000)
        expect(page.locator("#rules-version")).to_contain_text("heat on the page")

        page.locator("#rules-json").fill('{"rules": [{"id": "x", "metric": "warmth", "value": 1}]}')
        page.locator("#rules-save").click()
        expect(page.locator("#rules-message")).to_contain_text("422", timeout=10_000)
        expect(page.locator("#rules-version")).to_contain_text("v1")

        page.locator("#rules-comment").fill("undo")
        page.locator('#rules-history button[data-version="0"]').click()
        expect(page.locator("#rules-version")).to_contain_text("v2", timeout=10_000)
        browser.close()
    assert not errors, errors
    versions = query(
        pipeline, "SELECT version, author, rolled_back_to FROM rule_versions WHERE city = %s ORDER BY version", (city,)
    )
    assert versions == [(1, user.user_id, None), (2, user.user_id, 0)]
