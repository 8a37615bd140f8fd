"""One log format for every kota process, API worker processes included."""

from __future__ import annotations

import logging


def setup_logging(tag: str | None = None) -> None:
    """`tag` names the process among its siblings in a shared log (a processor worker's number)."""
    where = f" [{tag}]" if tag else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the API's processor watch: a line every 5 s
