"""A certificate authority for the local stack: the broker's TLS certificate and device client certificates.

A device certificate's common name is its device id; the mutual-TLS listener takes it as the
MQTT username, so the registry's topic rules apply to certificates exactly as to passwords.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kota.settings import StackSettings

CA_NAME = "kotacerdas local CA"


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def pki_dir(stack: StackSettings) -> Path:
    path = stack.state_dir / "pki"
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # the CA's private key lives here
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(path, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kotacerdas"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def ensure_ca(stack: StackSettings) -> CertPair:
    folder = pki_dir(stack)
    pair = CertPair(folder / "ca.crt", folder / "ca.key")
    if pair.cert.exists() and pair.key.exists():
        return pair
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(CA_NAME))
        .issuer_name(_name(CA_NAME))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(pair.key, key)
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pair


def issue(stack: StackSettings, common_name: str, out_dir: Path, *, server: bool = False) -> CertPair:
    """Issue a certificate signed by the project CA into `out_dir` as <name>.crt and <name>.key."""
    ca = ensure_ca(stack)
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    out_dir.mkdir(parents=True, exist_ok=True)
    pair = CertPair(out_dir / f"{common_name}.crt", out_dir / f"{common_name}.key")
    _write_key(pair.key, key)
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pair


def issue_device_certificate(stack: StackSettings, identity: str, out_dir: Path) -> CertPair:
    """A client certificate (CN = `identity`) for a registered, enabled device or gateway only.

    The mutual-TLS listener takes the CN as the user name without a password, so a certificate
    for a reserved or unregistered name would be a login nobody provisioned."""
    import psycopg

    from kota.registry import check_not_reserved, enabled_identity

    check_not_reserved(identity)
    with psycopg.connect(stack.postgres_dsn) as conn:
        if not enabled_identity(conn, identity):
            raise ValueError(
                f"no enabled device or gateway {identity!r} in the registry: register (or enable) it first"
            )
    return issue(stack, identity, out_dir)
