"""Notifications through the whole stack: alerts raised by the real processor from readings published
over MQTT, the outbox written with their events, a real notifier process delivering to aiosmtpd
(STARTTLS + AUTH), a webhook receiver that verifies signatures and a Telegram Bot API stand-in;
acknowledged from the link and from Telegram's button; a kill -9 of the notifier mid-send; a storm."""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Iterator
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb

from deploy import components, procs
from kota.notifications import NotificationKeys
from kota.settings import PROJECT_ROOT, StackSettings
from ops_api import accounts
from tests.helpers import kota_ok, provision, publish_series, query, run_kota, unique_id, wait_for
from tests.notify_servers import TelegramStandIn, WebhookReceiver, start_smtp

pytestmark = pytest.mark.stack
MINUTE = 60_000
SMTP_USER, SMTP_PASSWORD = "kota-mailer", "s3cret-smtp-Pa55"
BOT_TOKEN = "123456:ABC-standin-token"
CHAT_ID = "-100777"
SCREENSHOT_DIR = PROJECT_ROOT / "test-output"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("notify")
    controller, mailbox, smtp_port, cert = start_smtp(folder, SMTP_USER, SMTP_PASSWORD)
    telegram = TelegramStandIn(BOT_TOKEN)
    telegram_server = telegram.start()
    yield {"mailbox": mailbox, "smtp_port": smtp_port, "cert": cert, "telegram": telegram}
    telegram_server.shutdown()
    controller.stop()


def notifier_env(servers: dict[str, Any]) -> dict[str, str]:
    return {
        "KOTA_NOTIFIER_TELEGRAM_API": f"http://127.0.0.1:{servers['telegram'].port}",
        "KOTA_NOTIFIER_SMTP_CA_FILE": str(servers["cert"]),
        "KOTA_NOTIFIER_SEND_TIMEOUT_S": "4",
        "KOTA_NOTIFIER_LEASE_MARGIN_S": "1",
        "KOTA_NOTIFIER_BACKOFF_BASE_S": "0.5",
        "KOTA_NOTIFIER_BACKOFF_MAX_S": "2",
        "KOTA_NOTIFIER_MAX_ATTEMPTS": "3",
        "KOTA_NOTIFIER_POLL_INTERVAL_S": "0.3",
        "KOTA_NOTIFIER_TELEGRAM_POLL_S": "0.5",
        "KOTA_NOTIFIER_ESCALATION_CHECK_S": "1",
    }


@pytest.fixture(scope="module")
def notifier(pipeline: StackSettings, servers: dict[str, Any]) -> Iterator[StackSettings]:
    procs.stop(pipeline, "notifier")  # one with this module's servers, not a leftover
    components.start_component(pipeline, "notifier", env=notifier_env(servers))
    yield pipeline
    procs.stop(pipeline, "notifier")
    components.start_component(pipeline, "notifier")  # as the pipeline fixture left it


def add_channel(stack: StackSettings, city: str, kind: str, config: dict[str, Any], secret: str) -> int:
    """A channel as the API stores it: config in the clear, the secret encrypted with the state's key."""
    keys = NotificationKeys.from_stack(stack)
    [(channel_id,)] = query(
        stack,
        "INSERT INTO notification_channels (city, name, kind, config, secret, created_by) "
        "VALUES (%s, %s, %s, %s, %s, 'tests') RETURNING channel_id",
        (city, unique_id(kind), kind, Jsonb(config), keys.encrypt(secret)),
    )
    return int(channel_id)


def subscribe(stack: StackSettings, channel_id: int, city: str, **options: Any) -> int:
    columns = {"channel_id": channel_id, "city": city, "created_by": "tests", **options}
    names = ", ".join(columns)
    marks = ", ".join(["%s"] * len(columns))
    [(subscription_id,)] = query(
        stack,
        f"INSERT INTO notification_subscriptions ({names}) VALUES ({marks}) RETURNING subscription_id",  # noqa: S608
        tuple(columns.values()),
    )
    return int(subscription_id)


def flood_gate(stack: StackSettings, city: str, district: str = "regol") -> Any:
    gate = provision(stack, "water_level", city=city, district=district)
    with psycopg.connect(stack.postgres_dsn) as conn:
        conn.execute("INSERT INTO flood_gates VALUES (%s, 100, 150, 200, 1000)", (gate.device_id,))
    return gate


