"""The live feed's fan-out: filters, scope, and dropping a slow client without touching the others."""

from __future__ import annotations

import asyncio
import json

from kota.settings import StackSettings
from ops_api.live import Filter, Frame, LiveHub, frame_events, frame_text


def _hub(capacity: int = 3) -> LiveHub:
    return LiveHub(StackSettings(), queue_events=capacity, kafka_enabled=False)


def _reading(hub: LiveHub, city: str, device_id: str = "d1", domain: str = "environment") -> None:
    hub.publish("readings", city, domain, device_id, {"type": "readings", "city": city, "device_id": device_id})


async def test_each_client_gets_only_what_its_filter_and_scope_allow():
    hub = _hub(capacity=100)
    scoped = hub.subscribe(Filter(frozenset({"a"})))
    one_device = hub.subscribe(Filter(None, devices=frozenset({"d2"})))
    traffic = hub.subscribe(Filter(None, domains=frozenset({"traffic"})))
    alerts_only = hub.subscribe(Filter(None, types=frozenset({"alert"})))
    _reading(hub, "a", "d1")
    _reading(hub, "b", "d2")
    _reading(hub, "a", "d3", domain="traffic")
    hub.publish("alert", "b", "environment", "d2", {"type": "alert", "alert_id": 1})
    assert len(frame_events(await scoped.take())) == 2  # city a's reading and its traffic reading, never b's
    assert frame_events(await one_device.take()) == [
        b'{"type":"readings","city":"b","device_id":"d2"}',
        b'{"type":"alert","alert_id":1}',
    ]
    assert frame_events(await traffic.take()) == [b'{"type":"readings","city":"a","device_id":"d3"}']
    assert frame_events(await alerts_only.take()) == [b'{"type":"alert","alert_id":1}']


async def test_clients_with_one_filter_share_each_frame_and_a_fetch_is_one_frame():
    hub = _hub(capacity=100)
    watchers = [hub.subscribe(Filter(frozenset({"a"}), cities=frozenset({"a"}))) for _ in range(3)]
    other = hub.subscribe(Filter(frozenset({"a"}), devices=frozenset({"d2"})))
    for device in ("d1", "d2", "d3"):  # what one Kafka fetch brings: collected, then flushed once
        hub._collect("readings", "a", "environment", device, {"device_id": device})
    hub._collect("readings", "b", "environment", "d9", {"device_id": "d9"})  # outside everyone's scope
    hub.flush()
    frames = [await w.take() for w in watchers]
    assert all(len(f) == 1 and f[0] is frames[0][0] for f in frames)  # one frame object, sent to all three
    assert frame_text(frames[0]) == '[{"device_id":"d1"},{"device_id":"d2"},{"device_id":"d3"}]'
    assert frame_events(await other.take()) == [b'{"device_id":"d2"}']
    hub.flush()  # nothing collected: nobody is woken with an empty frame
    assert all(not w.pending for w in watchers)


async def test_a_client_behind_by_several_frames_gets_them_as_one_json_array():
    hub = _hub(capacity=100)
    client = hub.subscribe(Filter(None))
    _reading(hub, "a", "d1")
    _reading(hub, "a", "d2")
    frames = await client.take()
    assert len(frames) == 2
    assert json.loads(frame_text(frames)) == [
        {"type": "readings", "city": "a", "device_id": "d1"},
        {"type": "readings", "city": "a", "device_id": "d2"},
    ]


async def test_a_slow_client_is_dropped_with_a_reason_and_its_memory_freed():
    hub = _hub(capacity=3)
    slow, fast = hub.subscribe(Filter(None)), hub.subscribe(Filter(None))
    for i in range(5):
        _reading(hub, "a", f"d{i}")
        assert len(frame_events(await fast.take())) == 1  # the fast client keeps up and is never affected
    assert slow.dropped == "slow client: more than 3 events waiting; reconnect and read faster"
    assert len(slow.pending) == 0
    assert await slow.take() is None
    assert fast.dropped is None


async def test_a_waiting_client_wakes_when_it_is_dropped():
    hub = _hub(capacity=1)
    client = hub.subscribe(Filter(None, cities=frozenset({"x"})))
    waiting = asyncio.create_task(client.take())
    await asyncio.sleep(0)
    client.offer(Frame([b"1"]))
    assert frame_events(await waiting) == [b"1"]
    client.offer(Frame([b"2"]))
    client.offer(Frame([b"3"]))  # over capacity while nobody reads
    assert await asyncio.wait_for(client.take(), 1) is None
    hub.unsubscribe(client)
    assert hub.clients == 0
