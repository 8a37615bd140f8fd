"""The ops API's hardening against the real running API (issue 20, item 7): token expiry, revocation
and changes of access reaching REST at once and closing open live streams, tokens in URLs only on
the live feed, security headers on every answer, /metrics for admins only, /health without details
or exception text for anyone, 422s without database text, and caches that stay bounded.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import time
from pathlib import Path

import httpx
import psycopg
import pytest
import websockets
from pydantic import SecretStr

from cli.stack import ensure_demo_operator
from kota.settings import StackSettings, read_secret
from ops_api import accounts
from ops_api.api.routes.devices import SnapshotCache
from ops_api.auth import BAD_TOKEN, QUERY_TOKEN, Principal, TokenCache
from ops_api.series_cache import SeriesCache, _Kept
from tests.helpers import free_port, kota_command, run_kota, unique_id, wait_for

pytestmark = pytest.mark.stack
HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}
# PostgreSQL delivers a NOTIFY to the API's LISTEN connection a few milliseconds after the commit; a
# request sent in those milliseconds may still be served from the token cache. 0.1 s is that margin,
# a hundredth of the cache's 10 s: without the NOTIFY these tests fail.
NOTIFY_DELIVERY_S = 0.1


def _account(
    stack: StackSettings,
    role: str = "operator",
    cities: tuple[str, ...] | None = None,
    lifetime: dt.timedelta | None = accounts.DEFAULT_TOKEN_LIFETIME,
) -> tuple[accounts.User, str]:
    user = accounts.User(unique_id(role[:3]), role, cities if cities is not None else (unique_id("kota"),))
    with psycopg.connect(stack.postgres_dsn) as conn:
        accounts.upsert_user(conn, user, actor="tests")
        return user, accounts.issue_token(conn, user.user_id, actor="tests", lifetime=lifetime)


def _client(stack: StackSettings, token: str | None = None) -> httpx.Client:
    return httpx.Client(
        base_url=stack.api_url, timeout=15, headers={"Authorization": f"Bearer {token}"} if token else {}
    )


def _ws_url(stack: StackSettings, token: str, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"token": token, **params}.items())
    return f"ws://127.0.0.1:{stack.api_port}/api/v1/live?{query}"


async def _close_of(ws: websockets.ClientConnection, timeout_s: float) -> tuple[int, str]:
    """The close code and reason the server ends `ws` with, within `timeout_s` (else TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
    except websockets.ConnectionClosed as closed:
        assert closed.rcvd is not None, "closed without a close frame"
        return closed.rcvd.code, closed.rcvd.reason


async def _still_open(ws: websockets.ClientConnection, for_s: float) -> bool:
    try:
        await asyncio.wait_for(_close_of(ws, for_s + 1), for_s)
    except TimeoutError:
        return True
    return False


async def _sse_end(lines, timeout_s: float) -> dict:  # noqa: ANN001 - an async iterator of lines
    """The `event: dropped` a stream ends with, within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    event = None
    while True:
        line = await asyncio.wait_for(anext(lines), max(0.01, deadline - time.monotonic()))
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event == "dropped":
            return json.loads(line.removeprefix("data: "))


# -- token expiry --------------------------------------------------------------------------------
def test_an_expired_token_is_refused_like_a_revoked_one_even_while_cached(pipeline):
    _, token = _account(pipeline, lifetime=dt.timedelta(seconds=3))
    expires = time.time() + 3
    with _client(pipeline, token) as client:
        assert client.get("/api/v1/me").status_code == 200  # verified, and kept in the API's cache (10 s)
        while (answer := client.get("/api/v1/me")).status_code == 200:
            assert time.time() < expires + 0.1, "the token still worked after it expired"
            time.sleep(0.1)
    assert time.time() >= expires - 1.5  # refused because it expired, not before (clock slack)
    assert (answer.status_code, answer.json()) == (401, {"detail": BAD_TOKEN})
    # One made to expire in the past (the NOTIFY of the change, not the clock, reaches the cache).
    user, other = _account(pipeline)
    with _client(pipeline, other) as client:
        assert client.get("/api/v1/me").status_code == 200
        with psycopg.connect(pipeline.postgres_dsn) as conn:
            conn.execute(
                "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE user_id = %s", (user.user_id,)
            )
        time.sleep(NOTIFY_DELIVERY_S)
        assert client.get("/api/v1/me").json() == {"detail": BAD_TOKEN}


async def test_a_live_stream_closes_when_its_token_expires(pipeline):
    _, token = _account(pipeline, lifetime=dt.timedelta(seconds=3))
    async with websockets.connect(_ws_url(pipeline, token, type="alert")) as ws:
        started = time.monotonic()
        assert await _close_of(ws, 8) == (4401, BAD_TOKEN)
    assert time.monotonic() - started < 4.5


def test_kota_users_token_sets_an_expiry_and_list_shows_it(stack):
    city = unique_id("kota")
    name = unique_id("cli")
    added = run_kota(stack, "users", "add", name, "--role", "operator", "--city", city, "--expires", "never")
    assert added.returncode == 0, added.stderr
    assert "never expires" in added.stdout + added.stderr
    issued = run_kota(stack, "users", "token", name, "--expires", "2")
    assert issued.returncode == 0, issued.stderr
    with psycopg.connect(stack.postgres_dsn) as conn:
        rows = conn.execute(
            "SELECT expires_at - now() FROM api_tokens WHERE user_id = %s ORDER BY created_at", (name,)
        ).fetchall()
    assert rows[0][0] is None
    assert dt.timedelta(days=2) - dt.timedelta(minutes=1) < rows[1][0] <= dt.timedelta(days=2)
    soonest = (dt.datetime.now(dt.UTC) + rows[1][0]).strftime("%Y-%m-%d")
    [line] = [line for line in run_kota(stack, "users", "list").stdout.splitlines() if line.startswith(name + " ")]
    assert "2 token(s)" in line and f"expires {soonest}" in line, line
    default = run_kota(stack, "users", "token", name)
    assert default.returncode == 0
    with psycopg.connect(stack.postgres_dsn) as conn:
        [(lifetime,)] = conn.execute(
            "SELECT expires_at - created_at FROM api_tokens WHERE user_id = %s ORDER BY created_at DESC LIMIT 1",
            (name,),
        ).fetchall()
    assert lifetime == accounts.DEFAULT_TOKEN_LIFETIME
    for wrong in ("0", "-3", "soon"):
        refused = run_kota(stack, "users", "token", name, "--expires", wrong)
        assert refused.returncode == 2 and "--expires" in refused.stderr, (wrong, refused.stderr)


def test_kota_up_gives_the_demo_operator_a_token_that_expires_and_a_new_one_after(stack, tmp_path):
    # Another state folder for the token file; the database password stays the test stack's.
    password = SecretStr(read_secret(stack.state_dir, f"postgres-{stack.postgres_user}.password") or "")
    elsewhere = stack.model_copy(update={"state_dir": tmp_path, "postgres_password": password})
    first = ensure_demo_operator(elsewhere, "bandung")
    with psycopg.connect(stack.postgres_dsn) as conn:
        expires_at = accounts.token_expiry(conn, first)
        assert expires_at is not None
        assert expires_at - dt.datetime.now(dt.UTC) > accounts.DEFAULT_TOKEN_LIFETIME - dt.timedelta(minutes=1)
        conn.execute("UPDATE api_tokens SET expires_at = now() WHERE token_id = %s", (accounts.split_token(first)[0],))
    assert ensure_demo_operator(elsewhere, "bandung") not in ("", first)


# -- revocation and changes of access ------------------------------------------------------------
def test_a_revoked_token_is_refused_on_the_very_next_rest_call(pipeline):
    for _ in range(3):  # no luck of timing: every time
        user, token = _account(pipeline)
        with _client(pipeline, token) as client:
            for _ in range(4):  # both worker processes have it cached
                assert client.get("/api/v1/me").status_code == 200
            revoked = run_kota(pipeline, "users", "revoke", user.user_id)  # as an operator revokes
            assert revoked.returncode == 0, revoked.stderr
            answer = client.get("/api/v1/me")
        assert (answer.status_code, answer.json()) == (401, {"detail": BAD_TOKEN})


def test_a_disabled_user_is_refused_on_the_very_next_rest_call(pipeline):
    user, token = _account(pipeline)
    with _client(pipeline, token) as client:
        for _ in range(4):
            assert client.get("/api/v1/me").status_code == 200
        with psycopg.connect(pipeline.postgres_dsn) as conn:
            conn.execute("UPDATE users SET enabled = false WHERE user_id = %s", (user.user_id,))
        time.sleep(NOTIFY_DELIVERY_S)
        assert client.get("/api/v1/me").status_code == 401


def test_a_change_of_cities_reaches_rest_at_once(pipeline):
    user, token = _account(pipeline, cities=("kota-x", "kota-y"))
    with _client(pipeline, token) as client:
        for _ in range(4):
            assert client.get("/api/v1/me").json()["cities"] == ["kota-x", "kota-y"]
        with psycopg.connect(pipeline.postgres_dsn) as conn:
            accounts.upsert_user(conn, accounts.User(user.user_id, "operator", ("kota-x",)), actor="tests")
        time.sleep(NOTIFY_DELIVERY_S)
        assert client.get("/api/v1/me").json()["cities"] == ["kota-x"]


async def test_revoking_closes_the_users_websocket_and_sse_streams_within_seconds(pipeline):
    user, token = _account(pipeline)
    _, bystander = _account(pipeline)
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        websockets.connect(_ws_url(pipeline, token)) as ws,
        websockets.connect(_ws_url(pipeline, bystander)) as other,
        httpx.AsyncClient(base_url=pipeline.api_url, headers=headers, timeout=20) as client,
        client.stream("GET", "/api/v1/live/sse") as sse,
    ):
        lines = sse.aiter_lines()
        assert await anext(lines) == ": connected"
        with psycopg.connect(pipeline.postgres_dsn) as conn:
            accounts.revoke_tokens(conn, user.user_id, actor="tests")
        started = time.monotonic()
        assert await _close_of(ws, 5) == (4401, BAD_TOKEN)
        assert await _sse_end(lines, 5) == {"code": 4401, "reason": BAD_TOKEN}
        assert time.monotonic() - started < 5
        assert await _still_open(other, 1.0)  # another user's stream is left alone


async def test_a_change_of_role_or_cities_closes_streams_and_a_change_of_nothing_does_not(pipeline):
    city_a, city_b = unique_id("kota"), unique_id("kota")
    user, token = _account(pipeline, cities=(city_a, city_b))

    def save(role: str, *cities: str) -> None:
        with psycopg.connect(pipeline.postgres_dsn) as conn:
            accounts.upsert_user(conn, accounts.User(user.user_id, role, cities), actor="tests")

    async with websockets.connect(_ws_url(pipeline, token, city=city_b)) as ws:
        save("operator", city_a, city_b)  # saved again, unchanged: no reason to close anything
        assert await _still_open(ws, 1.5)
        save("operator", city_a)
        assert await _close_of(ws, 5) == (4403, "access changed: role or cities; reconnect")
    async with websockets.connect(_ws_url(pipeline, token, city=city_b)) as ws:  # the new scope applies
        assert await _close_of(ws, 5) == (4404, "city not found")
    async with websockets.connect(_ws_url(pipeline, token, city=city_a)) as ws:
        save("integrator", city_a)
        assert await _close_of(ws, 5) == (4403, "access changed: role or cities; reconnect")
    async with websockets.connect(_ws_url(pipeline, token, city=city_a)) as ws:
        with psycopg.connect(pipeline.postgres_dsn) as conn:
            conn.execute("UPDATE users SET enabled = false WHERE user_id = %s", (user.user_id,))
        assert await _close_of(ws, 5) == (4401, BAD_TOKEN)


# -- tokens in URLs, headers, metrics ------------------------------------------------------------
async def test_a_token_in_the_url_is_refused_on_rest_and_accepted_on_the_live_feed(pipeline, admin_token):
    _, token = _account(pipeline)
    with _client(pipeline) as anonymous:
        for path in ("/api/v1/me", "/api/v1/devices", "/api/v1/alerts", "/metrics"):
            answer = anonymous.get(path, params={"token": token if path != "/metrics" else admin_token})
            assert (answer.status_code, answer.json()) == (401, {"detail": QUERY_TOKEN}), path
    async with websockets.connect(_ws_url(pipeline, token, type="alert")) as ws:
        assert await _still_open(ws, 1.0)
    async with (
        httpx.AsyncClient(base_url=pipeline.api_url, timeout=20) as client,
        client.stream("GET", "/api/v1/live/sse", params={"token": token, "type": "alert"}) as sse,
    ):
        assert sse.status_code == 200
        assert await anext(sse.aiter_lines()) == ": connected"


def test_every_answer_carries_the_security_headers(pipeline, admin_token):
    with _client(pipeline, admin_token) as client, _client(pipeline) as anonymous:
        answers = {
            "200": client.get("/api/v1/me"),
            "404": client.get("/api/v1/devices/no-such-device"),
            "404 unrouted": client.get("/no/such/path"),
            "401": anonymous.get("/api/v1/me"),
            "422": client.get("/api/v1/alerts", params={"limit": "many"}),
            "static js": anonymous.get("/static/app.js"),
            "page": anonymous.get("/static/index.html"),
            "redirect": anonymous.get("/"),
            "health": anonymous.get("/health"),
            "metrics": client.get("/metrics"),
            "openapi": anonymous.get("/openapi.json"),
            "docs": anonymous.get("/docs"),
        }
    assert [answers[k].status_code for k in ("200", "404", "404 unrouted", "401", "422", "static js", "redirect")] == [
        200,
        404,
        404,
        401,
        422,
        200,
        307,
    ]
    for name, answer in answers.items():
        for header, value in HEADERS.items():
            assert answer.headers.get(header) == value, (name, header, dict(answer.headers))
        csp = answer.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp, (name, csp)
        if name != "docs":
            assert "script-src 'self';" in csp and "unsafe" not in csp, (name, csp)


def test_metrics_need_an_admin_token(pipeline, admin_token):
    _, operator = _account(pipeline)
    with _client(pipeline) as anonymous, _client(pipeline, operator) as op, _client(pipeline, admin_token) as admin:
        assert anonymous.get("/metrics").status_code == 401
        assert anonymous.get("/metrics/").status_code in (401, 404, 307)
        refused = op.get("/metrics")
        assert (refused.status_code, refused.json()) == (403, {"detail": "role operator may not read metrics"})
        metrics = admin.get("/metrics")
    assert metrics.status_code == 200
    assert "kota_api_request_seconds_bucket" in metrics.text and "kota_api_live_clients" in metrics.text


# -- health --------------------------------------------------------------------------------------
def test_health_tells_anyone_only_ok_and_signed_in_callers_the_details_from_one_cached_probe(pipeline, admin_token):
    _, operator = _account(pipeline)
    with _client(pipeline) as anonymous, _client(pipeline, operator) as op:
        summary = anonymous.get("/health")
        assert (summary.status_code, summary.json()) == (200, {"status": "ok"})
        assert anonymous.get("/health", headers={"Authorization": "Bearer kota_no_such"}).json() == {"status": "ok"}
        # Asked at once by many: one probe of the dependencies answers them all (same latencies).
        details = [op.get("/health").json() for _ in range(6)]
    assert details[0]["status"] == "ok" and set(details[0]["dependencies"]) == {"postgres", "kafka", "mqtt"}
    assert "processor" in details[0] and "live_clients" in details[0]
    probes = {json.dumps(d["dependencies"], sort_keys=True) for d in details}
    assert len(probes) <= 2, probes  # at most one new probe in the cache's 2 s (a window may end midway)


@pytest.fixture
def api_with_dependencies_down(pipeline, tmp_path: Path):
    """A second API process on the test stack's database, told the broker and Kafka are on ports where
    nothing listens."""
    port, dead_mqtt, dead_kafka = free_port(), free_port(), free_port()
    offset = pipeline.port_offset
    argv, env = kota_command(
        pipeline,
        "api",
        env={
            "KOTA_API_BASE_PORT": str(port - offset),
            "KOTA_MQTT_BASE_PORT": str(dead_mqtt - offset),
            "KOTA_KAFKA_BASE_PORT": str(dead_kafka - offset),
            "KOTA_API_WORKERS": "1",
        },
    )
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=10).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    try:
        wait_for(answers, timeout_s=60, what="the second API")
        yield url, log
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_health_with_a_dependency_down_is_degraded_without_exception_text(api_with_dependencies_down, admin_token):
    url, log = api_with_dependencies_down
    anonymous = httpx.get(f"{url}/health", timeout=15)
    assert (anonymous.status_code, anonymous.json()) == (503, {"status": "degraded"})
    signed_in = httpx.get(f"{url}/health", timeout=15, headers={"Authorization": f"Bearer {admin_token}"})
    assert signed_in.status_code == 503
    deps = signed_in.json()["dependencies"]
    assert deps["postgres"]["ok"] is True
    assert (deps["mqtt"]["ok"], deps["kafka"]["ok"]) == (False, False)
    assert deps["mqtt"]["detail"] in ("unreachable", "timed out", "failed")
    assert deps["kafka"]["detail"] in ("unreachable", "timed out", "failed")
    for text in ("Error", "Errno", "refused", "Connect", "Traceback", "127.0.0.1"):
        assert text not in anonymous.text and text not in signed_in.text, text
    # The exception's text is in the log instead, once.
    assert wait_for(lambda: log.read_text().count("mqtt check failed") == 1, timeout_s=10, what="the log line")


# -- 422 and caches ------------------------------------------------------------------------------
def test_a_422_for_a_value_the_database_refuses_carries_no_database_text(pipeline, admin_token):
    with _client(pipeline, admin_token) as client:
        answers = [
            client.get("/api/v1/devices", params={"city": "bandung\x00"}),
            client.get("/api/v1/alerts", params={"city": "x\x00y"}),
            client.get("/api/v1/devices", params={"district": "a\x00"}),
        ]
    for answer in answers:
        assert answer.status_code == 422, answer.text
        assert answer.json() == {
            "detail": "invalid value: a parameter holds something the database cannot store or compare",
            "code": "invalid_value",
        }
        for text in ("NUL", "0x00", "psycopg", "SQL", "byte"):
            assert text not in answer.text


async def test_the_device_map_cache_stays_bounded_after_many_distinct_districts(pipeline, admin_token):
    """Over the real API: 1,500 districts nobody has, each a key of its own; then every worker's
    caches, as signed-in /health reports them, hold no lock and at most their bound of answers."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(
        base_url=pipeline.api_url, headers=headers, timeout=30, limits=httpx.Limits(max_connections=20)
    ) as client:
        districts = [f"nowhere-{i}-{unique_id('d')}" for i in range(1500)]
        for start in range(0, len(districts), 100):
            answers = await asyncio.gather(
                *(client.get("/api/v1/devices", params={"district": d}) for d in districts[start : start + 100])
            )
            assert all(a.status_code == 200 for a in answers)
        seen = [(await client.get("/health")).json()["caches"] for _ in range(8)]
    for caches in seen:
        assert caches["device_snapshot_locks"] == 0, caches
        assert caches["device_snapshots"] <= 1000 and caches["tokens"] <= 10_000, caches


