"""ISPU, Indonesia's air-quality index (Permen LHK P.14/2020), from concentrations in ug/m3.

Sub-index by linear interpolation inside the band that holds the concentration X:
    I = (Ia - Ib) / (Xa - Xb) * (X - Xb) + Ib
The station's ISPU is the largest sub-index; that pollutant is the critical one. Above the top
band the index is reported as "> 500", not extrapolated. Breakpoints: ../shared/docs/domain.md.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

# ISPU band edges, and each pollutant's concentration at those edges (ug/m3).
ISPU_EDGES = (0.0, 50.0, 100.0, 200.0, 300.0, 500.0)
CONCENTRATION_EDGES: dict[str, tuple[float, ...]] = {
    "pm10": (0.0, 50.0, 150.0, 350.0, 420.0, 500.0),
    "pm25": (0.0, 15.5, 55.4, 150.4, 250.4, 500.0),
    "so2": (0.0, 52.0, 180.0, 400.0, 800.0, 1200.0),
    "co": (0.0, 4000.0, 8000.0, 15000.0, 30000.0, 45000.0),
    "o3": (0.0, 120.0, 235.0, 400.0, 800.0, 1000.0),
    "no2": (0.0, 80.0, 200.0, 1130.0, 2260.0, 3000.0),
    "hc": (0.0, 45.0, 100.0, 215.0, 432.0, 648.0),
}
POLLUTANTS = tuple(CONCENTRATION_EDGES)


@dataclass(frozen=True, slots=True)
class Category:
    name: str  # as published: Baik, Sedang, Tidak Sehat, Sangat Tidak Sehat, Berbahaya
    name_en: str
    colour: str  # the official colour's name in Indonesian
    hex: str  # for maps and panels
    upper: float  # the highest (rounded) ISPU in this category


CATEGORIES = (
    Category("Baik", "Good", "hijau", "#2e9d48", 50),
    Category("Sedang", "Moderate", "biru", "#1f6fd1", 100),
    Category("Tidak Sehat", "Unhealthy", "kuning", "#f2c200", 200),
    Category("Sangat Tidak Sehat", "Very unhealthy", "merah", "#d7263d", 300),
    Category("Berbahaya", "Hazardous", "hitam", "#111111", math.inf),
)


def sub_index(pollutant: str, concentration: float) -> float | None:
    """The pollutant's ISPU sub-index; inf above the top band ("> 500"); None without a value."""
    if concentration is None or not math.isfinite(concentration) or concentration < 0:
        return None
    edges = CONCENTRATION_EDGES[pollutant]
    if concentration > edges[-1]:
        return math.inf
    band = max(1, bisect.bisect_left(edges, concentration))
    xb, xa = edges[band - 1], edges[band]
    ib, ia = ISPU_EDGES[band - 1], ISPU_EDGES[band]
    return (ia - ib) / (xa - xb) * (concentration - xb) + ib


def category(ispu: float) -> Category:
    """The category of a (rounded) ISPU value."""
    value = round(ispu) if math.isfinite(ispu) else ispu
    return next(c for c in CATEGORIES if value <= c.upper)


@dataclass(frozen=True, slots=True)
class StationIspu:
    value: float  # inf means "> 500"
    critical: str  # the pollutant with the largest sub-index
    category: Category
    sub_indices: dict[str, float]

    @property
    def label(self) -> str:
        return "> 500" if math.isinf(self.value) else str(round(self.value))


def station_ispu(concentrations: dict[str, float]) -> StationIspu | None:
    """ISPU of a station from its concentrations (any subset of POLLUTANTS); None if none is usable."""
    subs = {p: s for p, c in concentrations.items() if p in CONCENTRATION_EDGES and (s := sub_index(p, c)) is not None}
    if not subs:
        return None
    critical = max(subs, key=lambda p: subs[p])
    return StationIspu(subs[critical], critical, category(subs[critical]), subs)
