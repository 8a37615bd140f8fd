"""Mosquitto's password and ACL files, generated from the device registry, and reloaded on change.

- Anonymous access is off. Every enabled device and gateway has an account (its id); a disabled
  one has none, so the broker refuses it.
- A device may publish only to its own topics, a gateway only to its own (the ingest gateway
  then checks that each device in its messages is bound to it). Senders may not subscribe.
- Only the platform's ingest account reads telemetry.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
from pathlib import Path

import psycopg

from deploy import procs
from kota.contract import MQTT_TOPIC_ROOT
from kota.registry import hash_mqtt_password, mqtt_accounts
from kota.settings import StackSettings

INGEST_USER = "kota-ingest"


def _mosquitto_owned(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "mosquitto", "mosquitto")
        os.chmod(path, 0o600)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    _mosquitto_owned(tmp)
    tmp.replace(path)


def ingest_password(stack: StackSettings, folder: Path) -> str:
    """The ingest gateways' MQTT password, made once per state folder."""
    secret = folder / "ingest.secret"
    if not secret.exists():
        secret.write_text(secrets.token_urlsafe(24))
        os.chmod(secret, 0o600)
    return secret.read_text().strip()


def write_access_files(stack: StackSettings, folder: Path, *, with_registry: bool = True) -> None:
    """Write passwd and acl into the broker's folder; the registry part only once the schema exists."""
    accounts = []
    if with_registry:
        with psycopg.connect(stack.postgres_dsn) as conn:
            accounts = mqtt_accounts(conn)
    passwd = [f"{INGEST_USER}:{hash_mqtt_password(ingest_password(stack, folder))}"]
    acl = ["# Generated from the device registry by kota (deploy/mqtt_access.py); edits are overwritten.",
           f"user {INGEST_USER}", f"topic read {MQTT_TOPIC_ROOT}/#", ""]
    for account in accounts:
        if account.password_hash:
            passwd.append(f"{account.username}:{account.password_hash}")
        # Certificate users need ACL lines too, whether or not they also have a password.
        acl.append(f"user {account.username}")
        acl += [f"topic write {topic}" for topic in account.write_topics]
        acl.append("")
    _write_atomically(folder / "passwd", "\n".join(passwd) + "\n")
    _write_atomically(folder / "acl", "\n".join(acl) + "\n")


def reload_broker(stack: StackSettings) -> bool:
    """SIGHUP makes Mosquitto re-read its password and ACL files without dropping connections."""
    pid = procs.running_pid(stack, "mosquitto")
    if pid is None:
        return False
    os.kill(pid, signal.SIGHUP)
    return True


def sync(stack: StackSettings) -> None:
    """After a registry change: regenerate the files and reload the broker."""
    from deploy.stack import mosquitto_dir

    write_access_files(stack, mosquitto_dir(stack))
    reload_broker(stack)
