"""Uploads under contention and faults: concurrent writers, declared hashes, a full disk, stale files."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from grpc_service import files
from grpc_service.client import _upload_messages
from grpc_service.files import UPLOAD_TEMP_PREFIX, UPLOAD_TEMP_SUFFIX, ModelDirectory
from grpc_service.generated import imageservice_pb2 as pb

CHUNK = 64 * 1024


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(UPLOAD_TEMP_PREFIX)]


def chunked(name: str, payload: bytes, sha256: str = "", gate: threading.Barrier | None = None
            ) -> Iterator[pb.UploadFileRequest]:
    for offset in range(0, len(payload), CHUNK):
        first = offset == 0
        yield pb.UploadFileRequest(filename=name if first else "", sha256=sha256 if first else "",
                                   chunk_data=payload[offset:offset + CHUNK])
        if first and gate is not None:
            gate.wait(10)  # both uploads are under way before either goes on


def test_concurrent_uploads_to_one_name_leave_one_whole_payload(server, stub_for, models_dir: Path) -> None:
    payloads = [bytes([i]) * (CHUNK * 8 + 123) for i in (1, 2)]
    gate = threading.Barrier(2)
    stub = stub_for(server)
    calls = [stub.UploadFile.future(chunked("model.bin", p, gate=gate)) for p in payloads]
    assert all(call.result(timeout=30).success for call in calls)
    assert (models_dir / "model.bin").read_bytes() in payloads
    assert temp_files(models_dir) == []


def test_a_matching_sha256_is_accepted(server, stub_for, models_dir: Path) -> None:
    payload = os.urandom(CHUNK * 3)
    digest = hashlib.sha256(payload).hexdigest().upper()  # either case
    assert stub_for(server).UploadFile(chunked("a.bin", payload, digest)).success
    assert (models_dir / "a.bin").read_bytes() == payload


@pytest.mark.parametrize("declared, code, detail", [
    (hashlib.sha256(b"something else").hexdigest(), grpc.StatusCode.DATA_LOSS, "not the declared"),
    ("abc", grpc.StatusCode.INVALID_ARGUMENT, "sha256: must be 64 hexadecimal digits"),
], ids=["mismatch", "malformed"])
def test_a_wrong_sha256_keeps_nothing(server, stub_for, models_dir: Path, declared: str, code, detail: str) -> None:
    (models_dir / "a.bin").write_bytes(b"previous")
    with pytest.raises(grpc.RpcError) as caught:
        stub_for(server).UploadFile(chunked("a.bin", os.urandom(CHUNK * 2), declared))
    assert caught.value.code() == code and detail in caught.value.details()
    assert (models_dir / "a.bin").read_bytes() == b"previous"
    assert temp_files(models_dir) == []


def test_the_sha256_may_not_change_mid_upload(server, stub_for, models_dir: Path) -> None:
    messages = [pb.UploadFileRequest(filename="a.bin", sha256="0" * 64, chunk_data=b"x"),
                pb.UploadFileRequest(sha256="1" * 64, chunk_data=b"y")]
    with pytest.raises(grpc.RpcError) as caught:
        stub_for(server).UploadFile(iter(messages))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in caught.value.details()
    assert list(models_dir.iterdir()) == []


def test_the_client_sends_the_files_sha256_first(tmp_path: Path) -> None:
    local = tmp_path / "local.bin"
    local.write_bytes(b"weights")
    messages = list(_upload_messages(local, "remote.bin", hashlib.sha256(b"weights").hexdigest(), None))
    assert messages[0].sha256 == hashlib.sha256(b"weights").hexdigest()
    assert all(not m.sha256 for m in messages[1:])


class FillingDisk:
    """A temporary file on a disk with `room` bytes left: writes beyond it fail with ENOSPC."""

    def __init__(self, real, room: int) -> None:
        self._real = real
        self._room = room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._real.write(data)

    def __getattr__(self, name: str):
        return getattr(self._real, name)


def test_a_full_disk_is_resource_exhausted_and_leaves_nothing(server, stub_for, models_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    open_temp = files._open_temp

    def on_full_disk(folder: Path):
        path, handle = open_temp(folder)
        return path, FillingDisk(handle, room=CHUNK * 2)

    monkeypatch.setattr(files, "_open_temp", on_full_disk)
    (models_dir / "a.bin").write_bytes(b"previous")
    with pytest.raises(grpc.RpcError) as caught:
        stub_for(server).UploadFile(chunked("a.bin", os.urandom(CHUNK * 5)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "disk holding the model directory is full" in caught.value.details()
    assert (models_dir / "a.bin").read_bytes() == b"previous"
    assert temp_files(models_dir) == []


def test_stale_temporary_files_are_removed_only_when_ours_old_and_inside(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    stale = [root / f"{UPLOAD_TEMP_PREFIX}a{UPLOAD_TEMP_SUFFIX}", root / "sub" / f"{UPLOAD_TEMP_PREFIX}b{UPLOAD_TEMP_SUFFIX}"]
    kept = [root / "model.safetensors", root / f"{UPLOAD_TEMP_PREFIX}c.bin", root / f"other{UPLOAD_TEMP_SUFFIX}",
            outside / f"{UPLOAD_TEMP_PREFIX}d{UPLOAD_TEMP_SUFFIX}"]
    for path in stale + kept:
        path.write_bytes(b"x")
    (root / "linked").symlink_to(outside, target_is_directory=True)  # not followed
    (root / f"{UPLOAD_TEMP_PREFIX}link{UPLOAD_TEMP_SUFFIX}").symlink_to(kept[0])  # not a regular file
    started = time.time() + 1
    fresh = root / f"{UPLOAD_TEMP_PREFIX}fresh{UPLOAD_TEMP_SUFFIX}"
    fresh.write_bytes(b"x")
    os.utime(fresh, (started + 1, started + 1))  # written after the start: an upload of this server

    assert ModelDirectory(root).remove_stale_uploads(older_than=started) == 2
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept) and fresh.exists()
    assert (root / f"{UPLOAD_TEMP_PREFIX}link{UPLOAD_TEMP_SUFFIX}").is_symlink()


def test_stopping_discards_uploads_in_progress(server_factory, stub_for, models_dir: Path) -> None:
    server = server_factory()
    release = threading.Event()

    def half_then_wait() -> Iterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(filename="a.bin", chunk_data=b"x" * CHUNK)
        release.wait(10)

    call = stub_for(server).UploadFile.future(half_then_wait())
    try:
        deadline = time.monotonic() + 5
        while not temp_files(models_dir) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert temp_files(models_dir)
        server.stop(0)
        assert temp_files(models_dir) == [] and not (models_dir / "a.bin").exists()
    finally:
        release.set()
    with pytest.raises(grpc.RpcError):
        call.result(timeout=10)
