"""Migrations against the real PostgreSQL of the test stack (plain-PostgreSQL path)."""

import datetime as dt

import psycopg
import pytest

from kota.schema import discover_migrations, ensure_partitions, migrate, partition_name, storage_backend

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
        strategy = conn.execute("SELECT partstrat FROM pg_partitioned_table "
                                "WHERE partrelid = 'readings'::regclass").fetchone()
        assert strategy == ("r",)
        children = {r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'readings'::regclass")}
    today = dt.datetime.now(dt.UTC).date()
    assert {partition_name(today + dt.timedelta(days=d)) for d in range(8)} <= children
    assert "readings_default" in children


def test_reading_lands_in_its_day_partition(stack):
    day = dt.date(2031, 1, 15)
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        ensure_partitions(conn, day)
        conn.execute("INSERT INTO readings VALUES ('2031-01-15 10:00Z', 'schema-test', 'pm25', 1, now()) "
                     "ON CONFLICT DO NOTHING")
        where = conn.execute("SELECT tableoid::regclass::text FROM readings WHERE device_id = 'schema-test'").fetchone()
        conn.execute("DELETE FROM readings WHERE device_id = 'schema-test'")
    assert where == (partition_name(day),)
