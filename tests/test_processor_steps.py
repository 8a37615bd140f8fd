"""The processor's guard that its detectors see every record of a partition once, in order.

The consumer is a small recording stand-in: what is under test is the processor's decision on the
offsets it is handed, not Kafka (the kill -9 tests run that part against the real broker).
"""

from aiokafka import TopicPartition

from kota.contract import READINGS_TOPIC, Reading
from kota.settings import StackSettings
from processing.processor import PartitionState, Processor, new_detectors
from processing.settings import ProcessorSettings

TP = TopicPartition(READINGS_TOPIC, 2)


class RecordingConsumer:
    def __init__(self) -> None:
        self.seeks: list[tuple[TopicPartition, int]] = []

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


def _processor(detected_until: int | None) -> tuple[Processor, RecordingConsumer]:
    processor = Processor(stack=StackSettings(), settings=ProcessorSettings())
    consumer = RecordingConsumer()
    processor._consumer = consumer  # type: ignore[assignment]
    processor._partitions[TP.partition] = PartitionState(new_detectors(ProcessorSettings()), detected_until)
    return processor, consumer


def test_records_where_the_detectors_left_off_are_taken():
    processor, consumer = _processor(100)
    assert processor._in_step(TP, 100)
    assert consumer.seeks == []


def test_records_past_the_detectors_are_skipped_and_read_again_from_their_offset():
    # After a kill -9 the consumer resumed at the committed offset (500), not at the detector
    # checkpoint (100) the processor sought to on assignment.
    processor, consumer = _processor(100)
    assert not processor._in_step(TP, 500)
    assert consumer.seeks == [(TP, 100)]


def test_records_behind_the_detectors_are_skipped_too():
    processor, consumer = _processor(100)
    assert not processor._in_step(TP, 40)
    assert consumer.seeks == [(TP, 100)]


def test_records_that_retention_deleted_are_given_up_after_one_try():
    processor, consumer = _processor(100)
    assert not processor._in_step(TP, 500)
    assert processor._in_step(TP, 500)  # sought back once; Kafka starts at 500 now
    assert consumer.seeks == [(TP, 100)]


def test_a_partition_with_no_detector_position_takes_whatever_comes_first():
    processor, consumer = _processor(None)
    assert processor._in_step(TP, 7)
    assert consumer.seeks == []


def _readings(device: str, metric: str, minutes: range, source: str = "mqtt-json") -> list[Reading]:
    start = 1_796_000_000_000
    return [Reading(start + m * 60_000, "testkota", "utilities", device, metric, 3.0, "", 0, source) for m in minutes]


def _silences(batches: list[list[Reading]]) -> list[tuple[str, str]]:
    """The silences found while they last, batch by batch, with one record per reading."""
    processor = Processor(stack=StackSettings(), settings=ProcessorSettings())
    partition = PartitionState(new_detectors(ProcessorSettings()), None)
    found, offset = [], 0
    for readings in batches:
        rows = [(offset + i, r) for i, r in enumerate(readings)]
        offset += len(rows)
        partition.detectors.score_readings(readings, 0.0)
        found += [(a.device_id, a.metric) for a in processor._silences_in_event_time(0, partition, rows)]
    return found


def test_a_metric_sent_hours_ahead_of_another_of_its_device_does_not_make_that_one_silent():
    """A device that sends each metric in messages of its own: one metric's three hours arrive
    before the other's, and a batch ends inside the second. Only what came after a series' last
    record in the batch says it is silent."""
    ahead = _readings("meter", "pressure", range(0, 180))
    behind = _readings("meter", "waterConsumption", range(0, 180))
    assert _silences([ahead + behind[:60], behind[60:]]) == []


def test_a_metric_silent_while_later_records_of_its_device_go_on_is_a_dropout():
    both = [
        r
        for pair in zip(
            _readings("meter", "pressure", range(60)), _readings("meter", "waterConsumption", range(60)), strict=True
        )
        for r in pair
    ]
    assert _silences([both, _readings("meter", "pressure", range(60, 120))]) == [("meter", "waterConsumption")]


def test_a_record_naming_a_metric_as_a_relation_is_refused_whole():
    from processing.processor import poison
    from processing.store import UNDECODABLE

    def reading(metric: str) -> Reading:
        return Reading(1_764_000_000_000, "kota", "environment", "air-1", metric, 30.0, "ug/m3", 1_764_000_000_000, "x")

    assert poison([reading("pm25"), reading("pm10")]) is None
    reason, message = poison([reading("pm25"), reading("pm25~pm10")])
    assert reason == UNDECODABLE and "~" in message


class OffsetsConsumer:
    """Reports its assignment and a high watermark per partition, as aiokafka's consumer does."""

    def __init__(self, highwater: dict[int, int | None]) -> None:
        self._highwater = highwater

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(READINGS_TOPIC, p) for p in self._highwater}

    def highwater(self, tp: TopicPartition) -> int | None:
        return self._highwater[tp.partition]


def test_devices_are_silent_on_the_wall_clock_only_where_what_kafka_held_has_been_scored():
    """Each of four partitions holds a device whose last reading arrived ten minutes ago (usual
    interval a minute). At each check a partition counts as caught up when its detectors have scored
    up to the high watermark Kafka reported at the check before: a busy partition whose watermark
    moves on while the processor keeps up counts; one whose backlog has not been scored, or not
    fetched yet, does not. Only their devices wait."""
    processor = Processor(stack=StackSettings(), settings=ProcessorSettings())
    now_ms = 1_796_000_000_000.0
    scored_up_to = {0: 500, 1: 400, 2: 0, 3: 700}
    for partition_id, device in enumerate(("idle", "behind", "unfetched", "busy")):
        state = PartitionState(new_detectors(ProcessorSettings()), scored_up_to[partition_id])
        batch = state.detectors.score_readings(_readings(device, "waterConsumption", range(30)), now_ms - 600_000)
        assert batch.scores.size == 30
        processor._partitions[partition_id] = state
    processor._consumer = OffsetsConsumer({0: 500, 1: 900, 2: None, 3: 700})  # type: ignore[assignment]
    assert processor._caught_up() == set(), "the first check only notes where Kafka stood"
    # Ten seconds on: the busy partition got 50 readings more while it scored what was there before.
    processor._consumer = OffsetsConsumer({0: 500, 1: 900, 2: None, 3: 750})  # type: ignore[assignment]
    caught_up = processor._caught_up()
    assert caught_up == {0, 3}
    assert sorted(s.device_id for s in processor._timer_silences(now_ms, caught_up)) == ["busy", "idle"]
    assert processor._timer_silences(now_ms, caught_up) == [], "signalled once"
    # Once the backlog is scored, the device still silent is a dropout there too.
    processor._partitions[1].detected_until = 900
    assert [s.device_id for s in processor._timer_silences(now_ms, processor._caught_up())] == ["behind"]
    # A partition revoked from the consumer is not judged.
    processor._consumer = OffsetsConsumer({0: 500})  # type: ignore[assignment]
    assert processor._caught_up() == {0}
