"""PostgreSQL least privilege, against the test stack's real server (deploy/postgres_access.py,
migration 0011): passwords only (scram-sha-256), no trust, a socket other users cannot reach, one
role per component that can do its work and nothing else, none of them a superuser."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from deploy import folders, install, postgres, postgres_access, procs
from kota import schema
from kota.settings import StackSettings, read_secret

pytestmark = pytest.mark.stack

COMPONENT_ROLES = (postgres_access.PROCESSOR, postgres_access.GATEWAY, postgres_access.API)


def _dsn(stack: StackSettings, role: str, *, password: str | None = None) -> str:
    secret = password if password is not None else read_secret(stack.state_dir, f"postgres-{role}.password")
    return make_conninfo(
        host="127.0.0.1", port=stack.postgres_port, dbname=stack.database, user=role, password=secret, connect_timeout=5
    )


@pytest.fixture
def as_role(stack: StackSettings) -> Iterator:
    """Connections as a component's role; whatever a test tried there is rolled back."""
    opened: list[psycopg.Connection] = []

    def connect(role: str) -> psycopg.Connection:
        conn = psycopg.connect(_dsn(stack, role))
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.rollback()
        conn.close()


def _refused(conn: psycopg.Connection, statement: str, on: str) -> None:
    """Run `statement` in a savepoint: it must fail for lack of privilege on `on` (as the error names
    it: "table readings"), not on something else it touches (a trigger's table, say)."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as raised:  # noqa: PT012 (the savepoint is part of it)
        with conn.transaction():
            conn.execute(statement)
    assert on in str(raised.value), (statement, str(raised.value))


def _psql(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """psql run as the OS user `nobody`, who has no password file, never prompted (-w)."""
    argv = ["runuser", "-u", "nobody", "--", str(install.postgres_bin() / "psql"), "-X", "-w", "-At", *args]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        env={"PATH": os.environ["PATH"], "PGCONNECT_TIMEOUT": "5", **(env or {})},
    )


# -- who gets in ---------------------------------------------------------------------------------
def _hba_methods(data: Path) -> list[str]:
    lines = (data / "pg_hba.conf").read_text().splitlines()
    return [line.split()[-1] for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_pg_hba_asks_every_connection_for_a_password(stack):
    methods = _hba_methods(folders.postgres_paths(stack).data)
    assert methods and set(methods) == {"scram-sha-256"}, methods
    # What the server itself reads from the file: no other method, no line it failed to parse.
    with psycopg.connect(postgres_access.superuser_dsn(stack)) as conn:
        methods = conn.execute("SELECT DISTINCT auth_method, error FROM pg_hba_file_rules").fetchall()
    assert methods == [("scram-sha-256", None)]


def test_socket_folder_is_not_open_to_other_users(stack):
    paths = folders.postgres_paths(stack)
    mode = paths.socket_dir.stat().st_mode
    assert stat.S_IMODE(mode) & 0o007 == 0, oct(mode)
    assert (paths.socket_dir / f".s.PGSQL.{stack.postgres_port}").is_socket()


@pytest.mark.skipif(os.geteuid() != 0, reason="running psql as another OS user takes root")
def test_a_local_user_without_the_password_is_refused(stack):
    paths = folders.postgres_paths(stack)
    for role in ("postgres", postgres_access.OWNER, *COMPONENT_ROLES):
        tcp = _psql(
            "-h",
            "127.0.0.1",
            "-p",
            str(stack.postgres_port),
            "-U",
            role,
            "-d",
            stack.database,
            "-c",
            "SELECT current_user",
        )
        assert tcp.returncode != 0 and "no password supplied" in tcp.stderr, (role, tcp.stdout, tcp.stderr)
        wrong = _psql(
            "-h",
            "127.0.0.1",
            "-p",
            str(stack.postgres_port),
            "-U",
            role,
            "-d",
            stack.database,
            "-c",
            "SELECT current_user",
            env={"PGPASSWORD": "guessed"},
        )
        assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr, (role, wrong.stderr)
        unix = _psql(
            "-h",
            str(paths.socket_dir),
            "-p",
            str(stack.postgres_port),
            "-U",
            role,
            "-d",
            stack.database,
            "-c",
            "SELECT current_user",
        )
        assert unix.returncode != 0, (role, unix.stdout, unix.stderr)
    # The same user with the password gets in: what refused it above was the password, nothing else.
    api = postgres_access.API
    secret = read_secret(stack.state_dir, f"postgres-{api}.password") or ""
    allowed = _psql(
        "-h",
        "127.0.0.1",
        "-p",
        str(stack.postgres_port),
        "-U",
        api,
        "-d",
        stack.database,
        "-c",
        "SELECT current_user",
        env={"PGPASSWORD": secret},
    )
    assert allowed.returncode == 0 and allowed.stdout.strip() == api, allowed.stderr


def test_secrets_are_private(stack):
    folder = stack.state_dir / "secrets"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = sorted(folder.glob("postgres-*.password"))
    assert {f.name for f in files} >= {f"postgres-{role}.password" for role in ("postgres", *postgres_access.ROLES)}
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert len({f.read_text() for f in files}) == len(files), "every role has its own password"


def test_no_component_role_is_a_superuser(stack):
    with psycopg.connect(stack.postgres_dsn) as conn:
        rows = conn.execute(
            "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolcanlogin, "
            "       pg_has_role(oid, 'pg_execute_server_program', 'USAGE') "
            "       OR pg_has_role(oid, 'pg_write_server_files', 'USAGE') "
            "       OR pg_has_role(oid, 'pg_read_server_files', 'USAGE') "
            "FROM pg_roles WHERE rolname = ANY(%s) ORDER BY rolname",
            (list(postgres_access.ROLES),),
        ).fetchall()
        who = conn.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    assert [r[0] for r in rows] == sorted(postgres_access.ROLES)
    for name, *powers, can_login, server_access in rows:
        assert powers == [False, False, False, False], name
        assert can_login and not server_access, name
    assert who == (postgres_access.OWNER, False), "the CLI and tests run as the owner, not as postgres"


# -- what each role may do -------------------------------------------------------------------------
def test_api_role_cannot_drop_copy_to_program_or_write_readings(stack, as_role):
    conn = as_role(postgres_access.API)
    assert conn.execute("SELECT current_user").fetchone() == (postgres_access.API,)
    _refused(conn, "DROP TABLE readings", "must be owner of table readings")
    _refused(conn, "DROP TABLE devices", "must be owner of table devices")
    _refused(conn, "TRUNCATE alerts", "table alerts")
    _refused(conn, "ALTER TABLE users ADD COLUMN backdoor text", "must be owner of table users")
    _refused(conn, "COPY (SELECT 1) TO PROGRAM 'true'", "pg_execute_server_program")
    _refused(conn, "COPY readings FROM PROGRAM 'true'", "pg_execute_server_program")
    _refused(conn, "INSERT INTO readings VALUES (now(), 'api-forged', 'pm25', 1, now())", "table readings")
    _refused(conn, "UPDATE readings SET value = 0 WHERE device_id = 'api-forged'", "table readings")
    _refused(conn, "DELETE FROM readings WHERE device_id = 'api-forged'", "table readings")
    _refused(conn, "DELETE FROM audit_log", "table audit_log")
    _refused(conn, "UPDATE stream_offsets SET next_offset = 0", "table stream_offsets")
    _refused(conn, "CREATE TABLE api_made (x int)", "schema public")
    # What the API does do still works (rolled back at the end).
    conn.execute("SELECT count(*) FROM readings").fetchone()
    conn.execute("UPDATE alerts SET acknowledged_by = acknowledged_by WHERE false")
    conn.execute("INSERT INTO audit_log (actor, action, target_type, target_id) VALUES ('t', 'test', 'test', 't')")


def test_gateway_role_reads_the_registry_and_writes_nothing(stack, as_role):
    conn = as_role(postgres_access.GATEWAY)
    conn.execute("SELECT count(*) FROM devices").fetchone()
    conn.execute("SELECT count(*) FROM gateways").fetchone()
    conn.execute("SELECT version FROM registry_version").fetchone()
    _refused(
        conn, "INSERT INTO devices (device_id, city, domain, device_type) VALUES ('gw', 'x', 'x', 'x')", "table devices"
    )
    _refused(conn, "UPDATE devices SET enabled = true WHERE false", "table devices")
    _refused(conn, "DELETE FROM gateways WHERE false", "table gateways")
    _refused(conn, "UPDATE registry_version SET version = version + 1", "table registry_version")
    _refused(conn, "INSERT INTO readings VALUES (now(), 'gw-forged', 'pm25', 1, now())", "table readings")
    _refused(conn, "SELECT * FROM api_tokens", "table api_tokens")
    _refused(conn, "SELECT * FROM users", "table users")


def test_processor_role_writes_its_tables_but_not_accounts(stack, as_role):
    conn = as_role(postgres_access.PROCESSOR)
    _refused(conn, "INSERT INTO users (user_id, role) VALUES ('processor-forged', 'admin')", "table users")
    _refused(conn, "UPDATE users SET role = 'admin'", "table users")
    _refused(conn, "UPDATE api_tokens SET revoked_at = NULL", "table api_tokens")
    _refused(conn, "INSERT INTO api_tokens (token_id, user_id, secret_hash) VALUES ('x', 'x', '')", "table api_tokens")
    _refused(conn, "SELECT secret_hash FROM api_tokens", "table api_tokens")
    _refused(conn, "UPDATE devices SET enabled = true WHERE false", "table devices")
    _refused(conn, "DROP TABLE readings_default", "must be owner of table readings_default")
    _refused(
        conn,
        "CREATE TABLE readings_p20990101 PARTITION OF readings FOR VALUES FROM ('2099-01-01Z') TO ('2099-01-02Z')",
        "schema public",
    )
    # Its own work: readings, offsets, and a day's partition through the owner's function.
    conn.execute("INSERT INTO readings VALUES (now(), 'processor-test', 'pm25', 1, now()) ON CONFLICT DO NOTHING")
    conn.execute(
        "INSERT INTO stream_offsets (consumer_group, topic, partition, next_offset) "
        "VALUES ('privilege-test', 'kota.readings', 0, 1)"
    )
    with psycopg.connect(stack.postgres_dsn) as owner:
        if schema.storage_backend(owner) == "postgres":
            day = dt.date(2099, 1, 1)
            assert schema.ensure_partitions(conn, day) == [schema.partition_name(day)]
            assert conn.execute(
                "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = %s", (schema.partition_name(day),)
            ).fetchone() == (postgres_access.OWNER,)
            # Only readings' own daily partitions can be dropped that way.
            assert conn.execute("SELECT kota_drop_readings_partition(%s)", (day,)).fetchone() == (True,)
            assert conn.execute("SELECT kota_drop_readings_partition('2099-01-02')").fetchone() == (False,)
    conn.rollback()


def test_components_connect_as_their_own_roles(pipeline):
    """The running processor and API hold connections; each is its component's role. (Only a
    superuser sees other roles' sessions.)"""
    with psycopg.connect(postgres_access.superuser_dsn(pipeline, pipeline.database), autocommit=True) as conn:
        procs.wait_until(
            lambda: (
                {postgres_access.PROCESSOR, postgres_access.API}
                <= {
                    r[0]
                    for r in conn.execute(
                        "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = current_database()"
                    )
                }
            ),
            "processor and api connections",
            pipeline,
            timeout_s=30,
        )
        users = {
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT usename FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        }
    assert users <= set(postgres_access.ROLES), users
    for name, role in postgres_access.COMPONENT_ROLES.items():
        environ = Path(f"/proc/{procs.running_pid(pipeline, name)}/environ").read_bytes().split(b"\0")
        assert f"KOTA_POSTGRES_USER={role}".encode() in environ, name


