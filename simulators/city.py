"""A small simulated city: devices across districts, each with believable values.

Deterministic: the same seed gives the same devices and, for the same times and random
generator, the same values. Values follow a daily cycle (rush hours, night lows) and a weekly one
(weekends have no morning rush, a lighter evening one and busy late mornings), with sensor noise,
and a shared weather: afternoon showers wash pollution out of the air and, an hour or two later,
raise the water at every gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from kota.registry import Device, new_device

# Districts of a Bandung-like city, centred near (-6.91, 107.61).
DISTRICTS = [
    ("coblong", -6.887, 107.613),
    ("sukajadi", -6.884, 107.590),
    ("bandung-wetan", -6.905, 107.617),
    ("regol", -6.934, 107.606),
    ("kiaracondong", -6.925, 107.646),
    ("cicendo", -6.903, 107.584),
]

# Share of each device type in the simulated city.
MIX = [
    ("air_quality", 3),
    ("noise", 2),
    ("water_level", 2),
    ("traffic_corridor", 4),
    ("water_meter", 2),
    ("electricity_meter", 2),
    ("street_light", 3),
]


@dataclass(frozen=True)
class SimulatedCity:
    """A simulated city: its devices, where they are, and the seed its readings come from."""

    city: str
    devices: list[Device]
    seed: int

    @property
    def gateway_id(self) -> str:
        """The simulated city's devices all publish through this one gateway."""
        return f"{self.city}-sim-gateway"


def build_city(city: str = "bandung", n_devices: int = 36, seed: int = 1) -> SimulatedCity:
    rng = np.random.default_rng(seed)
    weights = np.array([w for _, w in MIX], dtype=float)
    counts = np.floor(weights / weights.sum() * n_devices).astype(int)
    counts[np.argsort(-weights)[: n_devices - counts.sum()]] += 1  # hand out the remainder
    devices = []
    for (device_type, _), count in zip(MIX, counts, strict=True):
        for i in range(count):
            district, lat, lon = DISTRICTS[int(rng.integers(len(DISTRICTS)))]
            devices.append(
                new_device(
                    f"{city}-{device_type.replace('_', '-')}-{i + 1:03d}",
                    city,
                    device_type,
                    district=district,
                    lat=round(lat + float(rng.normal(0, 0.006)), 5),
                    lon=round(lon + float(rng.normal(0, 0.006)), 5),
                    gateway_id=f"{city}-sim-gateway",
                )
            )
    return SimulatedCity(city, devices, seed)


def _daily(hour: float, peak: float, width: float = 2.5) -> float:
    """A smooth bump around `peak` o'clock, 0..1."""
    d = min(abs(hour - peak), 24 - abs(hour - peak))
    return math.exp(-((d / width) ** 2))


DAY_MS = 86_400_000
WIB_MS = 7 * 3_600_000  # Western Indonesian Time, UTC+7
SHOWER_RAMP_H = 0.25
# Siaga 3 at a gate: the domain rules' default threshold (../shared/docs/domain.md; the processor's
# RulePolicy.siaga3_cm). A shower that takes a gate's water over it is a real Siaga 3, which the
# simulator labels as it labels the anomalies it injects (`rain_over_siaga`).
SIAGA3_CM = 80.0
GATE_NOISE_CM = 1.0  # a gate sensor's noise (standard deviation)


@lru_cache(maxsize=64)
def _showers(seed: int, day: int) -> tuple[tuple[float, float, float], ...]:
    """The showers of one local day: (start hour, length in hours, intensity 0..1). Most days in
    the wet season have one in the afternoon; some have none."""
    rng = np.random.default_rng([seed, 0x5241494E, day])  # "RAIN": a stream of its own
    if rng.random() < 0.35:
        return ()
    return ((float(rng.uniform(13, 17)), float(rng.uniform(1, 3)), float(rng.uniform(0.3, 1.0))),)


def weather(seed: int, ts_ms: int) -> tuple[float, float]:
    """(rain now 0..1, wetness 0..~1.5): wetness is the rain of the past hours, peaking about
    1.5 h after a shower, which is how the gates' water follows it."""
    local = ts_ms + WIB_MS
    day, hour = divmod(local, DAY_MS)
    hour_now = hour / 3_600_000
    rain = wet = 0.0
    for back in (0, 1):
        for start, length, intensity in _showers(seed, int(day) - back):
            since_start = hour_now + 24 * back - start
            if 0 <= since_start <= length:
                # Rain builds up and eases off over a quarter of an hour, as a shower does, rather
                # than washing half the city's dust out of the air within one minute.
                ramp = min(1.0, since_start / SHOWER_RAMP_H, (length - since_start) / SHOWER_RAMP_H)
                rain = max(rain, intensity * ramp)
            since_end = since_start - length / 2  # the response to the shower's middle
            if since_end > 0:
                wet += intensity * length / 2 * (since_end / 1.5) * math.exp(1 - since_end / 1.5)
    return rain, wet


def gate_level(ts_ms: int, wet: float) -> float:
    """A flood gate's water level (cm) without its sensor's noise: a slow swell, and the rain of the
    past hours (`weather`'s wetness)."""
    return 60 + 10 * math.sin(ts_ms / 3_600_000 / 6) + 30 * wet


