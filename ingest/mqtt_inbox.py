"""paho-mqtt's network thread → a bounded queue. Nothing else happens on that thread.

The queue is the backpressure: when it is full (in messages or in payload bytes), `on_message`
blocks, paho stops reading the socket, unacknowledged messages stay with the broker (QoS 1,
persistent session), and memory stays flat. Messages are acknowledged by the asyncio side only after Kafka has them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One MQTT message as received, with what is needed to acknowledge it later."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    received_ms: int


class MqttInbox:
    """A persistent MQTT session (QoS 1, manual acknowledgements) feeding a queue bounded in messages
    and in payload bytes, which the asyncio side empties in batches and acknowledges after Kafka."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        topic_filter: str,
        maxsize: int,
        max_bytes: int = 64 * 1024 * 1024,
        username: str | None = None,
        password: str | None = None,
        drain: bool = False,
    ) -> None:
        if maxsize <= 0 or max_bytes <= 0:
            raise ValueError("maxsize and max_bytes must be positive: an unbounded inbox is no backpressure")
        self._topic_filter = topic_filter
        # Drain: take over a departed gateway's session only to empty it (see IngestGateway.drain).
        self._drain = drain
        self.unsubscribed = threading.Event()
        self._queue: deque[InboundMessage] = deque()
        self._maxsize, self._max_bytes = maxsize, max_bytes
        self._queued_bytes = 0
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self.connected = threading.Event()
        self._host, self._port = host, port
        self.client_id = client_id
        # Persistent session (clean_session=False) + QoS 1 + manual ack: the broker keeps
        # everything we have not acknowledged, across our crashes and restarts.
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        if username:
            self._client.username_pw_set(username, password)
        self._client.reconnect_delay_set(min_delay=1, max_delay=5)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_unsubscribe = lambda *_args: self.unsubscribed.set()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()

    def stop(self) -> None:
        self._stopping.set()
        self._client.disconnect()
        self._client.loop_stop()

    # -- paho's thread -------------------------------------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, _userdata: object, _flags: object, reason_code: ReasonCode, _props: object
    ) -> None:
        if reason_code.is_failure:
            log.error("MQTT %s:%s refused the connection: %s", self._host, self._port, reason_code)
            return
        if self._drain:
            # What the session holds still comes; nothing new is routed to it after this.
            client.unsubscribe(self._topic_filter)
            self.connected.set()
            log.info("MQTT connected to %s:%s to drain this session", self._host, self._port)
            return
        # Subscribe on every connect: peers lose subscriptions when the broker restarts
        # without persistence; re-subscribing is harmless when the session kept it.
        client.subscribe(self._topic_filter, qos=1)
        self.connected.set()
        log.info("MQTT connected to %s:%s, subscribed to %s", self._host, self._port, self._topic_filter)

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: object, _flags: object, reason_code: ReasonCode, _props: object
    ) -> None:
        self.connected.clear()
        if not self._stopping.is_set():
            log.warning("MQTT disconnected (%s); paho reconnects on its own", reason_code)

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        item = InboundMessage(msg.mid, msg.qos, msg.topic, bytes(msg.payload), time.time_ns() // 1_000_000)
        size = len(item.payload)
        with self._changed:
            # Backpressure: hold paho's thread until the asyncio side catches up. One message is always
            # let in, so a payload larger than max_bytes cannot block the inbox for good.
            while self._queue and (len(self._queue) >= self._maxsize or self._queued_bytes + size > self._max_bytes):
                if self._stopping.is_set():
                    return
                self._changed.wait(0.5)
            self._queue.append(item)
            self._queued_bytes += size
            self._changed.notify_all()

    # -- the asyncio side (called through asyncio.to_thread) -----------------------------------
    def take_batch(self, max_items: int, max_bytes: int, wait_s: float) -> list[InboundMessage]:
        """Up to `max_items` messages and `max_bytes` of payload (at least one message), waiting up to
        `wait_s` for the first."""
        with self._changed:
            if not self._queue:
                self._changed.wait(wait_s)
            if not self._queue:
                return []
            first = self._queue.popleft()
            batch, taken = [first], len(first.payload)
            while self._queue and len(batch) < max_items and taken + len(self._queue[0].payload) <= max_bytes:
                item = self._queue.popleft()
                batch.append(item)
                taken += len(item.payload)
            self._queued_bytes -= taken
            self._changed.notify_all()
        return batch

    def ack(self, messages: list[InboundMessage]) -> None:
        for m in messages:
            if m.qos > 0:
                self._client.ack(m.mid, m.qos)
