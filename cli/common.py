"""What every command group uses: how the command speaks, and the one log format."""

from __future__ import annotations

from kota.logs import setup_logging

__all__ = ["say", "setup_logging"]


def say(message: str) -> None:
    print(f"kota: {message}", flush=True)
