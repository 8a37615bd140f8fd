"""The processor's guard that its detectors see every record of a partition once, in order.

The consumer is a small recording stand-in: what is under test is the processor's decision on the
offsets it is handed, not Kafka (the kill -9 tests run that part against the real broker).
"""

from aiokafka import TopicPartition

from kota.contract import READINGS_TOPIC
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
