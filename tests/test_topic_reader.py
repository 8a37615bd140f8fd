"""Reading a topic without a group (ops_api/topic_reader.py) outlives its failures: a consumer that
cannot even be built (no Kafka secret yet) is retried, not a task that dies in silence, and each
user of it hears that it lost its place."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kota.settings import StackSettings
from ops_api.live import Filter, LiveHub
from ops_api.rejections import RecentRejections, RejectionReader
from ops_api.topic_reader import TopicReader


def _without_kafka_secret(tmp_path: Path) -> StackSettings:
    stack = StackSettings(state_dir=tmp_path, kafka_password=None)
    assert stack.kafka_password is None
    return stack


async def _until(check, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.01)


async def test_a_consumer_that_cannot_be_built_is_retried_and_each_failure_lets_go(tmp_path):
    lost: list[int] = []
    reader = TopicReader(
        _without_kafka_secret(tmp_path),
        "kota.readings",
        place=lambda consumer, partitions: asyncio.sleep(0),
        take=lambda batches: None,
        lost=lambda: lost.append(1),
        retry_s=0.01,
    )
    task = asyncio.create_task(reader.run())
    await _until(lambda: reader.failures >= 3)
    assert not task.done(), "the reader is still trying"
    assert len(lost) >= 3 and reader.consumer is None
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_the_live_feed_keeps_trying_and_says_it_is_not_live(tmp_path):
    hub = LiveHub(_without_kafka_secret(tmp_path), queue_events=10)
    subscriber = hub.subscribe(Filter(None))  # wants readings: the Kafka reader starts
    try:
        await _until(lambda: hub._readings is not None and hub._readings.failures >= 1)
        assert not await hub.live_for(subscriber.filter, timeout_s=0.2)
        assert hub._reader is not None and not hub._reader.done()  # before: died at its first line
    finally:
        hub.unsubscribe(subscriber)
        await hub.stop()


async def test_the_rejections_reader_says_it_is_unavailable_and_keeps_trying(tmp_path):
    reader = RejectionReader(_without_kafka_secret(tmp_path), RecentRejections(), window_s=60)
    await reader.start()
    try:
        await _until(lambda: reader.state == "unavailable")
        assert reader._task is not None and not reader._task.done()
    finally:
        await reader.stop()


class _AtTheEnd:
    """Just enough of a consumer for placing a reader at the end of its partitions."""

    async def seek_to_end(self, *partitions) -> None:
        return None

    async def position(self, partition) -> int:
        return 0


async def test_a_cancelled_readers_late_words_do_not_speak_for_the_next_one(tmp_path):
    hub = LiveHub(_without_kafka_secret(tmp_path), queue_events=10, kafka_enabled=False)
    old = hub._new_reader()
    new = hub._new_reader()  # the last client left and the next came before the old task let go
    await new._place(_AtTheEnd(), set())
    assert hub._positioned.is_set()
    old._lost()  # the old task's cleanup runs late
    await old._place(_AtTheEnd(), set())
    assert hub._positioned.is_set() and hub._readings is new
    new._lost()
    assert not hub._positioned.is_set()
