"""A client for ImageGenerationService, used by the CLI's client commands (and usable as a library)."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
from cryptography import x509

from grpc_service.auth import bearer_metadata
from grpc_service.defaults import DEFAULT_SERVER
from grpc_service.files import FileCheck
from grpc_service.generated import imageservice_pb2 as pb
from grpc_service.generated import imageservice_pb2_grpc as pb_grpc
from grpc_service.server import MAX_RECEIVE_MESSAGE_BYTES, MAX_SEND_MESSAGE_BYTES
from grpc_service.servicer import EncodedImages, items_from_response, request_to_proto
from grpc_service.tls import fingerprint, normalize_fingerprint
from mlx_sd.engine.events import ProgressEvent
from mlx_sd.engine.request import GenerationRequest

UPLOAD_CHUNK_BYTES = 4 * 1024**2
UNARY_TIMEOUT_SECONDS = 30.0


class TrustError(Exception):
    """The server's certificate is not the one the client was told to trust."""


@dataclass(frozen=True)
class ClientSettings:
    """How to reach the server. Trust is one of: `ca_file`, a pinned `fingerprint`, the system's
    roots (neither given), or none at all when `tls` is False."""

    server: str = DEFAULT_SERVER
    tls: bool = True
    ca_file: Path | None = None
    fingerprint: str | None = None
    shared_secret: str | None = None


def split_host_port(server: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6-address]:port"."""
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {server!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _pinned_credentials(server: str, expected: str) -> tuple[grpc.ChannelCredentials, str]:
    """Trusts exactly the certificate the server presents if its SHA-256 fingerprint is `expected`.

    Returns the credentials and a name from the certificate to verify it against, since the
    address used (say a LAN IP) need not be among the names of a self-signed certificate.
    """
    pem = ssl.get_server_certificate(split_host_port(server), timeout=UNARY_TIMEOUT_SECONDS)
    cert = x509.load_pem_x509_certificate(pem.encode())
    actual = fingerprint(cert)
    if normalize_fingerprint(actual) != normalize_fingerprint(expected):
        raise TrustError(f"the server's certificate has fingerprint {actual}, not the expected {expected}")
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = names.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns_names = []
    return grpc.ssl_channel_credentials(root_certificates=pem.encode()), (dns_names or ["localhost"])[0]


def open_channel(settings: ClientSettings) -> grpc.Channel:
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", MAX_SEND_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_RECEIVE_MESSAGE_BYTES),
    ]
    if not settings.tls:
        return grpc.insecure_channel(settings.server, options=options)
    if settings.fingerprint:
        credentials, name = _pinned_credentials(settings.server, settings.fingerprint)
        options.append(("grpc.ssl_target_name_override", name))
    elif settings.ca_file:
        credentials = grpc.ssl_channel_credentials(root_certificates=settings.ca_file.read_bytes())
    else:
        credentials = grpc.ssl_channel_credentials()
    return grpc.secure_channel(settings.server, credentials, options=options)


class ImageServiceClient:
    """One channel to the server; RPC failures surface as grpc.RpcError."""

    def __init__(self, settings: ClientSettings) -> None:
        self._channel = open_channel(settings)
        self._stub = pb_grpc.ImageGenerationServiceStub(self._channel)
        self._metadata = bearer_metadata(settings.shared_secret)

    def echo(self) -> str:
        return self._stub.Echo(pb.EchoRequest(), metadata=self._metadata, timeout=UNARY_TIMEOUT_SECONDS).message

    def files_exist(self, names: list[str]) -> list[FileCheck]:
        reply = self._stub.FilesExist(
            pb.FilesExistRequest(files=names), metadata=self._metadata, timeout=UNARY_TIMEOUT_SECONDS
        )
        errors = list(reply.errors) + [""] * (len(reply.files) - len(reply.errors))
        return [FileCheck(n, e, err) for n, e, err in zip(reply.files, reply.exists, errors, strict=True)]

    def upload(self, local: Path, remote: str, on_progress: Callable[[int], None] | None = None) -> str:
        """Sends `local` to `remote` (relative to the model directory); returns the server's message.

        The file's SHA-256 goes with it, so the server keeps it only if it arrived intact (else DATA_LOSS).
        `on_progress` gets the number of bytes each sent chunk carried.
        """
        with local.open("rb") as handle:
            sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
        messages = _upload_messages(local, remote, sha256, on_progress)
        return self._stub.UploadFile(messages, metadata=self._metadata).message

    def generate(self, request: GenerationRequest) -> Iterator[ProgressEvent | EncodedImages]:
        """Runs GenerateImage: the progress events as the server streams them, then the PNGs.

        Stopping early (an exception, or the iterator closed) cancels the call, so the server stops too.
        """
        call = self._stub.GenerateImage(request_to_proto(request), metadata=self._metadata)
        try:
            for response in call:
                yield from items_from_response(response)
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ImageServiceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _upload_messages(
    local: Path, remote: str, sha256: str, on_progress: Callable[[int], None] | None
) -> Iterator[pb.UploadFileRequest]:
    with local.open("rb") as handle:
        filename = remote  # only the first message names the file and carries the hash
        while True:
            chunk = handle.read(UPLOAD_CHUNK_BYTES)
            if not chunk and not filename:
                return
            yield pb.UploadFileRequest(filename=filename, chunk_data=chunk, sha256=sha256 if filename else "")
            filename = ""
            if on_progress:
                on_progress(len(chunk))
