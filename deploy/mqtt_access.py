"""Mosquitto's password and ACL files, generated from the device registry, and reloaded on change.

- Anonymous access is off. Every enabled device and gateway has an account (its id); a disabled
  one has none, so the broker refuses it.
- A device may publish only to its own topics, a gateway only to its own (the ingest gateway
  then checks that each device in its messages is bound to it). Senders may not subscribe.
- Only the platform's ingest account reads telemetry.

Devices are locked out of a freshly started broker until an ingest gateway has subscribed again:
Mosquitto 2.0.11 (Debian 12) does not restore shared subscriptions from persistence, so anything
a device published in between would have no subscriber and be dropped after its PUBACK. Refused
instead, a device keeps its messages and retries (tests/test_gateway.py restarts the broker
mid-stream to prove it).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from deploy import procs
from kota.contract import INGEST_PROBE_TOPIC, MQTT_TOPIC_ROOT
from kota.mqtt import connack_code, login_connect
from kota.registry import hash_mqtt_password, mqtt_accounts, registry_version
from kota.settings import StackSettings

INGEST_USER = "kota-ingest"
RELOAD_PROBE_USER = "kota-reload-probe"  # may connect, may neither publish nor subscribe
RELOAD_PROBE_FILE = "reload.nonce"
LOCK_FILE = "devices-locked"
INGEST_CREDENTIAL_FILE = "ingest.secret"


def _mosquitto_owned(path: Path) -> None:
    # Only where a local broker runs as its own user (not in a deployment's access sidecar).
    if os.geteuid() == 0 and shutil.which("mosquitto") and _has_user("mosquitto"):
        shutil.chown(path, "mosquitto", "mosquitto")
        os.chmod(path, 0o600)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    _mosquitto_owned(tmp)
    tmp.replace(path)


def ingest_password(stack: StackSettings, folder: Path) -> str:
    """The ingest gateways' MQTT password, made once per state folder."""
    if (known := existing_ingest_password(folder)) is not None:
        return known
    secret = folder / INGEST_CREDENTIAL_FILE
    secret.write_text(secrets.token_urlsafe(24))
    os.chmod(secret, 0o600)
    return secret.read_text().strip()


def existing_ingest_password(folder: Path) -> str | None:
    """The password ingest_password made in this folder, if it has made one (none is made here)."""
    secret = folder / INGEST_CREDENTIAL_FILE
    return secret.read_text().strip() if secret.exists() else None


def write_access_files(stack: StackSettings, folder: Path, *, with_registry: bool = True,
                       ingest_secret: str | None = None) -> None:
    """Write passwd and acl into the broker's folder; the registry part only once the schema exists.
    `ingest_secret` is the gateways' password where a deployment hands it out (else made here)."""
    accounts = []
    if with_registry and not (folder / LOCK_FILE).exists():
        with psycopg.connect(stack.postgres_dsn) as conn:
            accounts = mqtt_accounts(conn)
    nonce = secrets.token_urlsafe(16)  # what reload_broker checks to know these files are loaded
    passwd = [f"{INGEST_USER}:{hash_mqtt_password(ingest_secret or ingest_password(stack, folder))}",
              f"{RELOAD_PROBE_USER}:{hash_mqtt_password(nonce)}"]
    acl = ["# Generated from the device registry by kota (deploy/mqtt_access.py); edits are overwritten.",
           f"user {INGEST_USER}", f"topic read {MQTT_TOPIC_ROOT}/#", f"topic write {INGEST_PROBE_TOPIC}", ""]
    for account in accounts:
        if account.password_hash:
            passwd.append(f"{account.username}:{account.password_hash}")
        # Certificate users need ACL lines too, whether or not they also have a password.
        acl.append(f"user {account.username}")
        acl += [f"topic write {topic}" for topic in account.write_topics]
        acl.append("")
    _write_atomically(folder / "passwd", "\n".join(passwd) + "\n")
    _write_atomically(folder / "acl", "\n".join(acl) + "\n")
    _write_atomically(folder / RELOAD_PROBE_FILE, nonce)


def reload_broker(stack: StackSettings, *, timeout_s: float = 10.0) -> bool:
    """Reload the local broker's access files; False when it is not running."""
    from deploy.stack import mosquitto_dir

    pid = procs.running_pid(stack, "mosquitto")
    if pid is None:
        return False
    return signal_until_loaded(pid, mosquitto_dir(stack), stack.mqtt_host, stack.mqtt_port, timeout_s=timeout_s)


