"""Migrations against the real PostgreSQL of the test stack (plain-PostgreSQL path)."""

import datetime as dt

import psycopg
import pytest

from kota.registry import new_device, registry_version, set_enabled, upsert_devices
from kota.schema import discover_migrations, ensure_partitions, migrate, partition_name, storage_backend
from tests.helpers import unique_id

pytestmark = pytest.mark.stack


def test_migrations_are_idempotent_and_recorded(stack):
    backend, applied = migrate(stack.postgres_dsn)  # the fixture migrated already
    assert applied == []
    with psycopg.connect(stack.postgres_dsn) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == [m.version for m in discover_migrations()]
        assert storage_backend(conn) == backend


def test_plain_postgres_readings_are_range_partitioned_by_day_ahead(stack):
    with psycopg.connect(stack.postgres_dsn) as conn:
        if storage_backend(conn) != "postgres":
            pytest.skip("this database has TimescaleDB")
        strategy = conn.execute(
            "SELECT partstrat FROM pg_partitioned_table WHERE partrelid = 'readings'::regclass"
        ).fetchone()
        assert strategy == ("r",)
        children = {
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'readings'::regclass"
            )
        }
    today = dt.datetime.now(dt.UTC).date()
    assert {partition_name(today + dt.timedelta(days=d)) for d in range(8)} <= children
    assert "readings_default" in children


def test_reading_lands_in_its_day_partition(stack):
    day = dt.date(2031, 1, 15)
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        ensure_partitions(conn, day)
        conn.execute(
            "INSERT INTO readings VALUES ('2031-01-15 10:00Z', 'schema-test', 'pm25', 1, now()) ON CONFLICT DO NOTHING"
        )
        where = conn.execute("SELECT tableoid::regclass::text FROM readings WHERE device_id = 'schema-test'").fetchone()
        conn.execute("DELETE FROM readings WHERE device_id = 'schema-test'")
    assert where == (partition_name(day),)


def test_registry_version_changes_when_a_change_commits_even_if_it_started_before_a_newer_one(stack):
    """A gateway polls registry_version and reads the registry again when it changed. A change that
    began before the poll and committed after it must still change the version; with "max(updated_at)"
    it did not when another device's updated_at was newer (updated_at is the transaction's start)."""
    newer, changed = unique_id("regver-newer"), unique_id("regver-changed")
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        upsert_devices(conn, [new_device(newer, "regverkota", "noise"), new_device(changed, "regverkota", "noise")])
        # Another device changed later than the change below will have started.
        conn.execute("UPDATE devices SET updated_at = now() + interval '1 hour' WHERE device_id = %s", (newer,))
    with psycopg.connect(stack.postgres_dsn) as writer, psycopg.connect(stack.postgres_dsn, autocommit=True) as poller:
        set_enabled(writer, changed, False)  # begun, not yet committed
        before = registry_version(poller)
        writer.commit()
        after = registry_version(poller)
        assert after != before, "the disabled device would stay enabled in every gateway's cache"
        assert registry_version(poller) == after, "nothing changed since: no reason to read the registry again"
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM devices WHERE device_id = ANY(%s)", ([newer, changed],))
        assert registry_version(conn) != after, "a removed device is a change too"


def test_detector_checkpoints_are_stored_uncompressed(stack):
    # Compressing a checkpoint's float arrays gained little and made each one hold up its batch for
    # 3-4x as long (bench/checkpoints.py); migration 0007 turns it off for that column alone.
    with psycopg.connect(stack.postgres_dsn) as conn:
        storage = dict(
            conn.execute(
                "SELECT attname, attstorage FROM pg_attribute "
                "WHERE attrelid = 'detector_checkpoints'::regclass AND attname IN ('state', 'series')"
            ).fetchall()
        )
    assert storage == {"state": "e", "series": "x"}  # e: external, uncompressed; x: extended, the default