def raise_siaga(stack: StackSettings, gate: Any, level_cm: float = 220.0) -> None:
    """Readings over MQTT that the processor turns into a flood_siaga alert (Siaga 1 at 220 cm)."""
    start = (int(time.time() * 1000) // MINUTE - 30) * MINUTE
    publish_series(stack, gate, "currentLevel", [(start + i * MINUTE, level_cm) for i in range(5)], per_message=5)


def outbox(stack: StackSettings, subscription_id: int) -> list[tuple]:
    return query(
        stack,
        "SELECT o.message_id, o.kind, e.action, o.status, o.attempts, o.possible_duplicate, o.last_error "
        "FROM notification_outbox o LEFT JOIN alert_events e USING (event_id) "
        "WHERE o.subscription_id = %s ORDER BY o.message_id",
        (subscription_id,),
    )


def alert_of(stack: StackSettings, device_id: str, alert_type: str = "flood_siaga") -> tuple:
    return wait_for(
        lambda: query(
            stack,
            "SELECT alert_id, severity, state FROM alerts WHERE device_id = %s AND alert_type = %s",
            (device_id, alert_type),
        ),
        what=f"a {alert_type} alert of {device_id}",
    )[0]


def test_a_raised_alert_reaches_email_webhook_and_telegram_once_each_and_is_acknowledged_from_the_link(
    notifier: StackSettings, servers: dict[str, Any]
) -> None:
    city = unique_id("notifycity").replace("-", "")
    receiver = WebhookReceiver(secret="whsec-" + unique_id("k"))
    webhook_server = receiver.start()
    try:
        webhook = add_channel(
            notifier, city, "webhook", {"url": f"http://127.0.0.1:{receiver.port}/hook"}, receiver.secret
        )
        email = add_channel(
            notifier,
            city,
            "email",
            {
                "host": "127.0.0.1",
                "port": servers["smtp_port"],
                "username": SMTP_USER,
                "from": "kota@bandung.example",
                "to": ["bpbd@bandung.example"],
            },
            SMTP_PASSWORD,
        )
        telegram = add_channel(notifier, city, "telegram", {"chat_id": CHAT_ID}, BOT_TOKEN)
        subs = {
            "webhook": subscribe(notifier, webhook, city, alert_types=["flood_siaga"], language="en"),
            "email": subscribe(notifier, email, city, alert_types=["flood_siaga"], language="id"),
            "telegram": subscribe(notifier, telegram, city, alert_types=["flood_siaga"], language="en"),
        }
        # Another district's subscription and one for a higher tier hear nothing of this alert.
        elsewhere = subscribe(notifier, webhook, city, district="coblong")
        gate = flood_gate(notifier, city)
        raise_siaga(notifier, gate)
        alert_id, severity, _ = alert_of(notifier, gate.device_id)
        assert severity == "critical"
        for name, sub in subs.items():
            wait_for(lambda sub=sub: [m[3] for m in outbox(notifier, sub)] == ["sent"], what=f"{name} sent")
        assert outbox(notifier, elsewhere) == []

        # The webhook: one signed body with what the issue asks for.
        [payload] = [p for p in receiver.verified if p["alert"]["device_id"] == gate.device_id]
        assert receiver.rejected == 0
        assert payload["action"] == "raised" and payload["alert"]["alert_id"] == alert_id
        assert payload["alert"]["siaga"] == 1 and payload["alert"]["district"] == "regol"
        assert payload["alert"]["value"] == 220.0
        assert "Siaga 1: 200 cm" in payload["alert"]["threshold"]
        assert payload["alert"]["url"].endswith(f"#alert={alert_id}")
        # The email, in Indonesian, through STARTTLS and login.
        mails = [m for m in servers["mailbox"].received if gate.device_id in m[2]["Subject"]]
        assert len(mails) == 1
        user, recipients, mail = mails[0]
        assert (user, recipients) == (SMTP_USER, ["bpbd@bandung.example"])
        text = mail.get_payload(decode=True).decode()
        assert "Peringatan baru" in mail["Subject"] and "Kecamatan: regol" in text and "Siaga 1" in text
        # Telegram, with its Acknowledge button.
        [message] = [m for m in servers["telegram"].sent if gate.device_id in m["text"]]
        assert message["chat_id"] == CHAT_ID
        assert message["reply_markup"]["inline_keyboard"][0][0]["text"] == "Acknowledge"

        # Acknowledge from the email's link: GET only shows a page (mail scanners follow links).
        link = re.search(r"(http://\S+/api/v1/notifications/ack/\S+)", text)[1]
        page = httpx.get(link, timeout=10)
        assert page.status_code == 200 and "<form" in page.text
        assert alert_of(notifier, gate.device_id)[2] == "active"
        done = httpx.post(link, timeout=10)
        assert done.status_code == 200, done.text
        assert alert_of(notifier, gate.device_id)[2] == "acknowledged"
        assert httpx.post(link, timeout=10).status_code == 410, "single use"
        [(actor,)] = query(
            notifier, "SELECT actor FROM alert_events WHERE alert_id = %s AND action = 'acknowledged'", (alert_id,)
        )
        assert actor == f"link:subscription-{subs['email']}"
        audit = query(
            notifier,
            "SELECT actor, details->>'via' FROM audit_log WHERE target_id = %s AND action = %s",
            (str(alert_id), "alert.acknowledge"),
        )
        assert audit == [(actor, "link")]
        # The acknowledgement is itself an event: each subscription hears it, once.
        for name, sub in subs.items():
            wait_for(
                lambda sub=sub: (
                    [(m[2], m[3]) for m in outbox(notifier, sub)] == [("raised", "sent"), ("acknowledged", "sent")]
                ),
                what=f"{name}: the acknowledgement sent",
            )
        attempts = query(
            notifier,
            "SELECT count(*), count(*) FILTER (WHERE outcome = 'sent') FROM notification_attempts a "
            "JOIN notification_outbox o USING (message_id) WHERE o.subscription_id = ANY(%s)",
            (list(subs.values()),),
        )
        assert attempts == [(6, 6)]
    finally:
        webhook_server.shutdown()


def test_the_telegram_button_acknowledges_with_who_pressed_it(notifier: StackSettings, servers: dict[str, Any]) -> None:
    city = unique_id("tgcity").replace("-", "")
    telegram = add_channel(notifier, city, "telegram", {"chat_id": CHAT_ID}, BOT_TOKEN)
    subscribe(notifier, telegram, city, alert_types=["flood_siaga"], language="id")
    gate = flood_gate(notifier, city)
    raise_siaga(notifier, gate)
    alert_id, _, _ = alert_of(notifier, gate.device_id)
    message = wait_for(
        lambda: [m for m in servers["telegram"].sent if gate.device_id in m["text"]], what="the Telegram message"
    )[0]
    assert message["reply_markup"]["inline_keyboard"][0][0]["text"] == "Tandai ditangani"
    servers["telegram"].press(message, user="budi_bpbd")
    wait_for(lambda: alert_of(notifier, gate.device_id)[2] == "acknowledged", what="the acknowledgement")
    [(actor, comment)] = query(
        notifier,
        "SELECT actor, comment FROM alert_events WHERE alert_id = %s AND action = 'acknowledged'",
        (alert_id,),
    )
    assert (actor, comment) == ("telegram:budi_bpbd", "acknowledged from Telegram")
    assert query(
        notifier,
        "SELECT actor, details->>'via' FROM audit_log WHERE target_id = %s AND action = 'alert.acknowledge'",
        (str(alert_id),),
    ) == [("telegram:budi_bpbd", "telegram")]
    wait_for(lambda: any(a.get("text") == "OK" for a in servers["telegram"].answered), what="the button answered")


def test_a_notifier_killed_mid_send_loses_nothing_and_sends_at_most_once_more(
    notifier: StackSettings, servers: dict[str, Any]
) -> None:
    city = unique_id("killcity").replace("-", "")
    receiver = WebhookReceiver(secret="whsec-kill", delay_s=3.0)  # answers late: the kill lands mid-send
    webhook_server = receiver.start()
    try:
        channel = add_channel(notifier, city, "webhook", {"url": f"http://127.0.0.1:{receiver.port}/"}, receiver.secret)
        sub = subscribe(notifier, channel, city, alert_types=["flood_siaga"])
        gates = [flood_gate(notifier, city) for _ in range(3)]
        for gate in gates:
            raise_siaga(notifier, gate)
        wait_for(lambda: receiver.verified, what="a first request in flight")
        assert procs.stop(notifier, "notifier", hard=True)  # kill -9
        receiver.delay_s = 0.0
        cut = [m for m in outbox(notifier, sub) if m[3] == "sending"]
        assert cut, "the kill left a message between send and record"
        components.start_component(notifier, "notifier", env=notifier_env(servers))
        rows = wait_for(
            lambda: (r := outbox(notifier, sub)) and len(r) == 3 and all(m[3] == "sent" for m in r) and r,
            timeout_s=60,
            what="every message sent after the restart",
        )
        received: dict[int, int] = {}
        for body in receiver.verified:
            received[body["alert"]["alert_id"]] = received.get(body["alert"]["alert_id"], 0) + 1
        assert len(received) == 3, "nothing lost"
        assert all(n <= 2 for n in received.values()), received
        duplicates = {m[0] for m in rows if m[5]}
        assert {m[0] for m in cut} <= duplicates, "a cut message is marked possible_duplicate"
        interrupted = query(
            notifier,
            "SELECT count(*) FROM notification_attempts WHERE message_id = ANY(%s) AND outcome = 'interrupted'",
            ([m[0] for m in cut],),
        )[0][0]
        assert interrupted == len(cut)
        print(f"\nkill -9 mid-send: {len(cut)} message(s) cut, {sum(received.values())} requests for 3 messages")
    finally:
        webhook_server.shutdown()


def test_a_failing_endpoint_is_retried_with_backoff_then_given_up_with_the_reason(
    notifier: StackSettings, servers: dict[str, Any]
) -> None:
    city = unique_id("failcity").replace("-", "")
    receiver = WebhookReceiver(secret="whsec-fail", fail_with=503)
    webhook_server = receiver.start()
    try:
        channel = add_channel(notifier, city, "webhook", {"url": f"http://127.0.0.1:{receiver.port}/"}, receiver.secret)
        sub = subscribe(notifier, channel, city, alert_types=["flood_siaga"])
        gate = flood_gate(notifier, city)
        raise_siaga(notifier, gate)
        [(message_id, _, _, status, attempts, _, reason)] = wait_for(
            lambda: [m for m in outbox(notifier, sub) if m[3] == "failed"], timeout_s=60, what="the give-up"
        )
        assert attempts == 3 and reason.startswith("gave up after 3 attempts: webhook: HTTP 503")
        # Each failure schedules the next attempt (in its own transaction: one now()), twice as far out.
        tries = query(
            notifier,
            "SELECT outcome, extract(epoch FROM retry_at - finished_at) FROM notification_attempts "
            "WHERE message_id = %s ORDER BY attempt",
            (message_id,),
        )
        assert [t[0] for t in tries] == ["failed"] * 3
        delays = [float(t[1]) for t in tries[:2]]
        assert 0.45 <= delays[0] <= 0.55 and 0.9 <= delays[1] <= 1.1, f"0.5 s then 1 s, with 10 % jitter: {delays}"
        assert tries[2][1] is None, "the last one schedules nothing: given up"
    finally:
        webhook_server.shutdown()


def test_a_storm_of_alerts_becomes_a_bounded_number_of_messages_and_one_digest(
    notifier: StackSettings, servers: dict[str, Any]
) -> None:
    city = unique_id("stormcity").replace("-", "")
    receiver = WebhookReceiver(secret="whsec-storm")
    webhook_server = receiver.start()
    limit, window_s, n = 4, 12, 20
    # Two notifiers share the outbox, as replicas do.
    components.start_component(notifier, "notifier", instance="notifier-2", env=notifier_env(servers))
    try:
        channel = add_channel(notifier, city, "webhook", {"url": f"http://127.0.0.1:{receiver.port}/"}, receiver.secret)
        sub = subscribe(
            notifier, channel, city, alert_types=["flood_siaga"], digest_limit=limit, digest_window_s=window_s
        )
        gates = [flood_gate(notifier, city) for _ in range(n)]
        for gate in gates:
            raise_siaga(notifier, gate)
        wait_for(
            lambda: (
                query(
                    notifier,
                    "SELECT count(*) FROM alerts a JOIN devices d USING (device_id) WHERE d.city = %s",
                    (city,),
                )[0][0]
                >= n
            ),
            timeout_s=60,
            what="every alert of the storm",
        )
        rows = wait_for(
            lambda: (
                (r := outbox(notifier, sub))
                and len([m for m in r if m[1] == "event"]) == n
                and all(m[3] in ("sent", "digested") for m in r)
                and any(m[1] == "digest" and m[3] == "sent" for m in r)
                and r
            ),
            timeout_s=90,
            what="the storm delivered",
        )
        singles = [m for m in rows if m[1] == "event" and m[3] == "sent"]
        digested = [m for m in rows if m[3] == "digested"]
        digests = [b for b in receiver.verified if b.get("kind") == "digest"]
        assert len(singles) + len(digested) == n
        assert len(receiver.verified) == len(singles) + len(digests)
        assert sum(d["count"] for d in digests) == len(digested)
        # Each event reached the receiver once: alone, or in one digest.
        alone = [b["event_id"] for b in receiver.verified if b["kind"] == "alert_event"]
        folded = [e["event_id"] for d in digests for e in d["events"]]
        assert len(alone) + len(folded) == len(set(alone) | set(folded)) == n
        # Never more than the limit in any window (the database's own dispatch times).
        times = sorted(
            t
            for (t,) in query(
                notifier,
                "SELECT dispatched_at FROM notification_outbox WHERE subscription_id = %s AND status = 'sent'",
                (sub,),
            )
        )
        busiest = max(sum(1 for u in times if t <= u < t + dt.timedelta(seconds=window_s)) for t in times)
        assert busiest <= limit, (busiest, times)
        print(
            f"\nstorm: {n} alerts raised in a burst, 2 notifiers -> {len(receiver.verified)} messages sent "
            f"({len(singles)} single, {len(digests)} digest of {len(digested)}); limit {limit} per {window_s} s, "
            f"busiest window {busiest}"
        )
    finally:
        procs.stop(notifier, "notifier-2")
        webhook_server.shutdown()


def test_an_unacknowledged_alert_escalates_to_the_next_tier(notifier: StackSettings, servers: dict[str, Any]) -> None:
    city = unique_id("esccity").replace("-", "")
    duty, chief = WebhookReceiver(secret="whsec-duty"), WebhookReceiver(secret="whsec-chief")
    duty_server, chief_server = duty.start(), chief.start()
    try:
        first = subscribe(
            notifier,
            add_channel(notifier, city, "webhook", {"url": f"http://127.0.0.1:{duty.port}/"}, duty.secret),
            city,
            alert_types=["flood_siaga"],
        )
        second = subscribe(
            notifier,
            add_channel(notifier, city, "webhook", {"url": f"http://127.0.0.1:{chief.port}/"}, chief.secret),
            city,
            alert_types=["flood_siaga"],
            tier=2,
            escalate_after_s=3,
            min_severity="major",
        )
        gate = flood_gate(notifier, city)
        raise_siaga(notifier, gate)
        alert_id, _, _ = alert_of(notifier, gate.device_id)
        wait_for(lambda: [m[2] for m in outbox(notifier, first)] == ["raised"], what="tier 1 hears the raise")
        assert outbox(notifier, second) == [], "tier 2 hears nothing before the delay"
        wait_for(
            lambda: [(m[2], m[3]) for m in outbox(notifier, second)] == [("escalated", "sent")],
            timeout_s=30,
            what="tier 2 notified after the delay",
        )
        [(actor, comment)] = query(
            notifier,
            "SELECT actor, comment FROM alert_events WHERE alert_id = %s AND action = 'escalated'",
            (alert_id,),
        )
        assert actor == "kota-notifier" and comment.startswith("not acknowledged within 3 s: tier 2")
        assert query(
            notifier,
            "SELECT details->>'tier' FROM audit_log WHERE action = 'alert.escalate' AND target_id = %s",
            (str(alert_id),),
        ) == [("2",)]
        assert [b["action"] for b in chief.verified] == ["escalated"]
        wait_for(lambda: [m[2] for m in outbox(notifier, first)] == ["raised", "escalated"], what="tier 1 told too")
        time.sleep(3)  # the check runs every second: a second escalation would have come by now
        assert len(query(notifier, "SELECT 1 FROM alert_events WHERE alert_id = %s", (alert_id,))) == 2
    finally:
        duty_server.shutdown()
        chief_server.shutdown()


def test_quiet_hours_hold_back_all_but_the_most_severe(notifier: StackSettings, servers: dict[str, Any]) -> None:
    city = unique_id("quietcity").replace("-", "")
    receiver = WebhookReceiver(secret="whsec-quiet")
    webhook_server = receiver.start()
    try:
        now = dt.datetime.now(ZoneInfo("Asia/Jakarta"))
        sub = subscribe(
            notifier,
            add_channel(notifier, city, "webhook", {"url": f"http://127.0.0.1:{receiver.port}/"}, receiver.secret),
            city,
            alert_types=["flood_siaga"],
            quiet_start=(now - dt.timedelta(hours=1)).time(),
            quiet_end=(now + dt.timedelta(hours=1)).time(),
            timezone="Asia/Jakarta",
        )
        siaga2, siaga1 = flood_gate(notifier, city), flood_gate(notifier, city)
        raise_siaga(notifier, siaga2, level_cm=160.0)  # Siaga 2: major
        raise_siaga(notifier, siaga1, level_cm=220.0)  # Siaga 1: never held back
        rows = wait_for(
            lambda: (
                (r := outbox(notifier, sub)) and len(r) == 2 and all(m[3] in ("sent", "suppressed") for m in r) and r
            ),
            what="both decided",
        )
        by_device = {b["alert"]["device_id"]: b for b in receiver.verified}
        assert list(by_device) == [siaga1.device_id]
        [suppressed] = [m for m in rows if m[3] == "suppressed"]
        assert suppressed[6].startswith("quiet hours") and suppressed[4] == 0, "never attempted"
    finally:
        webhook_server.shutdown()


# -- the API: city scope, secrets, audit, a test message ----------------------------------------
def _token_for(stack: StackSettings, user_id: str, role: str, cities: tuple[str, ...]) -> dict[str, str]:
    with psycopg.connect(stack.postgres_dsn) as conn:
        accounts.upsert_user(conn, accounts.User(user_id, role, cities), actor="tests")
        return {"Authorization": f"Bearer {accounts.issue_token(conn, user_id, label='tests', actor='tests')}"}


def test_the_api_manages_channels_per_city_never_returns_secrets_and_sends_a_test(
    notifier: StackSettings, servers: dict[str, Any]
) -> None:
    city, other = unique_id("apicity").replace("-", ""), unique_id("othercity").replace("-", "")
    operator = _token_for(notifier, unique_id("op"), "operator", (city,))
    stranger = _token_for(notifier, unique_id("op"), "operator", (other,))
    integrator = _token_for(notifier, unique_id("int"), "integrator", (city,))
    receiver = WebhookReceiver(secret="whsec-api-" + unique_id("k"))
    webhook_server = receiver.start()
    base = f"{notifier.api_url}/api/v1/notifications"
    # One client with a generous timeout: the suite loads both cores and one POST once took over
    # httpx's default 5 s to answer.
    api = httpx.Client(timeout=30)
    try:
        channel = {
            "city": city,
            "name": "bpbd",
            "kind": "webhook",
            "config": {"url": f"http://127.0.0.1:{receiver.port}/"},
            "secret": receiver.secret,
        }
        assert api.post(f"{base}/channels", json=channel, headers=integrator).status_code == 403
        assert api.post(f"{base}/channels", json=channel, headers=stranger).status_code == 404
        bad = api.post(f"{base}/channels", json={**channel, "config": {"url": "ftp://x"}}, headers=operator)
        assert bad.status_code == 422
        made = api.post(f"{base}/channels", json=channel, headers=operator)
        assert made.status_code == 201, made.text
        channel_id = made.json()["channel_id"]
        assert made.json()["has_secret"] is True
        assert api.post(f"{base}/channels", json=channel, headers=operator).status_code == 409
        listed = api.get(f"{base}/channels", headers=integrator)
        assert [c["channel_id"] for c in listed.json()] == [channel_id]
        assert receiver.secret not in listed.text and receiver.secret not in made.text
        assert api.get(f"{base}/channels", headers=stranger).json() == []
        [(stored,)] = query(notifier, "SELECT secret FROM notification_channels WHERE channel_id = %s", (channel_id,))
        assert receiver.secret.encode() not in bytes(stored), "encrypted at rest"

        sub = api.post(
            f"{base}/subscriptions",
            json={"channel_id": channel_id, "min_severity": "major", "alert_types": ["flood_siaga"], "language": "en"},
            headers=operator,
        )
        assert sub.status_code == 201, sub.text
        assert api.get(f"{base}/subscriptions", headers=stranger).json() == []
        assert api.post(f"{base}/channels/{channel_id}/test", headers=stranger).status_code == 404
        queued = api.post(f"{base}/channels/{channel_id}/test", json={"language": "en"}, headers=operator)
        assert queued.status_code == 202, queued.text
        wait_for(lambda: [b for b in receiver.verified if b["kind"] == "test"], what="the test message")
        [delivery] = wait_for(
            lambda: [
                d
                for d in api.get(f"{base}/deliveries", params={"channel_id": channel_id}, headers=integrator).json()
                if d["status"] == "sent"
            ],
            what="the test's delivery",
        )
        assert delivery["kind"] == "test" and [a["outcome"] for a in delivery["history"]] == ["sent"]
        assert api.get(f"{base}/deliveries", params={"channel_id": channel_id}, headers=stranger).json() == []

        # A channel whose endpoint is gone: the give-up and its reason show in /deliveries.
        broken = api.patch(
            f"{base}/channels/{channel_id}", json={"config": {"url": "http://127.0.0.1:9/"}}, headers=operator
        )
        assert broken.status_code == 200, broken.text
        api.post(f"{base}/channels/{channel_id}/test", headers=operator)
        [failed] = wait_for(
            lambda: api.get(f"{base}/deliveries", params={"status": "failed"}, headers=operator).json(),
            timeout_s=60,
            what="the give-up",
        )
        assert failed["last_error"].startswith("gave up after 3 attempts: webhook: ConnectError")
        assert [a["outcome"] for a in failed["history"]] == ["failed"] * 3
        audit = [
            r[0] for r in query(notifier, "SELECT action FROM audit_log WHERE city = %s ORDER BY event_id", (city,))
        ]
        assert audit == [
            "notification.channel.add",
            "notification.subscription.add",
            "notification.channel.test",
            "notification.channel.change",
            "notification.channel.test",
        ]
        assert api.delete(f"{base}/channels/{channel_id}", headers=stranger).status_code == 404
        assert api.delete(f"{base}/channels/{channel_id}", headers=operator).status_code == 204
    finally:
        api.close()
        webhook_server.shutdown()


def test_a_forged_or_expired_ack_link_acknowledges_nothing(notifier: StackSettings) -> None:
    keys = NotificationKeys.from_stack(notifier)
    base = f"{notifier.api_url}/api/v1/notifications/ack"
    expired = keys.ack_token(1, 1, int(time.time()) - 10)
    forged = NotificationKeys("another key").ack_token(1, 1, int(time.time()) + 600)
    assert httpx.post(f"{base}/{expired}", timeout=10).status_code == 410
    assert httpx.post(f"{base}/{forged}", timeout=10).status_code == 404
    assert httpx.get(f"{base}/not-a-token", timeout=10).status_code == 404


def test_the_cli_adds_a_channel_and_subscription_and_sends_a_test(notifier: StackSettings) -> None:
    city = unique_id("clicity").replace("-", "")
    receiver = WebhookReceiver(secret="whsec-cli-" + unique_id("k"))
    webhook_server = receiver.start()
    try:
        added = kota_ok(
            notifier,
            "notifications", "channels", "add", "--city", city, "--name", "cli-hook", "--kind", "webhook",
            "--config", f'{{"url": "http://127.0.0.1:{receiver.port}/"}}', "--secret-env", "HOOK_SECRET",
            env={"HOOK_SECRET": receiver.secret},
        )  # fmt: skip
        channel_id = int(re.search(r"channel (\d+) added", added)[1])
        listed = kota_ok(notifier, "notifications", "channels", "list", "--city", city)
        assert "cli-hook" in listed and receiver.secret not in listed
        kota_ok(
            notifier,
            "notifications", "subscriptions", "add", "--channel-id", str(channel_id), "--alert-type", "flood_siaga",
            "--quiet", "22:00", "06:00", "--language", "en",
        )  # fmt: skip
        assert "22:00" in kota_ok(notifier, "notifications", "subscriptions", "list", "--city", city)
        kota_ok(notifier, "notifications", "channels", "test", str(channel_id), "--language", "en")
        wait_for(lambda: [b for b in receiver.verified if b["kind"] == "test"], what="the CLI's test message")
        wait_for(
            lambda: "sent" in kota_ok(notifier, "notifications", "deliveries", "--city", city),
            what="the delivery listed",
        )
        bad = run_kota(notifier, "notifications", "channels", "add", "--city", city, "--name", "x", "--kind",
                       "email", "--config", '{"host": "h"}', "--secret-env", "HOOK_SECRET",
                       env={"HOOK_SECRET": "x"})  # fmt: skip
        assert bad.returncode == 2 and "from" in bad.stdout
        actions = [
            r[0] for r in query(notifier, "SELECT action FROM audit_log WHERE city = %s ORDER BY event_id", (city,))
        ]
        assert actions == ["notification.channel.add", "notification.subscription.add", "notification.channel.test"]
        assert query(notifier, "SELECT DISTINCT actor LIKE 'cli:%%' FROM audit_log WHERE city = %s", (city,)) == [
            (True,)
        ]
    finally:
        webhook_server.shutdown()


def test_the_page_opens_a_messages_alert_adds_a_subscription_and_sends_a_test(
    notifier: StackSettings, servers: dict[str, Any]
) -> None:
    from playwright.sync_api import expect, sync_playwright

    from deploy import install

    chromium = install.ensure_chromium(print)
    city = unique_id("pagecity").replace("-", "")
    headers = _token_for(notifier, unique_id("op"), "operator", (city,))
    token = headers["Authorization"].removeprefix("Bearer ")
    receiver = WebhookReceiver(secret="whsec-page")
    webhook_server = receiver.start()
    try:
        channel_id = add_channel(
            notifier, city, "webhook", {"url": f"http://127.0.0.1:{receiver.port}/"}, receiver.secret
        )
        subscribe(notifier, channel_id, city, alert_types=["flood_siaga"])
        gate = flood_gate(notifier, city)
        raise_siaga(notifier, gate)
        alert_id, _, _ = alert_of(notifier, gate.device_id)
        [body] = wait_for(lambda: [b for b in receiver.verified if b["kind"] == "alert_event"], what="the message")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{notifier.api_url}/#token={token}")
            expect(page.locator("#notify-channels")).to_contain_text("webhook", timeout=15_000)
            # The message's own link to the alert, opened by a signed-in operator.
            page.goto(body["alert"]["url"])
            page.reload()
            expect(page.locator("#linked-alert")).to_contain_text(f"#{alert_id}", timeout=15_000)
            expect(page.locator("#linked-alert")).to_contain_text("raised")
            page.select_option("#notify-add select[name=min_severity]", "critical")
            page.fill("#notify-add input[name=alert_types]", "flood_siaga, flood_rising")
            page.click("#notify-add button[type=submit]")
            expect(page.locator("#notify-subscriptions")).to_contain_text("flood_rising", timeout=10_000)
            page.click(f"button.notify-test[data-channel='{channel_id}']")
            wait_for(lambda: [b for b in receiver.verified if b["kind"] == "test"], what="the page's test message")
            expect(page.locator("#notify-deliveries")).to_contain_text("test", timeout=10_000)
            SCREENSHOT_DIR.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT_DIR / "notifications.png"), full_page=True)
            # The message's acknowledge link in a browser, under the API's Content-Security-Policy:
            # opening it changes nothing; its button acknowledges.
            page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
            page.goto(body["ack_url"])
            expect(page.locator("form button")).to_be_visible()
            assert alert_of(notifier, gate.device_id)[2] == "active"
            page.click("form button")
            expect(page.locator("h1")).to_contain_text("Acknowledged", timeout=10_000)
            browser.close()
        assert errors == []
        [(types, severity, created_by)] = query(
            notifier,
            "SELECT alert_types, min_severity, created_by FROM notification_subscriptions "
            "WHERE city = %s AND min_severity = 'critical'",
            (city,),
        )
        assert types == ["flood_siaga", "flood_rising"] and severity == "critical" and created_by.startswith("op-")
        assert alert_of(notifier, gate.device_id)[2] == "acknowledged"
    finally:
        webhook_server.shutdown()


