"""Where each local service keeps its files under the state folder, owned by its user when run as root."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kota.settings import StackSettings

log = logging.getLogger("kota.stack")

IS_ROOT = os.geteuid() == 0


def service_dir(stack: StackSettings, name: str, user: str) -> Path:
    """The service's folder under the state folder, owned by `user` when we run as root.

    The service user must be able to reach it; if the state folder sits somewhere it cannot
    traverse (under /root, say), fall back to /var/lib/kotacerdas/ and say so.
    """
    path = stack.state_dir / name
    path.mkdir(parents=True, exist_ok=True)
    if not IS_ROOT:
        return path
    reachable = (
        subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(path)], capture_output=True).returncode == 0
    )
    if not reachable:
        digest = hashlib.sha256(str(stack.state_dir).encode()).hexdigest()[:10]
        path = Path("/var/lib/kotacerdas") / digest / name
        path.mkdir(parents=True, exist_ok=True)
        log.warning("user %s cannot reach %s; keeping %s data in %s", user, stack.state_dir, name, path)
    shutil.chown(path, user, user)
    return path


def mosquitto_dir(stack: StackSettings) -> Path:
    return service_dir(stack, "mosquitto", "mosquitto")


def kafka_dir(stack: StackSettings) -> Path:
    return stack.state_dir / "kafka"


@dataclass(frozen=True)
class PostgresPaths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"


def postgres_paths(stack: StackSettings) -> PostgresPaths:
    return PostgresPaths(service_dir(stack, "postgres", "postgres"))
