from ingest.dedupe import RecentReadings


def test_a_repeat_is_seen_and_a_new_time_is_not():
    recent = RecentReadings(capacity=100)
    assert not recent.seen_before("d", "pm25", 1)
    assert recent.seen_before("d", "pm25", 1)
    assert not recent.seen_before("d", "pm25", 2)
    assert not recent.seen_before("d", "pm10", 1)
    assert not recent.seen_before("e", "pm25", 1)


def test_memory_is_bounded_but_keeps_the_latest_half():
    recent = RecentReadings(capacity=10)
    for ts in range(1000):
        assert not recent.seen_before("d", "m", ts)
    assert recent.seen_before("d", "m", 999)  # the newest are remembered
    assert recent.seen_before("d", "m", 995)
    assert not recent.seen_before("d", "m", 0)  # the oldest were forgotten: memory stayed bounded


def test_split_new_agrees_with_one_at_a_time():
    from kota.contract import Reading

    def reading(ts: int) -> Reading:
        return Reading(ts, "c", "environment", "d", "pm25", 1.0, "ug/m3", 0, "t")

    batch = [reading(ts) for ts in (1, 2, 1, 3, 2, 4)]
    new, duplicates = RecentReadings(capacity=4).split_new(batch)
    assert [r.ts_ms for r in new] == [1, 2, 3, 4]
    assert [r.ts_ms for r in duplicates] == [1, 2]
    one_by_one = RecentReadings(capacity=4)
    assert [one_by_one.seen_before("d", "pm25", r.ts_ms) for r in batch] == [False, False, True, False, True, False]
