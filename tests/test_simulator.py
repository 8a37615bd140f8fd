import numpy as np

from kota.contract import DOMAINS
from simulators.city import build_city, values_at


def test_same_seed_same_city_and_values():
    a, b = build_city("bandung", 40, seed=7), build_city("bandung", 40, seed=7)
    assert a.devices == b.devices
    ts = 1_795_000_000_000
    ra, rb = np.random.default_rng(7), np.random.default_rng(7)
    assert [values_at(d, ts, ra) for d in a.devices] == [values_at(d, ts, rb) for d in b.devices]


def test_city_covers_three_domains_and_requested_size():
    city = build_city("bandung", 36, seed=1)
    assert len(city.devices) == 36
    assert {d.domain for d in city.devices} == set(DOMAINS)
    assert len({d.device_id for d in city.devices}) == 36


def test_simulated_values_stay_inside_declared_ranges_over_a_day():
    city = build_city("bandung", 36, seed=3)
    rng = np.random.default_rng(3)
    start = 1_795_000_000_000
    for step in range(0, 24 * 60, 15):  # every 15 minutes for a day
        ts = start + step * 60_000
        for device in city.devices:
            for metric, value in values_at(device, ts, rng).items():
                spec = device.metrics[metric]
                assert spec.low <= value <= spec.high, (device.device_id, metric, value)
