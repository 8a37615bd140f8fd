"""Mosquitto's password and ACL files, generated from the device registry, and reloaded on change.

- Anonymous access is off. Every enabled device and gateway has an account (its id); a disabled
  one has none, so the broker refuses it.
- A device may publish only to its own topics, a gateway only to its own (the ingest gateway
  then checks that each device in its messages is bound to it). Senders may not subscribe.
- Only the platform's ingest account reads telemetry, and only on its own listener
  (StackSettings.mqtt_ingest_port): it has its own password and ACL files (`ingest-passwd`,
  `ingest-acl`), so no device account logs in there and the ingest account logs in nowhere else.
  Device listeners bind the client id to the user name, so no device can take a gateway's session.

Devices are locked out of a freshly started broker until an ingest gateway has subscribed again:
Mosquitto 2.0.11 (Debian 12) does not restore shared subscriptions from persistence, so anything
a device published in between would have no subscriber and be dropped after its PUBACK. Refused
instead, a device keeps its messages and retries (tests/test_gateway.py restarts the broker
mid-stream to prove it). The same holds later: `guard_ingest` (the `broker-guard` process beside
the broker) locks devices out again whenever no ingest session is subscribed, whatever removed it,
and lets them in once one is (tests/test_identity.py). It logs in as its own account (`kota-guard`,
on the ingest listener: it may publish the probe and read the broker's store counters, nothing
else), so nothing done to the ingest account's credentials locks the guard out.

The commander (`kota commander`, commander/) logs in on the ingest listener too, as `kota-commander`
with a password of its own (`commander.secret`): it may write every device's command topic and read
every reply topic, nothing else. Devices read only their own command topic and write only their own
reply topic (a gateway: those of its bound devices), and the ingest account is denied both.

Changing the ingest password is a reload that breaks every offline ingest session: Mosquitto 2.0.11
re-checks each session's credentials on SIGHUP, offline ones included, and one that no longer
matches keeps its subscription but is denied every message routed to it, after the sender's PUBACK
(and MQTT 5 still answers "success" to a probe: there is a subscriber). Its delivery resumes when the
password matches again or the gateway logs in anew. So every write that changes the ingest password
from the one the sessions logged in with (`ingest.accepted`, a digest) locks devices out in the same
reload and holds them out (`ingest-held`) until it is restored or `rotate_ingest_password` has
restarted the gateways with the new one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from deploy import procs
from deploy.broker_limits import BROKER_MAX_QUEUED_BYTES, BROKER_MAX_QUEUED_MESSAGES
from deploy.folders import mosquitto_dir
from kota.contract import COMMAND_TOPICS, COMMAND_TREE, INGEST_PROBE_TOPIC, MQTT_TOPIC_ROOT, REPLY_TOPICS
from kota.mqtt import connack_code, login_connect
from kota.registry import hash_mqtt_password, mqtt_accounts, registry_version
from kota.settings import StackSettings

INGEST_USER = "kota-ingest"
RELOAD_PROBE_USER = "kota-reload-probe"  # may connect, may neither publish nor subscribe
RELOAD_PROBE_FILE = "reload.nonce"
LOCK_FILE = "devices-locked"
INGEST_CREDENTIAL_FILE = "ingest.secret"
INGEST_PASSWD = "ingest-passwd"  # noqa: S105 (a file name) the ingest listener's own files
INGEST_ACL = "ingest-acl"
GUARD_USER = "kota-guard"  # the broker guard's own account, on the ingest listener
GUARD_CREDENTIAL_FILE = "guard.secret"  # noqa: S105 (a file name)
STORE_COUNTERS = "$SYS/broker/store/messages/#"  # what the guard reads: messages held and their bytes
INGEST_ACCEPTED_FILE = "ingest.accepted"  # digest of the password the ingest sessions logged in with
INGEST_HELD_FILE = "ingest-held"  # the ingest password differs from it: devices stay out
COMMANDER_USER = "kota-commander"  # the commander's account, on the ingest listener
COMMANDER_CREDENTIAL_FILE = "commander.secret"  # noqa: S105 (a file name)


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


def guard_password(folder: Path) -> str:
    """The broker guard's MQTT password, made once per broker folder (only the guard uses it)."""
    secret = folder / GUARD_CREDENTIAL_FILE
    if not secret.exists():
        secret.write_text(secrets.token_urlsafe(24))
        os.chmod(secret, 0o600)
    return secret.read_text().strip()