def rain_over_siaga(seed: int, start_ms: int, end_ms: int, step_ms: int) -> list[tuple[int, int]]:
    """The spans [first, last) of [start_ms, end_ms), on a grid of `step_ms`, in which the rain takes
    the city's gates over Siaga 3 (every gate shares the weather and the swell). A span runs while
    a reading may show it (the level within three sensor noises of the threshold) and is kept
    where the level comes within two: over the dozens of readings near its peak, some then show
    it over the threshold, and the gate's Siaga 3 is raised, rightly as far as anyone can tell."""
    spans: list[tuple[int, int]] = []
    first: int | None = None
    peak = -math.inf
    for t in range(start_ms, end_ms + step_ms, step_ms):
        level = gate_level(t, weather(seed, t)[1]) if t < end_ms else -math.inf
        if level > SIAGA3_CM - GATE_NOISE_CM * 3:
            first = t if first is None else first
            peak = max(peak, level)
        elif first is not None:
            if peak > SIAGA3_CM - GATE_NOISE_CM * 2:
                spans.append((first, min(t, end_ms)))
            first, peak = None, -math.inf
    return spans


def is_weekend(ts_ms: int) -> bool:
    """Saturday or Sunday, local time (WIB)."""
    return (int((ts_ms + WIB_MS) // DAY_MS) + 3) % 7 >= 5  # 1970-01-01 was a Thursday (3, Monday 0)


def values_at(device: Device, ts_ms: int, rng: np.random.Generator, seed: int = 1) -> dict[str, float]:
    """Believable values for one device at one time (local time WIB = UTC+7) in the weather of
    the city with this seed."""
    hour = ((ts_ms / 3_600_000) + 7) % 24
    rain, wet = weather(seed, ts_ms)
    weekend = is_weekend(ts_ms)
    if weekend:  # no commute: a light evening rush, and errands and outings late in the morning
        rush = max(0.6 * _daily(hour, 18.0), 0.5 * _daily(hour, 11.0, 3.0))
    else:
        rush = max(_daily(hour, 7.5), _daily(hour, 17.5))
    night = _daily(hour, 2.0, 4.0)
    noise = rng.normal
    t = device.device_type
    if t == "air_quality":
        # Rush hours take PM2.5 to the top of Sedang (an hourly mean near 52 ug/m3), not over: in the
        # simulated city an unhealthy hour is a labelled pollution episode, so a scorecard can judge
        # the ISPU alert. (At 35, rush hours crossed into Tidak Sehat twice a day: ten correct but
        # unlabelled alerts a day. Real bad air is in the Jakarta recordings, for `kota replay`.)
        pm25 = max(1.0, (25 + 27 * rush) * (1 - 0.5 * rain) + noise(0, 3))
        return {
            "pm25": pm25,
            "pm10": pm25 * 1.6 + noise(0, 3),
            "no2": max(1, 30 + 50 * rush + noise(0, 4)),
            "o3": max(1, 40 + 60 * _daily(hour, 13, 3) + noise(0, 4)),
            "co": max(50, 900 + 1500 * rush + noise(0, 80)),
            "so2": max(1, 15 + 10 * rush + noise(0, 2)),
            "temperature": 23 + 7 * _daily(hour, 14, 4) + noise(0, 0.3),
            "relativeHumidity": min(100, 85 - 25 * _daily(hour, 14, 4) + noise(0, 2)),
        }
    if t == "noise":
        laeq = 48 + 22 * rush + 8 * (1 - night) + 4 * rain + noise(0, 1.5)
        return {"LAeq": laeq, "LAmax": laeq + 12 + abs(noise(0, 3))}
    if t == "water_level":
        return {"currentLevel": max(0, gate_level(ts_ms, wet) + noise(0, GATE_NOISE_CM))}
    if t == "traffic_corridor":
        occupancy = min(0.95, max(0.02, 0.12 + 0.6 * rush + noise(0, 0.03)))
        return {
            "occupancy": occupancy,
            "averageVehicleSpeed": max(3, 55 * (1 - occupancy) + noise(0, 2)),
            "intensity": max(0, 8 + 40 * rush - 6 * night + noise(0, 2)),
        }
    if t == "water_meter":
        morning = 8.5 if weekend else 6.5  # a later morning at weekends
        return {
            "waterConsumption": max(0, 2 + 3 * _daily(hour, morning) + 2 * _daily(hour, 19) + noise(0, 0.2)),
            "pressure": max(0.5, 3.2 - 0.8 * rush + noise(0, 0.05)),
        }
    if t == "electricity_meter":
        daytime = 35 if weekend else 20  # people at home by day at weekends
        power = max(0, 40 + 50 * _daily(hour, 19, 3) + daytime * _daily(hour, 13, 4) + noise(0, 3))
        return {"activePower": power, "activeEnergy": 1e5 + ts_ms / 3_600_000 * 60}
    if t == "street_light":
        on = 1.0 if hour >= 18 or hour < 6 else 0.0
        return {"powerState": on, "powerConsumption": max(0.0, on * 120 + noise(0, 2)) if on else 0.0}
    if t == "flood_siren":
        return {"sirenState": 0.0}  # silent unless a command sounds it (simulators/commands.py)
    raise ValueError(f"no simulation for device type {t!r}")
