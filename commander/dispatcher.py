"""Publish queued commands, resend them until acknowledged, record replies, expire the stale.

One loop, one database connection (role kota_commander), one persistent MQTT session on the ingest listener
(account kota-commander: write command topics, read reply topics). A command is *sent* once the
broker has acknowledged it (PUBACK), and is published again every `resend_after_s` until the device
acknowledges it or its TTL passes: a device that was offline gets it when it is back. (The broker
cannot say whether the device is subscribed: see kota.commands.record_published.)

Replies come from a paho thread into a bounded queue and are recorded here. Whatever a device sends,
the reply is recorded or refused with a stable reason (kota.commands.ReplyReason) and logged; the
loop goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from commander.settings import CommanderSettings
from kota import commands
from kota.contract import REPLY_TOPICS, escaped, parse_reply_topic
from kota.settings import StackSettings

log = logging.getLogger("kota.commander")


def handle_reply(conn: psycopg.Connection, topic: str, payload: bytes) -> commands.Status | commands.ReplyReason:
    """Record one reply from the broker, or say why it is refused. Never raises for what a device
    sends (only for the database)."""
    where = parse_reply_topic(topic)
    if where is None:
        return commands.ReplyReason.BAD_TOPIC
    reply = commands.parse_reply(payload)
    if isinstance(reply, commands.ReplyReason):
        return reply
    return commands.apply_reply(conn, where[2], reply)


class Commander:
    """The MQTT side: a connected client, PUBACK reasons by message id, and the replies received."""

    def __init__(self, stack: StackSettings, settings: CommanderSettings) -> None:
        self.settings = settings
        self.replies: queue.Queue[tuple[str, bytes]] = queue.Queue(settings.max_pending_replies)
        self.dropped = 0
        self.arrived = threading.Event()  # a reply came: wakes the loop
        self._acks: dict[int, int] = {}
        self._acked = threading.Condition()
        # MQTT 3.1.1 with a persistent session, as the gateways: Mosquitto 2.0.11 aborted
        # (will_delay.c: `delay_list != NULL`) when this client came back as MQTT 5 with a session
        # expiry, taking the broker down with it.
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=settings.client_id, protocol=mqtt.MQTTv311, clean_session=False
        )
        password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
        self.client.username_pw_set(settings.mqtt_username, password)
        self.client.reconnect_delay_set(1, 5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect_async(stack.mqtt_host, stack.mqtt_ingest_port, keepalive=30)

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        if reason.is_failure:
            log.warning("broker refused the commander: %s", reason)
            return
        client.subscribe(REPLY_TOPICS, qos=1)
        log.info("MQTT connected; subscribed to %s", REPLY_TOPICS)

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        try:
            self.replies.put_nowait((message.topic, bytes(message.payload)))
            self.arrived.set()
        except queue.Full:
            self.dropped += 1  # the device's next reply (to the resend) will do

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, reason: ReasonCode, _p: object) -> None:
        with self._acked:
            self._acks[mid] = reason.value
            self._acked.notify_all()

    def publish(self, topic: str, payload: bytes) -> int | None:
        """Publish at QoS 1 and wait for the PUBACK: its reason code, or None without one."""
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        with self._acked:
            self._acked.wait_for(lambda: info.mid in self._acks, timeout=self.settings.publish_timeout_s)
            return self._acks.pop(info.mid, None)

    def start(self) -> None:
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


_last_logged: dict[str, float] = {}
LOG_EVERY_S = 10.0


def _log_refusal(topic: str, reason: commands.ReplyReason, refused: Counter[str]) -> None:
    """One line per reason per LOG_EVERY_S, with the count so far: a device flooding its reply topic
    with garbage cannot flood the log."""
    now = time.monotonic()
    if now - _last_logged.get(reason.value, -LOG_EVERY_S) >= LOG_EVERY_S:
        _last_logged[reason.value] = now
        log.info("reply on %s refused: %s (%d so far)", escaped(topic, 200), reason.value, refused[reason.value])


def run_once(conn: psycopg.Connection, commander: Commander, refused: Counter[str]) -> int:
    """One round: expire, record replies, publish what is due. How much it did."""
    settings, actor = commander.settings, commander.settings.mqtt_username
    done = len(commands.expire_commands(conn, actor))
    while True:
        try:
            topic, payload = commander.replies.get_nowait()
        except queue.Empty:
            break
        try:
            outcome = handle_reply(conn, topic, payload)
        except psycopg.OperationalError:
            try:  # the database went away: keep the reply for the next connection
                commander.replies.put_nowait((topic, payload))
            except queue.Full:
                commander.dropped += 1
            raise
        except psycopg.Error as exc:  # a value the database refused (e.g. a NUL in the result): the device's fault
            log.warning("reply on %s not recorded: %s", escaped(topic, 200), exc)
            outcome = commands.ReplyReason.BAD_SHAPE
        done += 1
        if isinstance(outcome, commands.ReplyReason):
            refused[outcome.value] += 1
            _log_refusal(topic, outcome, refused)
    if commander.client.is_connected():
        for outgoing in commands.due_commands(conn, settings.resend_after_s):
            code = commander.publish(outgoing.topic, outgoing.payload)
            if code is None or (code >= 0x80):
                log.warning("publishing %s to %s: PUBACK %s", outgoing.command_id, outgoing.topic, code)
                continue
            commands.record_published(conn, outgoing, actor)
            done += 1
    return done


def run_commander(stack: StackSettings, settings: CommanderSettings, stop: threading.Event) -> None:
    commander = Commander(stack, settings)
    commander.start()
    refused: Counter[str] = Counter()
    try:
        while not stop.is_set():
            try:
                with psycopg.connect(stack.postgres_dsn, autocommit=True, connect_timeout=5) as conn:
                    log.info("database connected")
                    while not stop.is_set():
                        commander.arrived.clear()
                        if not run_once(conn, commander, refused):
                            commander.arrived.wait(settings.poll_s)  # a reply, or the next look at the table
            except psycopg.OperationalError as exc:
                log.warning("database: %s; reconnecting", exc)
                stop.wait(1.0)
    finally:
        commander.close()
        log.info("stopped; replies refused by reason: %s; dropped (queue full): %d", dict(refused), commander.dropped)
