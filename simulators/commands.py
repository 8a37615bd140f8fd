"""The simulated devices obey commands (kota/commands.py), as a device's firmware would.

Each command is taken from the device's command topic (through the city's gateway connection, which
may read the command topics of the devices bound to it), acknowledged ("received") on the device's
reply topic, carried out, and answered ("succeeded" or "failed"). A command id seen before is not
carried out again: its first answer is sent again (the commander resends until it hears one).

What a command changes shows in the device's next readings: a street light switched off reports
powerState 0 and draws 0 W; dimmed, it draws that share of its power; a siren sounding reports
sirenState 1; `set_interval` makes the device report at most every that many seconds.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any

from kota.contract import device_command_topic, device_reply_topic
from kota.registry import Device

log = logging.getLogger("kota.simulator")
FULL_POWER_W = 120.0
REMEMBERED_IDS = 10_000


class DeviceCommands:
    """The command state of a simulated city's devices; thread-safe (commands arrive on paho's thread)."""

    def __init__(self, devices: list[Device]) -> None:
        self._devices = {d.device_id: d for d in devices}
        self._by_topic = {device_command_topic(d.city, d.domain, d.device_id): d for d in devices}
        self._lock = threading.Lock()
        self._light_level: dict[str, float] = {}  # street light → percent of full power (0: off)
        self._siren: dict[str, float] = {}
        self._interval_ms: dict[str, int] = {}
        self._last_report_ms: dict[str, int] = {}
        self._answers: OrderedDict[str, bytes] = OrderedDict()  # command id → its final answer
        self._outbox: list[tuple[str, bytes]] = []

    def topics(self) -> list[str]:
        return list(self._by_topic)

    def receive(self, topic: str, payload: bytes) -> None:
        device = self._by_topic.get(topic)
        try:
            body = json.loads(payload)
            command_id, name, params = str(body["id"]), str(body["command"]), dict(body.get("params") or {})
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignored a command that is not one on %s", topic)
            return
        if device is None:
            return
        reply_topic = device_reply_topic(device.city, device.domain, device.device_id)
        with self._lock:
            if command_id in self._answers:  # a resend: answer again, do not run it twice
                self._outbox.append((reply_topic, self._answers[command_id]))
                return
            self._outbox.append((reply_topic, _reply(command_id, "received")))
            result, error = self._carry_out(device, name, params)
            answer = _reply(command_id, "failed" if error else "succeeded", result=result, error=error)
            self._answers[command_id] = answer
            while len(self._answers) > REMEMBERED_IDS:
                self._answers.popitem(last=False)
            self._outbox.append((reply_topic, answer))
        log.info("%s: %s %s -> %s", device.device_id, name, params, error or result)

    def _carry_out(self, device: Device, name: str, params: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        kind, who = device.device_type, device.device_id
        try:
            if name == "set_interval":
                self._interval_ms[who] = int(float(params["seconds"]) * 1000)
                return {"interval_s": self._interval_ms[who] / 1000}, None
            if kind == "street_light" and name in ("on", "off", "dim"):
                level = {"on": 100.0, "off": 0.0}.get(name)
                self._light_level[who] = float(params["level"]) if level is None else level
                return {"powerState": 1 if self._light_level[who] > 0 else 0, "level": self._light_level[who]}, None
            if kind == "flood_siren" and name in ("sound", "stop"):
                self._siren[who] = 1.0 if name == "sound" else 0.0
                return {"sirenState": int(self._siren[who])}, None
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # 1e400 is infinity
            return None, f"bad parameters: {exc}"
        return None, f"a {kind} does not obey {name!r}"

    def adjust(self, device: Device, ts_ms: int, values: dict[str, float]) -> dict[str, float] | None:
        """The device's values as its commands leave them, or None when its interval skips this tick."""
        who = device.device_id
        with self._lock:
            interval = self._interval_ms.get(who)
            if interval is not None:
                last = self._last_report_ms.get(who)
                if last is not None and ts_ms - last < interval:
                    return None
                self._last_report_ms[who] = ts_ms
            level = self._light_level.get(who)
            siren = self._siren.get(who)
        if level is not None and "powerConsumption" in values:
            natural = values["powerConsumption"] if values.get("powerState") == 1.0 else FULL_POWER_W
            values = {**values, "powerState": 1.0 if level > 0 else 0.0, "powerConsumption": natural * level / 100}
        if siren is not None and "sirenState" in values:
            values = {**values, "sirenState": siren}
        return values

    def take_replies(self) -> list[tuple[str, bytes]]:
        with self._lock:
            out, self._outbox = self._outbox, []
        return out


def _reply(command_id: str, status: str, *, result: dict[str, Any] | None = None, error: str | None = None) -> bytes:
    body: dict[str, Any] = {"id": command_id, "status": status}
    if result is not None:
        body["result"] = result
    if error is not None:
        body["error"] = error
    return json.dumps(body, separators=(",", ":")).encode()