# -- a cluster made by older code ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_trust_cluster_from_older_code_is_upgraded_in_place(stack, monkeypatch, tmp_path):
    """Made as the code before this change made it (initdb --auth=trust, everything owned by
    postgres, migrated to 0008), then started by today's deploy: passwords from then on, the
    database's objects handed to kota_owner, and kota_owner migrates the rest."""
    old = StackSettings(state_dir=stack.state_dir / "old-trust-cluster", port_offset=0, postgres_base_port=_free_port())
    shutil.rmtree(old.state_dir, ignore_errors=True)
    paths = folders.postgres_paths(old)
    pg = install.postgres_bin()
    subprocess.run(
        postgres.as_postgres(
            [str(pg / "initdb"), "-D", str(paths.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    paths.socket_dir.mkdir()
    paths.socket_dir.chmod(0o777)  # what a wide umask, or older code, may have left
    if folders.IS_ROOT:
        shutil.chown(paths.socket_dir, "postgres", "postgres")
    with (paths.data / "postgresql.conf").open("a") as conf:
        conf.write(
            f"\nport = {old.postgres_port}\nlisten_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{paths.socket_dir}'\n"
        )
    subprocess.run(
        postgres.as_postgres([str(pg / "pg_ctl"), "start", "-D", str(paths.data), "-l", str(paths.log), "-w"]),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        trust = f"host=127.0.0.1 port={old.postgres_port} user=postgres"
        with psycopg.connect(trust + " dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{old.database}"')
        for path in schema.MIGRATIONS_DIR.glob("000[1-8]_*.sql"):
            shutil.copy(path, tmp_path)
        discover = schema.discover_migrations
        with monkeypatch.context() as m:
            m.setattr(schema, "discover_migrations", lambda: discover(tmp_path))
            m.setattr(schema, "ensure_partitions", lambda *_a, **_k: [])  # 0008 had no partition function
            schema.migrate(trust + f" dbname={old.database}")
        with psycopg.connect(trust + f" dbname={old.database}", autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE readings_p20300101 PARTITION OF readings FOR VALUES FROM ('2030-01-01Z') "
                "TO ('2030-01-02Z')"
            )
            conn.execute("INSERT INTO readings VALUES ('2030-01-01 10:00Z', 'old', 'pm25', 1, now())")
            conn.execute(
                "INSERT INTO alerts (device_id, city, domain, alert_type, metric, severity, message, "
                "first_ts, last_ts, clear_after_s) VALUES ('old', 'c', 'd', 't', 'm', 'minor', 'm', now(), "
                "now(), 60)"
            )

        postgres.start_postgres(old, lambda _message: None)  # the cluster is running: upgraded in place

        refused = f"host=127.0.0.1 port={old.postgres_port} user=postgres dbname={old.database} password=wrong"
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(refused, connect_timeout=5).close()
        assert set(_hba_methods(paths.data)) == {"scram-sha-256"}
        assert stat.S_IMODE(paths.socket_dir.stat().st_mode) & 0o007 == 0
        schema.migrate(old.postgres_dsn)  # as kota_owner: 0009 onwards
        with psycopg.connect(old.postgres_dsn) as conn:
            owners = conn.execute(
                "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                "UNION SELECT pg_get_userbyid(proowner) FROM pg_proc WHERE pronamespace = 'public'::regnamespace "
                "UNION SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
            ).fetchall()
            assert owners == [(postgres_access.OWNER,)]
            versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
            assert versions == [m.version for m in schema.discover_migrations()]
            assert conn.execute("SELECT count(*) FROM readings").fetchone() == (1,)
            # The sequence of a serial column went with its table: the owner can still raise alerts.
            conn.execute(
                "INSERT INTO alerts (device_id, city, domain, alert_type, metric, severity, message, "
                "first_ts, last_ts, clear_after_s) VALUES ('old', 'c', 'd', 't2', 'm', 'minor', 'm', now(), "
                "now(), 60)"
            )
        with psycopg.connect(_dsn(old, postgres_access.API)) as conn:
            _refused(conn, "INSERT INTO readings VALUES (now(), 'api-forged', 'pm25', 1, now())", "table readings")
            assert conn.execute("SELECT count(*) FROM readings").fetchone() == (1,)
    finally:
        postgres.stop_postgres(old)
        shutil.rmtree(old.state_dir, ignore_errors=True)
