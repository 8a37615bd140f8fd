"""Reading the components' Prometheus endpoints, with prometheus_client's own text parser."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[str, float]:
    """Each sample name (`…_total` for a counter) with its value, summed over its label sets."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def scrape(port: int, host: str = "127.0.0.1", timeout_s: float = 5.0) -> dict[str, float]:
    """The samples a component's /metrics endpoint shows now."""
    return samples(httpx.get(f"http://{host}:{port}/metrics", timeout=timeout_s).text)
