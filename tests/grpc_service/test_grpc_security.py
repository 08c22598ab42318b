"""Shared-secret checks on every RPC, and the server's TLS identity (generated, given, broken)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from grpc_service.auth import SecretError, resolve_shared_secret
from grpc_service.client import TrustError
from grpc_service.generated import imageservice_pb2 as pb
from grpc_service.server import ServerStartError
from grpc_service.tls import GENERATED_CERT_NAME, GENERATED_KEY_NAME

SECRET = "correct horse battery staple"


class CallCounter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, request, is_cancelled):
        self.calls += 1
        yield from ()


RPCS = {
    "Echo": lambda stub, md: stub.Echo(pb.EchoRequest(), metadata=md),
    "FilesExist": lambda stub, md: stub.FilesExist(pb.FilesExistRequest(files=["a"]), metadata=md),
    "GenerateImage": lambda stub, md: list(stub.GenerateImage(pb.ImageGenerationRequest(), metadata=md)),
    "UploadFile": lambda stub, md: stub.UploadFile(
        iter([pb.UploadFileRequest(filename="up.bin", chunk_data=b"data")]), metadata=md
    ),
}
BAD_METADATA = {
    "missing": (),
    "wrong": (("authorization", "Bearer not the secret"),),
    "no Bearer prefix": (("authorization", SECRET),),
    "other scheme": (("authorization", f"Basic {SECRET}"),),
    "given twice": (("authorization", f"Bearer {SECRET}"), ("authorization", f"Bearer {SECRET}")),
}


@pytest.mark.parametrize("rpc", RPCS.values(), ids=RPCS.keys())
@pytest.mark.parametrize("metadata", BAD_METADATA.values(), ids=BAD_METADATA.keys())
def test_bad_secrets_are_unauthenticated_and_do_no_work(server_factory, stub_for, models_dir, rpc, metadata) -> None:
    engine = CallCounter()
    stub = stub_for(server_factory(engine, shared_secret=SECRET))
    with pytest.raises(grpc.RpcError) as caught:
        rpc(stub, metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert engine.calls == 0
    assert list(models_dir.iterdir()) == []


@pytest.mark.parametrize("name, rpc", RPCS.items(), ids=RPCS.keys())
def test_the_right_secret_is_accepted(server_factory, stub_for, models_dir, name, rpc) -> None:
    engine = CallCounter()
    stub = stub_for(server_factory(engine, shared_secret=SECRET))
    rpc(stub, (("authorization", f"Bearer {SECRET}"),))
    assert engine.calls == (name == "GenerateImage")
    assert (models_dir / "up.bin").exists() == (name == "UploadFile")


def test_the_client_sends_its_secret(server_factory, connect) -> None:
    server = server_factory(shared_secret=SECRET)
    assert connect(server, shared_secret=SECRET).echo() == "HELLO"
    with pytest.raises(grpc.RpcError) as caught:
        connect(server, shared_secret="guess").echo()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_secret_from_a_file_drops_the_trailing_newline(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    assert resolve_shared_secret(None, secret_file) == SECRET
    assert resolve_shared_secret(SECRET, None) == SECRET
    assert resolve_shared_secret(None, None) is None


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_secret_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    secret_file.chmod(mode)
    with pytest.raises(SecretError, match=rf"\(mode {mode:04o}\).*chmod 600"):
        resolve_shared_secret(None, secret_file)


@pytest.mark.parametrize("secret", ["pässwort", "tab\tsecret", "new\nline", "emoji🔑"])
def test_a_secret_no_grpc_client_could_send_is_refused(secret: str) -> None:
    with pytest.raises(SecretError, match="printable ASCII"):
        resolve_shared_secret(secret, None)


@pytest.mark.parametrize("value, file", [("a", Path("f")), ("", None), (None, Path("/nonexistent/secret"))])
def test_conflicting_empty_or_unreadable_secrets_are_refused(value, file) -> None:
    with pytest.raises(SecretError):
        resolve_shared_secret(value, file)


def test_generated_certificate_is_private_and_reused(server_factory, config_dir: Path) -> None:
    first = server_factory().tls
    cert_path = config_dir / "tls" / GENERATED_CERT_NAME
    assert first is not None and first.cert_path == cert_path
    for path in (cert_path, config_dir / "tls" / GENERATED_KEY_NAME):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = server_factory().tls
    assert second is not None and second.fingerprint == first.fingerprint


def test_generated_certificate_names_this_host(server) -> None:
    cert = x509.load_pem_x509_certificate(server.tls.cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", socket.gethostname()} <= set(names.get_values_for_type(x509.DNSName))
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=825) <= lifetime <= dt.timedelta(days=826)


def test_a_damaged_generated_certificate_stops_startup(server_factory, config_dir: Path) -> None:
    server_factory()
    (config_dir / "tls" / GENERATED_CERT_NAME).write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
    with pytest.raises(ServerStartError, match=GENERATED_CERT_NAME):
        server_factory()


def write_pair(folder: Path, *, days: int = 30, key: ec.EllipticCurvePrivateKey | None = None) -> tuple[Path, Path]:
    """A self-signed certificate for localhost valid for `days` (negative: expired), and its key."""
    folder.mkdir(parents=True, exist_ok=True)
    cert_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(cert_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=abs(days) + 1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(cert_key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        (key or cert_key).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def test_a_key_others_can_read_stops_the_server(server_factory, tmp_path: Path) -> None:
    cert_path, key_path = write_pair(tmp_path / "given")
    key_path.chmod(0o644)
    with pytest.raises(ServerStartError, match=r"TLS key .* \(mode 0644\).*chmod 600"):
        server_factory(tls_cert=cert_path, tls_key=key_path)


def test_a_given_certificate_is_served(server_factory, connect, tmp_path: Path, config_dir: Path) -> None:
    cert_path, key_path = write_pair(tmp_path / "given")
    server = server_factory(tls_cert=cert_path, tls_key=key_path)
    assert server.tls.cert_path == cert_path
    assert connect(server).echo() == "HELLO"
    assert not config_dir.exists()  # nothing was generated


@pytest.mark.parametrize(
    "problem, match",
    [
        ("mismatched key", "does not belong"),
        ("expired", "expired"),
        ("garbage key", "not an unencrypted PEM private key"),
        ("only a certificate", "both --tls-cert and --tls-key"),
        ("missing files", "cannot read"),
    ],
)
def test_unusable_given_certificates_stop_startup(server_factory, tmp_path: Path, problem: str, match: str) -> None:
    folder = tmp_path / "given"
    cert_path, key_path = write_pair(
        folder,
        days=-1 if problem == "expired" else 30,
        key=ec.generate_private_key(ec.SECP256R1()) if problem == "mismatched key" else None,
    )
    overrides = {"tls_cert": cert_path, "tls_key": key_path}
    if problem == "garbage key":
        key_path.write_text("not a key")
    elif problem == "only a certificate":
        del overrides["tls_key"]
    elif problem == "missing files":
        overrides = {"tls_cert": folder / "absent.pem", "tls_key": folder / "absent.key"}
    with pytest.raises(ServerStartError, match=match):
        server_factory(**overrides)


def test_a_plaintext_client_cannot_talk_to_the_tls_server(server, connect) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        connect(server, tls=False, ca_file=None).echo()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_without_trust_in_the_certificate_is_refused(server, connect) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        connect(server, ca_file=None).echo()  # system roots do not know the self-signed certificate
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_fingerprint_pinning_trusts_exactly_that_certificate(server, connect) -> None:
    address = f"127.0.0.1:{server.port}"
    pinned = server.tls.fingerprint.replace(":", "").lower()  # accepted with or without colons
    assert connect(server, server=address, ca_file=None, fingerprint=pinned).echo() == "HELLO"
    with pytest.raises(TrustError, match=server.tls.fingerprint):
        connect(server, server=address, ca_file=None, fingerprint="00" * 32)


def test_plaintext_server_when_asked(server_factory, connect) -> None:
    server = server_factory(tls=False)
    assert server.tls is None
    assert connect(server).echo() == "HELLO"
