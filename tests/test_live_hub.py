"""The live feed's fan-out: filters, scope, and dropping a slow client without touching the others."""

from __future__ import annotations

import asyncio

from kota.settings import StackSettings
from ops_api.live import Filter, LiveHub


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
    assert len(await scoped.take()) == 2  # city a's reading and a's traffic reading, never city b's
    assert await one_device.take() == [b'{"type":"readings","city":"b","device_id":"d2"}',
                                       b'{"type":"alert","alert_id":1}']
    assert await traffic.take() == [b'{"type":"readings","city":"a","device_id":"d3"}']
    assert await alerts_only.take() == [b'{"type":"alert","alert_id":1}']


async def test_a_slow_client_is_dropped_with_a_reason_and_its_memory_freed():
    hub = _hub(capacity=3)
    slow, fast = hub.subscribe(Filter(None)), hub.subscribe(Filter(None))
    for i in range(5):
        _reading(hub, "a", f"d{i}")
        assert len(await fast.take()) == 1  # the fast client keeps up and is never affected
    assert slow.dropped == "slow client: more than 3 events waiting; reconnect and read faster"
    assert len(slow.pending) == 0
    assert await slow.take() is None
    assert fast.dropped is None


async def test_a_waiting_client_wakes_when_it_is_dropped():
    hub = _hub(capacity=1)
    client = hub.subscribe(Filter(None, cities=frozenset({"x"})))
    waiting = asyncio.create_task(client.take())
    await asyncio.sleep(0)
    client.offer(b"1")
    assert await waiting == [b"1"]
    client.offer(b"2")
    client.offer(b"3")  # over capacity while nobody reads
    assert await asyncio.wait_for(client.take(), 1) is None
    hub.unsubscribe(client)
    assert hub.clients == 0
