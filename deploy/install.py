"""Install what the local stack needs: Debian packages (Mosquitto, PostgreSQL, Java, Maven) and Kafka."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from deploy.folders import IS_ROOT, kafka_dir
from deploy.procs import Say, StackError
from kota.settings import StackSettings

DEPLOY_DIR = Path(__file__).resolve().parent
KAFKA_POM = DEPLOY_DIR / "kafka" / "pom.xml"
MOSQUITTO_BIN = Path("/usr/sbin/mosquitto")
POSTGRES_VERSION = "15"
CHROMIUM = Path("/usr/bin/chromium")


def postgres_bin() -> Path:
    return Path(f"/usr/lib/postgresql/{POSTGRES_VERSION}/bin")


def missing_packages() -> list[str]:
    missing = []
    if not MOSQUITTO_BIN.exists():
        missing += ["mosquitto", "mosquitto-clients"]
    if not (postgres_bin() / "initdb").exists():
        missing += [f"postgresql-{POSTGRES_VERSION}", f"postgresql-client-{POSTGRES_VERSION}"]
    if shutil.which("java") is None:
        missing.append("openjdk-17-jre-headless")
    if shutil.which("mvn") is None:
        missing.append("maven")
    if shutil.which("openssl") is None:
        missing.append("openssl")
    return missing


def install_packages(packages: list[str], say: Say) -> None:
    if not packages:
        return
    if not IS_ROOT:
        raise StackError(f"missing system packages; run: sudo apt-get install -y {' '.join(packages)}")
    say(f"installing Debian packages: {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], check=True, env=env)


def install_missing(stack: StackSettings, say: Say) -> None:
    install_packages(missing_packages(), say)
    _install_kafka_libs(stack, say)


def ensure_chromium(say: Say) -> Path:
    """Debian's Chromium, for the page's browser test (Playwright drives it; no browser download)."""
    if not CHROMIUM.exists():
        install_packages(["chromium"], say)
    return CHROMIUM


def _install_kafka_libs(stack: StackSettings, say: Say) -> None:
    lib = kafka_dir(stack) / "lib"
    marker = lib / ".pom-sha256"
    wanted = hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()
    if marker.exists() and marker.read_text() == wanted:
        return
    say("resolving Apache Kafka from Maven Central (deploy/kafka/pom.xml)")
    shutil.rmtree(lib, ignore_errors=True)
    lib.mkdir(parents=True)
    subprocess.run(
        ["mvn", "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies", f"-DoutputDirectory={lib}"],
        check=True,
    )
    marker.write_text(wanted)