def commander_password(folder: Path) -> str:
    """The commander's MQTT password on the local stack, made once per broker folder."""
    secret = folder / COMMANDER_CREDENTIAL_FILE
    if not secret.exists():
        secret.write_text(secrets.token_urlsafe(24))
        os.chmod(secret, 0o600)
    return secret.read_text().strip()


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _hold_if_ingest_password_changed(folder: Path, secret: str, *, accept: bool) -> None:
    """Lock devices out (in the reload about to happen) when `secret` is not the password the ingest
    sessions logged in with: those sessions would be acknowledged into and receive nothing."""
    accepted = folder / INGEST_ACCEPTED_FILE
    if accept or not accepted.exists():
        accepted.write_text(_digest(secret))
        os.chmod(accepted, 0o600)
    if accepted.read_text().strip() != _digest(secret):
        (folder / INGEST_HELD_FILE).touch()
        (folder / LOCK_FILE).touch()
    else:
        (folder / INGEST_HELD_FILE).unlink(missing_ok=True)


def ingest_held(folder: Path) -> bool:
    return (folder / INGEST_HELD_FILE).exists()


def existing_ingest_password(folder: Path) -> str | None:
    """The password ingest_password made in this folder, if it has made one (none is made here)."""
    secret = folder / INGEST_CREDENTIAL_FILE
    return secret.read_text().strip() if secret.exists() else None


def write_access_files(
    stack: StackSettings,
    folder: Path,
    *,
    with_registry: bool = True,
    ingest_secret: str | None = None,
    broker_starting: bool = False,
    commander_secret: str | None = None,
) -> None:
    """Write passwd and acl into the broker's folder; the registry part only once the schema exists.
    `commander_secret`: the commander's password where a deployment hands it out (else made here).
    `ingest_secret` is the gateways' password where a deployment hands it out (else made here).
    `broker_starting`: no ingest session is loaded yet, so this password becomes the accepted one."""
    secret = ingest_secret or ingest_password(stack, folder)
    _hold_if_ingest_password_changed(folder, secret, accept=broker_starting)
    accounts = []
    if with_registry and not (folder / LOCK_FILE).exists():
        with psycopg.connect(stack.postgres_dsn) as conn:
            accounts = mqtt_accounts(conn)
    nonce = secrets.token_urlsafe(16)  # what reload_broker checks to know these files are loaded
    passwd = [f"{RELOAD_PROBE_USER}:{hash_mqtt_password(nonce)}"]
    acl = ["# Generated from the device registry by kota (deploy/mqtt_access.py); edits are overwritten.", ""]
    ingest_acl = [
        "# The ingest listener's rules (deploy/mqtt_access.py); edits are overwritten.",
        f"user {INGEST_USER}",
        f"topic deny {COMMAND_TREE}",  # commands and replies are not readings
        f"topic read {MQTT_TOPIC_ROOT}/#",
        "",
        f"user {GUARD_USER}",
        f"topic write {INGEST_PROBE_TOPIC}",
        f"topic read {STORE_COUNTERS}",
        "",
        f"user {COMMANDER_USER}",
        f"topic write {COMMAND_TOPICS}",
        f"topic read {REPLY_TOPICS}",
    ]
    for account in accounts:
        if account.password_hash:
            passwd.append(f"{account.username}:{account.password_hash}")
        # Certificate users need ACL lines too, whether or not they also have a password.
        acl.append(f"user {account.username}")
        acl += [f"topic write {topic}" for topic in account.write_topics]
        acl += [f"topic read {topic}" for topic in account.read_topics]
        acl.append("")
    _write_atomically(
        folder / INGEST_PASSWD,
        f"{INGEST_USER}:{hash_mqtt_password(secret)}\n{GUARD_USER}:{hash_mqtt_password(guard_password(folder))}\n"
        f"{COMMANDER_USER}:{hash_mqtt_password(commander_secret or commander_password(folder))}\n",
    )
    _write_atomically(folder / INGEST_ACL, "\n".join(ingest_acl) + "\n")
    _write_atomically(folder / "passwd", "\n".join(passwd) + "\n")
    _write_atomically(folder / "acl", "\n".join(acl) + "\n")
    _write_atomically(folder / RELOAD_PROBE_FILE, nonce)


