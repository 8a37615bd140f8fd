"""Connecting to the platform's MQTT broker as a device, a gateway or the platform itself."""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

# MQTT 3.1.1 CONNECT, clean session, keepalive 5 s, client id "kota-health", no login. A CONNACK of
# any return code (0 accepted, 5 not authorised) proves the broker is up and speaking MQTT: health
# checks send it raw so they need no credentials and no client library.
HEALTH_CONNECT = bytes([0x10, 23, 0, 4]) + b"MQTT" + bytes([4, 0x02, 0, 5, 0, 11]) + b"kota-health"


def login_connect(client_id: str, username: str, password: str) -> bytes:
    """A raw MQTT 3.1.1 CONNECT with username and password (clean session, 10 s keep-alive)."""

    def field(text: str) -> bytes:
        raw = text.encode()
        return len(raw).to_bytes(2, "big") + raw

    body = field("MQTT") + bytes([4, 0xC2, 0, 10]) + field(client_id) + field(username) + field(password)
    assert len(body) < 128, "one-byte remaining length"
    return bytes([0x10, len(body)]) + body


def is_connack(reply: bytes) -> bool:
    return len(reply) >= 4 and reply[0] == 0x20


def connack_code(port: int, connect_packet: bytes, host: str = "127.0.0.1") -> int | None:
    """Send one raw CONNECT to the local broker; the CONNACK's return code, or None without one."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(connect_packet)
            reply = sock.recv(4)
            if not is_connack(reply):
                return None
            sock.sendall(b"\xe0\x00")  # DISCONNECT
            return reply[3]
    except OSError:
        return None


@dataclass(frozen=True)
class MqttLogin:
    """How to reach the broker and log in: port and host, password or TLS files."""

    port: int
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None  # TLS when set
    cert_file: str | None = None  # client certificate (mutual TLS)
    key_file: str | None = None
    host: str = "127.0.0.1"


def connect(
    login: MqttLogin, client_id: str, *, timeout_s: float = 15.0, clean_session: bool = True, max_queued: int = 0
) -> mqtt.Client:
    """Connect and wait for the broker's yes, retrying a refusal (a registry reload may be under way).
    With `max_queued`, publish() answers MQTT_ERR_QUEUE_SIZE while that many are unacknowledged."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=clean_session
    )
    client.max_queued_messages_set(max_queued)
    client.max_inflight_messages_set(200)
    client.reconnect_delay_set(1, 2)
    if login.username:
        client.username_pw_set(login.username, login.password)
    if login.ca_file:
        client.tls_set(
            ca_certs=login.ca_file,
            certfile=login.cert_file,
            keyfile=login.key_file,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    accepted = threading.Event()
    refusals: list[str] = []

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        if reason.is_failure:
            refusals.append(str(reason))
        else:
            accepted.set()

    client.on_connect = on_connect
    client.connect_async(login.host, login.port, keepalive=30)
    client.loop_start()
    if not accepted.wait(timeout_s):
        client.loop_stop()
        raise ConnectionError(
            f"MQTT broker on port {login.port} did not accept {login.username or 'the client'}: "
            f"{refusals[-1] if refusals else 'no answer'}"
        )
    return client
