"""Fixtures that start (or reuse) the real local stack once per test session.

The test stack has its own state folder (.kota-test/, or KOTA_TEST_STATE_DIR) and ports shifted by
KOTA_TEST_PORT_OFFSET (default 100), so it runs beside a developer's `kota up` without touching its
data, and several test stacks can run side by side.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from deploy import components, mosquitto, mqtt_access, procs
from deploy.stack import start_services, stop_services
from kota.schema import migrate
from kota.settings import PROJECT_ROOT, StackSettings
from ops_api import accounts

PIPELINE = ("gateway", "processor", "api", "notifier", "commander")


@pytest.fixture(scope="session")
def stack() -> Iterator[StackSettings]:
    settings = StackSettings(
        state_dir=PROJECT_ROOT / os.environ.get("KOTA_TEST_STATE_DIR", ".kota-test"),
        port_offset=int(os.environ.get("KOTA_TEST_PORT_OFFSET", "100")),
    )
    start_services(settings, lambda message: print(f"test stack: {message}"), open_devices=False)
    migrate(settings.postgres_dsn)
    mqtt_access.sync(settings)
    yield settings
    for name in PIPELINE:
        procs.stop(settings, name)
    if os.environ.get("CI"):
        stop_services(settings, lambda message: None)


@pytest.fixture(scope="session")
def pipeline(stack: StackSettings) -> StackSettings:
    """Gateway, processor, API and notifier running as real background processes against the test stack."""
    for name in PIPELINE:
        components.start_component(stack, name)
    mosquitto.open_devices_when_ingest_subscribed(stack, print)
    procs.wait_until(lambda: components.api_healthy(stack), "api", stack, timeout_s=60)
    return stack


@pytest.fixture(scope="session")
def admin_token(stack: StackSettings) -> str:
    """A token of an admin account (every city) for tests that are not about access."""
    with psycopg.connect(stack.postgres_dsn) as conn:
        accounts.upsert_user(conn, accounts.User("test-admin", "admin", ()), actor="tests")
        return accounts.issue_token(conn, "test-admin", label="tests", actor="tests")


@pytest.fixture
def api(pipeline: StackSettings, admin_token: str) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=pipeline.api_url, timeout=10, headers={"Authorization": f"Bearer {admin_token}"}
    ) as client:
        yield client