def reload_broker(stack: StackSettings, *, timeout_s: float = 10.0) -> bool:
    """Reload the local broker's access files; False when it is not running."""
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


def sync(stack: StackSettings, *, ingest_secret: str | None = None) -> None:
    """After a registry change: regenerate the files and reload the broker (`ingest_secret`: see
    write_access_files)."""
    folder = mosquitto_dir(stack)
    # One writer at a time across processes (CLI, API, tests): files generated from an older read of
    # the registry must never overwrite newer ones, and each reload waits for its own files.
    with open(folder / "sync.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_access_files(stack, folder, ingest_secret=ingest_secret)
        reload_broker(stack)


def serve_broker_access(
    stack: StackSettings,
    folder: Path,
    broker_pid_file: Path,
    *,
    ingest_secret: str,
    every_s: float,
    once: bool = False,
    commander_secret: str | None = None,
) -> None:
    """For a broker on another host or in another container (deploy/compose, deploy/k8s): keep
    its passwd and acl files, in a folder both share, in step with the registry, and reload the
    broker (SIGHUP to its `pid_file`, in a shared process namespace) after each change, as the
    local stack does (`signal_until_loaded`). Beside it runs the broker guard (`guard_ingest`).
    A broker not started yet starts with devices locked out; the guard lets them in."""
    folder.mkdir(parents=True, exist_ok=True)
    if not broker_pid_file.exists():
        (folder / LOCK_FILE).touch()
    one_writer = threading.Lock()

    def apply() -> None:
        with one_writer:
            starting = not broker_pid_file.exists()  # not yet, when this writes the files a broker starts with
            write_access_files(
                stack,
                folder,
                ingest_secret=ingest_secret,
                broker_starting=starting,
                commander_secret=commander_secret,
            )
            if not starting:
                signal_until_loaded(
                    int(broker_pid_file.read_text().split()[0]), folder, stack.mqtt_host, stack.mqtt_port
                )

    if not once:
        threading.Thread(
            target=guard_ingest,
            args=(stack,),
            kwargs={"folder": folder, "apply": apply},
            daemon=True,
            name="broker-guard",
        ).start()
    seen = None
    while True:
        try:
            with psycopg.connect(stack.postgres_dsn, connect_timeout=5) as conn:
                version = registry_version(conn)
            if version != seen:
                apply()
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
    write_access_files(stack, folder, with_registry=False, broker_starting=True)


def unlock_devices(stack: StackSettings) -> None:
    (mosquitto_dir(stack) / LOCK_FILE).unlink(missing_ok=True)
    sync(stack)


def devices_locked(stack: StackSettings) -> bool:
    return (mosquitto_dir(stack) / LOCK_FILE).exists()


def wait_for_ingest_subscription(stack: StackSettings, timeout_s: float) -> bool:
    """True once a publish to the ingest probe topic finds a subscriber.

    MQTT 5 PUBACK reason 0x10 means "no matching subscribers". ($SYS subscription counts would be
    simpler, but Mosquitto leaves shared subscriptions out of them.)
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{GUARD_USER}-check-{secrets.token_hex(4)}", protocol=mqtt.MQTTv5
    )
    client.username_pw_set(GUARD_USER, guard_password(mosquitto_dir(stack)))
    answers: dict[int, int] = {}
    answered = threading.Condition()

    def on_publish(_c: object, _u: object, mid: int, reason: ReasonCode, _p: object) -> None:
        with answered:
            answers[mid] = reason.value
            answered.notify_all()

    client.on_publish = on_publish
    deadline = time.monotonic() + timeout_s
    try:
        client.connect(stack.mqtt_host, stack.mqtt_ingest_port, keepalive=10)
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


def guard_ingest(
    stack: StackSettings,
    *,
    folder: Path | None = None,
    apply: Callable[[], None] | None = None,
    every_s: float = 0.1,
    stop: threading.Event | None = None,
) -> None:
    """Keep devices out whenever the broker could acknowledge a reading into nowhere; let them in again
    once it cannot. Devices are locked out (`apply` regenerates the files and reloads the broker) while:

    - no ingest session is subscribed: the broker acknowledges a device's QoS 1 message once routed,
      and with no subscriber routes it nowhere. MQTT 5's PUBACK to the probe says "no matching
      subscribers". An offline persistent session is a subscriber (it queues), so a gateway restart
      changes nothing; a session that is gone (a clean-session login with the gateway's client id, a
      broker restart, which on 2.0.11 forgets shared subscriptions) is seen at the next probe. What
      such a wipe discarded, and what arrived before that probe, is lost: the guard can only react.
    - the ingest password differs from the one the sessions logged in with (`ingest_held`);
    - the broker holds more than 80% of its queue bound (max_queued_messages / max_queued_bytes, per
      session; the store counts are the whole broker's, so this errs early), until under 50%: past
      the bound Mosquitto acknowledges and drops.
    """
    stop = stop or threading.Event()
    folder = folder or mosquitto_dir(stack)
    apply = apply or (lambda: sync(stack))
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{GUARD_USER}-{secrets.token_hex(4)}", protocol=mqtt.MQTTv5
    )
    client.username_pw_set(GUARD_USER, guard_password(folder))
    client.reconnect_delay_set(1, 2)
    answers: dict[int, int] = {}
    answered = threading.Condition()
    store = {"count": 0, "bytes": 0}

    def on_publish(_c: object, _u: object, mid: int, reason: ReasonCode, _p: object) -> None:
        with answered:
            answers[mid] = reason.value
            answered.notify_all()

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        key = message.topic.rsplit("/", 1)[-1]
        if key in store:
            store[key] = int(message.payload or 0)

    client.on_publish = on_publish
    client.on_message = on_message
    client.on_connect = lambda c, *_a: c.subscribe(STORE_COUNTERS, qos=0)
    client.connect_async(stack.mqtt_host, stack.mqtt_ingest_port, keepalive=10)
    client.loop_start()
    queue_high = False
    try:
        while not stop.is_set():
            if client.is_connected():
                mid = client.publish(INGEST_PROBE_TOPIC, b"guard", qos=1).mid
                with answered:
                    answered.wait_for(lambda probe=mid: probe in answers, timeout=2.0)  # type: ignore[misc]
                    code = answers.pop(mid, None)
                filled = max(store["count"] / BROKER_MAX_QUEUED_MESSAGES, store["bytes"] / BROKER_MAX_QUEUED_BYTES)
                queue_high = filled > 0.8 or (queue_high and filled >= 0.5)
                reasons = [
                    why
                    for why, yes in (
                        ("no ingest session is subscribed", code == NO_MATCHING_SUBSCRIBERS),
                        ("the ingest password is not the one its sessions logged in with", ingest_held(folder)),
                        (f"the broker holds {filled:.0%} of its queue bound", queue_high),
                    )
                    if yes
                ]
                locked = (folder / LOCK_FILE).exists()
                try:
                    if reasons and not locked:
                        (folder / LOCK_FILE).touch()
                        apply()
                        print(f"{'; '.join(reasons)}: devices locked out", flush=True)
                    elif code == 0 and not reasons and locked:
                        (folder / LOCK_FILE).unlink(missing_ok=True)
                        apply()
                        print("an ingest session is subscribed: devices may connect", flush=True)
                except (psycopg.Error, OSError, TimeoutError) as exc:  # the registry or broker not there yet
                    print(f"broker guard: {exc}; trying again", flush=True)
            stop.wait(every_s)
    finally:
        client.disconnect()
        client.loop_stop()


def new_ingest_password(stack: StackSettings) -> None:
    """A new password for the ingest gateways, with devices locked out in the same reload that changes it
    (it breaks the gateways' sessions until they log in again): see deploy/components.py."""
    folder = mosquitto_dir(stack)
    secret_file = folder / INGEST_CREDENTIAL_FILE
    tmp = secret_file.with_suffix(".tmp")
    tmp.write_text(secrets.token_urlsafe(24))
    os.chmod(tmp, 0o600)
    tmp.replace(secret_file)
    (folder / LOCK_FILE).touch()
    sync(stack)


def accept_ingest_password(folder: Path) -> None:
    """The gateway has logged in with the current ingest password: it becomes the accepted one."""
    _hold_if_ingest_password_changed(folder, (folder / INGEST_CREDENTIAL_FILE).read_text().strip(), accept=True)


NO_MATCHING_SUBSCRIBERS = 0x10
