import subprocess
import sys

import pytest

from cli.main import build_parser
from tests.helpers import kota_ok, run_kota

SUBCOMMANDS = [
    "install",
    "up",
    "down",
    "status",
    "gateway",
    "processor",
    "api",
    "simulate",
    "migrate",
    "devices",
    "deadletters",
    "rules",
    "users",
    "score",
    "replay",
]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command):
    result = subprocess.run([sys.executable, "-m", "cli", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "usage: kota " + command in result.stdout


def test_parser_knows_every_subcommand():
    choices = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    assert set(SUBCOMMANDS) <= set(choices)


def test_a_relative_state_dir_is_taken_from_where_kota_runs(tmp_path, monkeypatch):
    # The services run in folders of their own: with the relative path as given, PostgreSQL could
    # not make its socket's lock file and `KOTA_STATE_DIR=.kota-bench kota up` failed.
    from kota.settings import StackSettings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KOTA_STATE_DIR", ".kota-bench")
    assert StackSettings().state_dir == tmp_path / ".kota-bench"
    assert StackSettings().logs_dir.is_absolute()


@pytest.mark.stack
def test_status_shows_services_and_processes(pipeline):
    out = kota_ok(pipeline, "status")
    lines = {line.split()[0]: line for line in out.splitlines()}
    for name in ("mosquitto", "postgres", "kafka", "gateway", "processor", "api"):
        assert "running" in lines[name], out


@pytest.mark.stack
def test_devices_cli_adds_lists_and_disables(pipeline):
    import uuid

    device_id = f"cli-{uuid.uuid4().hex[:8]}"

    def kota(*args: str) -> str:
        return kota_ok(pipeline, "devices", *args)

    assert "registered" in kota("add", device_id, "--city", "clikota", "--type", "noise")
    assert f"{device_id}" in kota("list", "--city", "clikota")
    kota("disable", device_id)
    line = next(x for x in kota("list", "--city", "clikota").splitlines() if x.startswith(device_id))
    assert "DISABLED" in line


@pytest.mark.stack
def test_devices_cli_rotates_a_password_and_sets_a_rate_limit(pipeline):
    import re
    import uuid

    import psycopg

    from kota.mqtt import connack_code, login_connect
    from kota.registry import load_rate_limits

    device_id = f"cli-{uuid.uuid4().hex[:8]}"
    added = kota_ok(pipeline, "devices", "add", device_id, "--city", "clikota", "--type", "noise")
    old = re.search(r"password (\S+)", added).group(1)
    assert connack_code(pipeline.mqtt_port, login_connect(device_id, device_id, old)) == 0
    rotated = kota_ok(pipeline, "devices", "password", device_id)
    new = re.search(r"new password (\S+)", rotated).group(1)
    assert connack_code(pipeline.mqtt_port, login_connect(device_id, device_id, old)) != 0  # the old one is gone
    assert connack_code(pipeline.mqtt_port, login_connect(device_id, device_id, new)) == 0

    kota_ok(pipeline, "devices", "rate", device_id, "5")
    with psycopg.connect(pipeline.postgres_dsn) as conn:
        assert load_rate_limits(conn)[device_id] == 5.0
    kota_ok(pipeline, "devices", "rate", device_id, "default")
    with psycopg.connect(pipeline.postgres_dsn) as conn:
        assert device_id not in load_rate_limits(conn)
    assert run_kota(pipeline, "devices", "rate", device_id, "-1").returncode == 1


@pytest.mark.stack
def test_users_cli_makes_accounts_whose_tokens_the_api_accepts_until_revoked(pipeline, tmp_path):
    import re
    import uuid

    import httpx
    from pydantic import SecretStr

    from cli.stack import ensure_demo_operator
    from kota.settings import read_secret

    env = {"KOTA_API_TOKEN_CACHE_S": "0"}
    user = f"prov-{uuid.uuid4().hex[:8]}"

    def kota(*argv: str) -> str:
        return kota_ok(pipeline, *argv, env=env)

    out = kota("users", "add", user, "--role", "operator", "--city", "bandung", "--city", "bogor")
    token = re.search(r"(kota_\S+)", out).group(1)
    me = httpx.get(f"{pipeline.api_url}/api/v1/me", headers={"Authorization": f"Bearer {token}"}).json()
    assert me == {"user_id": user, "role": "operator", "cities": ["bandung", "bogor"]}
    assert f"{user}" in kota("users", "list")
    assert "1 token(s) revoked" in kota("users", "revoke", user)
    bad = run_kota(pipeline, "users", "add", "x", "--role", "operator", env=env)
    assert bad.returncode == 1 and "needs at least one city" in bad.stdout + bad.stderr

    # kota up's demo operator: the same token on every run while it stays valid.
    # Another state folder for the token file; the database password stays the test stack's.
    password = SecretStr(read_secret(pipeline.state_dir, f"postgres-{pipeline.postgres_user}.password") or "")
    stack = pipeline.model_copy(update={"state_dir": tmp_path, "postgres_password": password})
    first = ensure_demo_operator(stack, "bandung")
    assert ensure_demo_operator(stack, "bandung") == first
    demo = httpx.get(f"{pipeline.api_url}/api/v1/me", headers={"Authorization": f"Bearer {first}"}).json()
    assert (demo["user_id"], demo["role"], "bandung" in demo["cities"]) == ("demo-operator", "operator", True)
