"""The one database schema, applied by versioned migrations (`kota migrate`).

Migrations are SQL files in `kota/migrations/` named `NNNN_name.sql`. A migration may also have
a backend-specific part, `NNNN_name.postgres.sql` or `NNNN_name.timescaledb.sql`, applied right
after the common part. The backend is chosen once, when the first migration runs: TimescaleDB
if `CREATE EXTENSION timescaledb` succeeds, plain PostgreSQL otherwise. Later migrations follow
the backend recorded then.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psycopg

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
Backend = Literal["postgres", "timescaledb"]
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_ADVISORY_LOCK_ID = 0x6B6F7461  # "kota": one migrator at a time


@dataclass(frozen=True)
class Migration:
    """One numbered migration: its common SQL file and any backend-specific part."""

    version: int
    name: str
    common: Path
    variants: dict[str, Path]

    def sql_for(self, backend: Backend) -> list[str]:
        parts = [self.common.read_text()]
        if backend in self.variants:
            parts.append(self.variants[backend].read_text())
        return parts


def discover_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            continue  # a backend variant; picked up below
        version, name = int(match[1]), match[2]
        variants = {
            backend: variant
            for backend in ("postgres", "timescaledb")
            if (variant := path.with_name(f"{path.stem}.{backend}.sql")).exists()
        }
        migrations.append(Migration(version, name, path, variants))
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"migration versions must run 1..n without gaps, found {versions}")
    return migrations


def _detect_backend(conn: psycopg.Connection) -> Backend:
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        return "timescaledb"
    except psycopg.Error as exc:
        log.info(
            "timescaledb extension not available (%s); using native partitioning", str(exc).strip().splitlines()[0]
        )
        return "postgres"


def storage_backend(conn: psycopg.Connection) -> Backend:
    row = conn.execute("SELECT backend FROM schema_migrations WHERE version = 1").fetchone()
    if row is None:
        raise RuntimeError("database is not migrated: run `kota migrate`")
    backend: Backend = row[0]
    return backend


def migrate(dsn: str) -> tuple[Backend, list[int]]:
    """Apply pending migrations; return the backend and the versions applied now."""
    applied_now: list[int] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_ADVISORY_LOCK_ID,))
        try:
            conn.execute("""
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    version    integer PRIMARY KEY,
                    name       text NOT NULL,
                    backend    text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )""")
            done = {row[0]: row[1] for row in conn.execute("SELECT version, backend FROM schema_migrations")}
            backend: Backend = done[1] if 1 in done else _detect_backend(conn)
            for migration in discover_migrations():
                if migration.version in done:
                    continue
                with conn.transaction():
                    for sql in migration.sql_for(backend):
                        conn.execute(sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, backend) VALUES (%s, %s, %s)",
                        (migration.version, migration.name, backend),
                    )
                applied_now.append(migration.version)
                log.info("applied migration %04d_%s (%s)", migration.version, migration.name, backend)
            if backend == "postgres":
                ensure_partitions(conn, dt.datetime.now(dt.UTC).date(), days_ahead=7)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_ADVISORY_LOCK_ID,))
    return backend, applied_now


def partition_name(day: dt.date) -> str:
    return f"readings_p{day:%Y%m%d}"


def daily_partitions(conn: psycopg.Connection) -> dict[str, dt.date]:
    """The daily partitions of `readings` (named by `partition_name`) and their days."""
    names = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'readings'::regclass AND c.relname ~ '^readings_p[0-9]{8}$'"
    )
    return {name: dt.datetime.strptime(name.removeprefix("readings_p"), "%Y%m%d").date() for (name,) in names}


def ensure_partitions(conn: psycopg.Connection, first_day: dt.date, days_ahead: int = 0) -> list[str]:
    """Create daily partitions of `readings` from `first_day` for `days_ahead` more days.

    Plain-PostgreSQL path only. A partition whose range already has rows in the default
    partition cannot be attached; those rows stay where they are (still stored once), and the
    failure is logged rather than raised so ingestion never stops over it. Made by
    kota_create_readings_partition (migration 0011), which runs as the schema's owner: the
    processor, which calls this for the days its readings fall on, does not own `readings`.
    """
    created = []
    existing = daily_partitions(conn)
    for offset in range(days_ahead + 1):
        day = first_day + dt.timedelta(days=offset)
        name = partition_name(day)
        if name in existing:
            continue
        try:
            with conn.transaction():
                conn.execute("SELECT kota_create_readings_partition(%s)", (day,))
            created.append(name)
        except psycopg.errors.CheckViolation as exc:
            log.warning("partition %s not created, rows for that day stay in readings_default: %s", name, exc)
    return created
