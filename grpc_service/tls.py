"""The server's TLS identity: a given certificate and key, or a self-signed pair made on first start.

The generated pair lives in <config dir>/tls/ with 0600 permissions and is reused until it expires.
Its validity is 825 days, the longest Apple platforms accept for a TLS server certificate.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from grpc_service.auth import SecretError, refuse_readable_by_others

CERT_VALIDITY = dt.timedelta(days=825)
GENERATED_CERT_NAME = "server-cert.pem"
GENERATED_KEY_NAME = "server-key.pem"


class TlsError(Exception):
    """The TLS certificate or key cannot be used; the server must not start (not even in plaintext)."""


@dataclass(frozen=True)
class TlsIdentity:
    cert_pem: bytes
    key_pem: bytes
    cert_path: Path
    fingerprint: str  # SHA-256 of the DER certificate, as colon-separated hex pairs
    not_after: dt.datetime


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint of `cert` in the usual AA:BB:... form."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def normalize_fingerprint(text: str) -> str:
    """`text` as bare upper-case hex, so fingerprints with or without colons compare equal."""
    return re.sub(r"[\s:]", "", text).upper()


def load_identity(cert_path: Path, key_path: Path) -> TlsIdentity:
    """Reads a PEM certificate (chain) and its unencrypted PEM key, which only its owner may read;
    raises TlsError with the cause."""
    try:
        refuse_readable_by_others(key_path, "TLS key")
    except SecretError as exc:
        raise TlsError(str(exc)) from exc
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read the TLS certificate or key: {exc}") from exc
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError as exc:
        raise TlsError(f"{cert_path} is not a PEM certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsError(f"{key_path} is not an unencrypted PEM private key: {exc}") from exc
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise TlsError(f"the key {key_path} does not belong to the certificate {cert_path}")
    return TlsIdentity(cert_pem, key_pem, cert_path, fingerprint(cert), cert.not_valid_after_utc)


def ensure_self_signed(config_dir: Path) -> TlsIdentity:
    """The generated identity in `config_dir`, created (or renewed, once expired) as needed."""
    folder = config_dir / "tls"
    cert_path, key_path = folder / GENERATED_CERT_NAME, folder / GENERATED_KEY_NAME
    if cert_path.exists() and key_path.exists():
        try:
            identity = load_identity(cert_path, key_path)
        except TlsError as exc:
            raise TlsError(f"{exc}\n(delete {cert_path} and {key_path} to have a new pair generated)") from exc
        if identity.not_after > dt.datetime.now(dt.UTC):
            return identity
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(key_path, key_pem)
    _write_private(cert_path, _self_signed_cert(key, socket.gethostname()).public_bytes(serialization.Encoding.PEM))
    return load_identity(cert_path, key_path)


def _self_signed_cert(key: ec.EllipticCurvePrivateKey, hostname: str) -> x509.Certificate:
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    if hostname and hostname.isascii() and hostname != "localhost":
        names.append(x509.DNSName(hostname))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlx-sd server")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # tolerate clients whose clock is a bit behind
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_private(path: Path, data: bytes) -> None:
    """Writes `data` readable by the owner only, via a temporary file and a rename."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