def test_a_flapping_gate_is_one_alert_and_one_message(notifier: StackSettings, servers: dict[str, Any]) -> None:
    city = unique_id("flapcity").replace("-", "")
    receiver = WebhookReceiver(secret="whsec-flap")
    webhook_server = receiver.start()
    try:
        channel = add_channel(notifier, city, "webhook", {"url": f"http://127.0.0.1:{receiver.port}/"}, receiver.secret)
        sub = subscribe(notifier, channel, city, alert_types=["flood_siaga"])
        gate = flood_gate(notifier, city)
        start = (int(time.time() * 1000) // MINUTE - 40) * MINUTE
        # Siaga 1 and back to normal every other minute for 30 minutes: inside the clear-after time.
        flapping = [(start + i * MINUTE, 220.0 if i % 2 == 0 else 20.0) for i in range(30)]
        publish_series(notifier, gate, "currentLevel", flapping, per_message=3)
        wait_for(
            lambda: query(notifier, "SELECT count FROM alerts WHERE device_id = %s", (gate.device_id,)) == [(15,)],
            what="one alert counting 15 signals",
        )
        wait_for(lambda: [(m[2], m[3]) for m in outbox(notifier, sub)] == [("raised", "sent")], what="one message")
        time.sleep(2)  # the notifier polls every 0.3 s: anything more would be there by now
        assert len(outbox(notifier, sub)) == 1 and len(receiver.verified) == 1
        print(f"\nflapping gate: 15 signals in 30 min -> 1 alert, {len(receiver.verified)} message")
    finally:
        webhook_server.shutdown()


def test_a_message_that_cannot_be_prepared_fails_alone_with_its_reason(
    notifier: StackSettings, servers: dict[str, Any]
) -> None:
    city = unique_id("poisoncity").replace("-", "")
    receiver = WebhookReceiver(secret="whsec-good")
    webhook_server = receiver.start()
    try:
        good = add_channel(notifier, city, "webhook", {"url": f"http://127.0.0.1:{receiver.port}/"}, receiver.secret)
        # A secret encrypted under another key (a restored backup, a key replaced by hand).
        [(bad,)] = query(
            notifier,
            "INSERT INTO notification_channels (city, name, kind, config, secret, created_by) "
            "VALUES (%s, 'foreign', 'webhook', %s, %s, 'tests') RETURNING channel_id",
            (city, Jsonb({"url": f"http://127.0.0.1:{receiver.port}/"}), NotificationKeys("other").encrypt("x")),
        )
        bad_sub, good_sub = subscribe(notifier, bad, city), subscribe(notifier, good, city)
        gate = flood_gate(notifier, city)
        raise_siaga(notifier, gate)
        wait_for(lambda: [m[3] for m in outbox(notifier, good_sub)][:1] == ["sent"], what="the good channel's message")
        [failed, *_] = wait_for(lambda: outbox(notifier, bad_sub), what="the foreign channel's message")
        assert failed[3] == "failed" and "does not decrypt" in failed[6], failed
        assert procs.running_pid(notifier, "notifier"), "the notifier goes on"
    finally:
        webhook_server.shutdown()


def test_old_finished_messages_are_forgotten_by_the_notifiers_own_role(notifier: StackSettings) -> None:
    import asyncio

    from pydantic import SecretStr

    from deploy import postgres_access
    from notifier.delivery import Notifier
    from notifier.settings import NotifierSettings

    city = unique_id("oldcity").replace("-", "")
    channel = add_channel(notifier, city, "webhook", {"url": "http://127.0.0.1:9/"}, "k")
    old = query(
        notifier,
        "INSERT INTO notification_outbox (kind, channel_id, city, status, created_at) "
        "SELECT 'test', %s, %s, s, now() - interval '40 days' FROM unnest(ARRAY['sent', 'failed', 'pending']) s "
        "RETURNING message_id, status",
        (channel, city),
    )
    query(
        notifier,
        "INSERT INTO notification_ack_uses (nonce, actor, used_at) VALUES (%s, 't', now() - interval '5 days') "
        "RETURNING nonce",
        (unique_id("nonce"),),
    )
    role = postgres_access.component_env(notifier, "notifier")
    as_notifier = notifier.model_copy(
        update={
            "postgres_user": role["KOTA_POSTGRES_USER"],
            "postgres_password": SecretStr(role["KOTA_POSTGRES_PASSWORD"]),
        }
    )

    async def forget() -> tuple[int, int]:
        keys = NotificationKeys.from_stack(notifier)
        async with await psycopg.AsyncConnection.connect(as_notifier.postgres_dsn) as conn:
            return await Notifier(as_notifier, NotifierSettings(), keys).forget_old(conn, now=True)

    messages, nonces = asyncio.run(forget())
    assert messages >= 2 and nonces >= 1
    left = query(notifier, "SELECT status FROM notification_outbox WHERE message_id = ANY(%s)", ([m[0] for m in old],))
    assert left == [("pending",)], "a message still to send is kept, however old"


def test_a_simulated_city_notifies_each_event_once_by_email_and_telegram_and_is_acknowledged_from_them(
    notifier: StackSettings, servers: dict[str, Any], tmp_path: Any
) -> None:
    """The whole loop as people meet it: `kota simulate` with its injected anomalies raises real
    alerts; every alert event becomes exactly one message per subscription; storms fold into
    digests; one alert is acknowledged from Telegram's button and another from the email's link."""
    from tests.helpers import simulate

    city = unique_id("simcity").replace("-", "")
    chat = "-100424242"
    email = add_channel(
        notifier,
        city,
        "email",
        {"host": "127.0.0.1", "port": servers["smtp_port"], "username": SMTP_USER,
         "from": "kota@kota.example", "to": [f"piket@{city}.example"]},
        SMTP_PASSWORD,
    )  # fmt: skip
    telegram = add_channel(notifier, city, "telegram", {"chat_id": chat}, BOT_TOKEN)
    limit, window_s = 5, 15
    subs = [
        subscribe(notifier, email, city, language="id", digest_limit=limit, digest_window_s=window_s),
        subscribe(notifier, telegram, city, language="en", digest_limit=limit, digest_window_s=window_s),
    ]
    start = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=4)).replace(second=0, microsecond=0)
    readings = simulate(notifier, city, start, tmp_path, rate=4000, extra=("--anomalies-per-day", "240"))
    [(last_event,)] = query(notifier, "SELECT max(event_id) FROM alert_events")
    events = query(
        notifier,
        "SELECT e.event_id, e.action, a.alert_id, a.alert_type FROM alert_events e JOIN alerts a USING (alert_id) "
        "WHERE a.city = %s AND e.event_id <= %s ORDER BY e.event_id",
        (city, last_event),
    )
    assert events, "the simulated city raised alerts"
    # Exactly one message per (event, subscription), written with the event.
    per_event = query(
        notifier,
        "SELECT e.event_id, count(o.message_id) FROM alert_events e JOIN alerts a USING (alert_id) "
        "LEFT JOIN notification_outbox o ON o.event_id = e.event_id "
        "WHERE a.city = %s AND e.event_id <= %s GROUP BY e.event_id",
        (city, last_event),
    )
    assert {n for _, n in per_event} == {2}, per_event

    def settled() -> bool:
        rows = query(
            notifier,
            "SELECT count(*) FILTER (WHERE status NOT IN ('sent', 'digested')) FROM notification_outbox "
            "WHERE subscription_id = ANY(%s) AND (event_id IS NULL OR event_id <= %s)",
            (subs, last_event),
        )
        return rows[0][0] == 0

    wait_for(settled, timeout_s=180, what="every message of the simulated city sent or in a digest")
    mails = [m for m in servers["mailbox"].received if f"piket@{city}.example" in m[1]]
    texts = [m for m in servers["telegram"].sent if m["chat_id"] == chat]
    singles = query(
        notifier,
        "SELECT subscription_id, count(*) FILTER (WHERE kind = 'event' AND status = 'sent'), "
        "count(*) FILTER (WHERE kind = 'digest' AND status = 'sent'), count(*) FILTER (WHERE status = 'digested') "
        "FROM notification_outbox WHERE subscription_id = ANY(%s) GROUP BY 1 ORDER BY 1",
        (subs,),
    )
    print(
        f"\nsimulated city {city}: {readings} readings, {len({e[2] for e in events})} alerts, {len(events)} events "
        f"-> per subscription (single, digests, events in digests): {[s[1:] for s in singles]}; "
        f"{len(mails)} emails and {len(texts)} Telegram messages received"
    )
    for _, single, _digests, digested in singles:
        assert single + digested >= len(events) - 1  # later events (dropouts) may have joined meanwhile
    assert len(mails) >= 1 and len(texts) >= 1

    # The city's anomalies cleared themselves within the simulated hours. Two of its flood gates now
    # rise to Siaga 1 and stay there: one is acknowledged from the email's link, one from Telegram.
    gates = [flood_gate(notifier, city), flood_gate(notifier, city)]
    for gate in gates:
        raise_siaga(notifier, gate)
    alerts_ = [alert_of(notifier, gate.device_id)[0] for gate in gates]

    def email_of(alert_id: int) -> str:
        def find() -> list[str]:
            bodies = [m[2].get_payload(decode=True).decode() for m in servers["mailbox"].received]
            return [b for b in bodies if f"#alert={alert_id}" in b and "/notifications/ack/" in b]

        return wait_for(find, what=f"the email of alert {alert_id}")[0]

    mail_text = email_of(alerts_[0])
    link = re.search(r"(http://\S+/api/v1/notifications/ack/\S+)", mail_text)[1]
    assert httpx.post(link, timeout=10).status_code == 200
    [pressed] = wait_for(
        lambda: [m for m in servers["telegram"].sent if f"#alert={alerts_[1]}" in m["text"] and "reply_markup" in m],
        what="the Telegram message of the second gate",
    )
    servers["telegram"].press(pressed, user="sari_dishub")
    wait_for(lambda: alert_of(notifier, gates[1].device_id)[2] == "acknowledged", what="the button's acknowledgement")
    expected = {alerts_[0]: f"link:subscription-{subs[0]}", alerts_[1]: "telegram:sari_dishub"}
    for alert_id, actor in expected.items():
        assert query(notifier, "SELECT acknowledged_by FROM alerts WHERE alert_id = %s", (alert_id,)) == [(actor,)]
    audit = query(
        notifier,
        "SELECT at, actor, action, target_id, details->>'via' FROM audit_log "
        "WHERE target_id = ANY(%s) AND action = 'alert.acknowledge' ORDER BY event_id",
        ([str(a) for a in expected],),
    )
    assert sorted((a[3], a[1]) for a in audit) == sorted((str(k), v) for k, v in expected.items())
    # Each acknowledgement is an event too: both channels hear both, once.
    for sub in subs:
        wait_for(
            lambda sub=sub: (
                len(
                    query(
                        notifier,
                        "SELECT 1 FROM notification_outbox o JOIN alert_events e USING (event_id) "
                        "WHERE o.subscription_id = %s AND e.action = 'acknowledged' AND o.status = 'sent' "
                        "AND e.alert_id = ANY(%s)",
                        (sub, alerts_),
                    )
                )
                == 2
            ),
            what="the acknowledgements announced",
        )
    print("an email as received:\n" + mail_text)
    print("a Telegram message as received:\n" + pressed["text"])
    print("audit:", [(str(a[0])[:19], *a[1:]) for a in audit])