def signal_until_loaded(pid: int, folder: Path, host: str, port: int, *, timeout_s: float = 10.0) -> bool:
    """SIGHUP makes Mosquitto re-read its password and ACL files without dropping connections.

    Mosquitto folds a SIGHUP that arrives while it is reloading into that reload, which may already
    have read the old files: two registry changes in quick succession could leave the second one
    unloaded. So each write carries a fresh password for a probe account (it may do nothing else),
    and this waits until the broker accepts it, signalling again if it does not.
    """
    nonce_file = folder / RELOAD_PROBE_FILE
    nonce = nonce_file.read_text().strip() if nonce_file.exists() else None
    deadline = time.monotonic() + timeout_s
    # A broker that has written its pid file may still be loading its files (a second or more with
    # thousands of devices), and a SIGHUP before it sets its handler ends it. Wait until it answers.
    while _probe_code(host, port, nonce or "") is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Mosquitto did not answer on port {port} within {timeout_s:.0f} s")
        time.sleep(0.1)
    while True:
        os.kill(pid, signal.SIGHUP)
        if nonce is None:
            return True
        for _ in range(10):
            time.sleep(0.05)
            if _probe_accepted(host, port, nonce):
                return True
        if time.monotonic() > deadline:
            raise TimeoutError(f"Mosquitto did not load the new access files within {timeout_s:.0f} s")


def _probe_accepted(host: str, port: int, password: str) -> bool:
    return _probe_code(host, port, password) == 0


def _probe_code(host: str, port: int, password: str) -> int | None:
    """The broker's CONNACK code for the probe account (0: accepted), or None when it does not answer."""
    probe = login_connect(f"{RELOAD_PROBE_USER}-{os.getpid()}", RELOAD_PROBE_USER, password)
    return connack_code(port, probe, host)


def sync(stack: StackSettings) -> None:
    """After a registry change: regenerate the files and reload the broker."""
    from deploy.stack import mosquitto_dir

    folder = mosquitto_dir(stack)
    # One writer at a time across processes (CLI, API, tests): files generated from an older read of
    # the registry must never overwrite newer ones, and each reload waits for its own files.
    with open(folder / "sync.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_access_files(stack, folder)
        reload_broker(stack)


def serve_broker_access(stack: StackSettings, folder: Path, broker_pid_file: Path, *, ingest_secret: str,
                        every_s: float, once: bool = False) -> None:
    """For a broker on another host or in another container (deploy/compose, deploy/k8s): keep
    its passwd and acl files, in a folder both share, in step with the registry, and reload the
    broker (SIGHUP to its `pid_file`, in a shared process namespace) after each change, as the
    local stack does (`signal_until_loaded`)."""
    folder.mkdir(parents=True, exist_ok=True)
    seen = None
    while True:
        try:
            with psycopg.connect(stack.postgres_dsn, connect_timeout=5) as conn:
                version = registry_version(conn)
            if version != seen:
                write_access_files(stack, folder, ingest_secret=ingest_secret)
                if broker_pid_file.exists():  # not yet, when this writes the files a broker starts with
                    signal_until_loaded(int(broker_pid_file.read_text().split()[0]), folder, stack.mqtt_host,
                                        stack.mqtt_port)
                seen = version
                print(f"broker access files written to {folder} for registry version {version}", flush=True)
        except (psycopg.Error, OSError, ValueError) as exc:
            if once:
                raise
            print(f"broker access: {exc}; retrying in {every_s:.0f} s", flush=True)
        if once:
            return
        time.sleep(every_s)


def lock_devices(stack: StackSettings, folder: Path) -> None:
    """Before the broker starts: only the ingest account may connect."""
    (folder / LOCK_FILE).touch()
    write_access_files(stack, folder, with_registry=False)


def unlock_devices(stack: StackSettings) -> None:
    from deploy.stack import mosquitto_dir

    (mosquitto_dir(stack) / LOCK_FILE).unlink(missing_ok=True)
    sync(stack)


def devices_locked(stack: StackSettings) -> bool:
    from deploy.stack import mosquitto_dir

    return (mosquitto_dir(stack) / LOCK_FILE).exists()


def wait_for_ingest_subscription(stack: StackSettings, timeout_s: float) -> bool:
    """True once a publish to the ingest probe topic finds a subscriber.

    MQTT 5 PUBACK reason 0x10 means "no matching subscribers". ($SYS subscription counts would be
    simpler, but Mosquitto leaves shared subscriptions out of them.)
    """
    from deploy.stack import mosquitto_dir

    password = ingest_password(stack, mosquitto_dir(stack))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"kota-ingest-check-{secrets.token_hex(4)}",
                         protocol=mqtt.MQTTv5)
    client.username_pw_set(INGEST_USER, password)
    answers: dict[int, int] = {}
    answered = threading.Condition()

    def on_publish(_c: object, _u: object, mid: int, reason: mqtt.ReasonCode, _p: object) -> None:
        with answered:
            answers[mid] = reason.value
            answered.notify_all()

    client.on_publish = on_publish
    deadline = time.monotonic() + timeout_s
    try:
        client.connect("127.0.0.1", stack.mqtt_port, keepalive=10)
        client.loop_start()
        while time.monotonic() < deadline:
            mid = client.publish(INGEST_PROBE_TOPIC, b"probe", qos=1).mid

            def has_answer(probe: int = mid) -> bool:
                return probe in answers

            with answered:
                answered.wait_for(has_answer, timeout=max(0.1, deadline - time.monotonic()))
            if answers.get(mid) == 0:
                return True
            time.sleep(0.3)
        return False
    except OSError:
        return False
    finally:
        client.disconnect()
        client.loop_stop()