async def test_snapshot_cache_shares_one_build_and_keeps_locks_only_while_used():
    cache, builds = SnapshotCache(max_entries=50), []

    async def build() -> bytes:
        builds.append(1)
        await asyncio.sleep(0.01)
        return b"map"

    same = await asyncio.gather(*(cache.get(("one",), 60, build) for _ in range(20)))
    assert same == [b"map"] * 20 and len(builds) == 1  # concurrent callers of one key: one query
    await asyncio.gather(*(cache.get((f"district-{i}",), 60, build) for i in range(500)))
    assert cache.sizes[1] == 0 and cache.sizes[0] <= 50


def test_token_and_series_caches_are_bounded():
    tokens = TokenCache(60, max_entries=100)
    for i in range(1000):
        tokens.put(f"t{i}", Principal(f"u{i}", "operator", frozenset({"a"})))
    assert len(tokens) <= 100
    tokens.forget_user("u999")
    assert tokens.get("t999") is None
    series = SeriesCache(max_bytes=10**9, max_pages=10)
    for i in range(100):
        series._keep(
            (None, f"d{i}", "m", "1m", 10, None, None),
            _Kept(dt.datetime.now(dt.UTC), (), b"[1,2,3]", (1, 6), time.monotonic()),
        )
    assert len(series) == 10
