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
