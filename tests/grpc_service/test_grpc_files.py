"""FilesExist and UploadFile over a real TLS connection, including traversal and cancellation."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from grpc_service.files import MAX_NAMES_PER_CALL, UPLOAD_TEMP_PREFIX, UPLOAD_TEMP_SUFFIX
from grpc_service.generated import imageservice_pb2 as pb
from mlx_sd.engine.model_names import MAX_COMPONENT_BYTES, MAX_NAME_CHARS

REFUSED_NAMES = {
    "parent": "../x",
    "nested parent": "sub/../../x",
    "backslash parent": "..\\x",
    "absolute": "/etc/passwd",
    "windows drive": "C:/Windows/win.ini",
    "NUL": "model\0.safetensors",
    "empty": "",
    "dot component": "./model.safetensors",
    "over-long name": "a/" * (MAX_NAME_CHARS // 2 + 1),
    "over-long component": "a" * (MAX_COMPONENT_BYTES + 1),
}


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(UPLOAD_TEMP_PREFIX)]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the model directory, with a file a traversal would find."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text("not for clients")
    return folder


def test_files_exist_answers_in_order(server, connect, models_dir: Path) -> None:
    (models_dir / "stable-diffusion").mkdir()
    (models_dir / "stable-diffusion" / "model.safetensors").write_bytes(b"x")
    (models_dir / "a.ckpt").write_bytes(b"x")
    checks = connect(server).files_exist(
        ["missing.bin", "stable-diffusion/model.safetensors", "a.ckpt", "stable-diffusion"]
    )
    assert [(c.name, c.exists, c.error) for c in checks] == [
        ("missing.bin", False, ""),
        ("stable-diffusion/model.safetensors", True, ""),
        ("a.ckpt", True, ""),
        ("stable-diffusion", False, ""),  # a folder is not a model file
    ]


@pytest.mark.parametrize("name", REFUSED_NAMES.values(), ids=REFUSED_NAMES.keys())
def test_files_exist_refuses_unsafe_names(server, connect, name: str) -> None:
    (check,) = connect(server).files_exist([name])
    assert check.exists is False and check.error


def test_files_exist_takes_a_bounded_number_of_names(server, stub_for, models_dir: Path) -> None:
    (models_dir / "a.bin").write_bytes(b"x")
    stub = stub_for(server)
    reply = stub.FilesExist(pb.FilesExistRequest(files=["a.bin"] * MAX_NAMES_PER_CALL))
    assert list(reply.exists) == [True] * MAX_NAMES_PER_CALL
    with pytest.raises(grpc.RpcError) as caught:
        stub.FilesExist(pb.FilesExistRequest(files=["a.bin"] * (MAX_NAMES_PER_CALL + 1)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"files: at most {MAX_NAMES_PER_CALL} names")


def test_files_exist_refuses_symlinks_that_leave(server, connect, models_dir: Path, outside: Path) -> None:
    (models_dir / "escape").symlink_to(outside)
    (models_dir / "link.txt").symlink_to(outside / "secret.txt")
    (models_dir / "real.bin").write_bytes(b"x")
    (models_dir / "alias.bin").symlink_to("real.bin")
    checks = connect(server).files_exist(["escape/secret.txt", "link.txt", "alias.bin", "../outside/secret.txt"])
    assert [c.exists for c in checks] == [False, False, True, False]
    assert all("outside" in c.error for c in checks[:2])


def test_upload_writes_the_file_into_a_new_subfolder(server, connect, models_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "model.bin"
    local.write_bytes(os.urandom(9 * 1024 * 1024 + 17))  # spans several chunks
    sent: list[int] = []
    message = connect(server).upload(local, "loras/new/model.bin", on_progress=sent.append)
    assert (models_dir / "loras" / "new" / "model.bin").read_bytes() == local.read_bytes()
    assert sum(sent) == local.stat().st_size and len(sent) > 1
    assert str(local.stat().st_size) in message
    assert temp_files(models_dir) == []


def test_upload_of_an_empty_file(server, connect, models_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "empty.bin"
    local.write_bytes(b"")
    connect(server).upload(local, "empty.bin")
    assert (models_dir / "empty.bin").read_bytes() == b""


def test_upload_replaces_an_existing_file(server, connect, models_dir: Path, tmp_path: Path) -> None:
    (models_dir / "m.bin").write_bytes(b"old")
    local = tmp_path / "m.bin"
    local.write_bytes(b"new contents")
    connect(server).upload(local, "m.bin")
    assert (models_dir / "m.bin").read_bytes() == b"new contents"


def upload_messages(*messages: tuple[str, bytes]) -> Iterator[pb.UploadFileRequest]:
    return (pb.UploadFileRequest(filename=name, chunk_data=data) for name, data in messages)


@pytest.mark.parametrize("name", REFUSED_NAMES.values(), ids=REFUSED_NAMES.keys())
def test_upload_refuses_unsafe_names(server, stub_for, models_dir: Path, tmp_path: Path, name: str) -> None:
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(grpc.RpcError) as caught:
        stub_for(server).UploadFile(upload_messages((name, b"data")))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filename" in caught.value.details()
    assert sorted(tmp_path.rglob("*")) == before


def test_an_upload_named_like_an_unfinished_upload_is_refused(server, stub_for, models_dir: Path) -> None:
    # The next start would delete it as a killed server's leftover.
    with pytest.raises(grpc.RpcError) as caught:
        stub_for(server).UploadFile(upload_messages((f"sub/{UPLOAD_TEMP_PREFIX}x{UPLOAD_TEMP_SUFFIX}", b"data")))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unfinished upload" in caught.value.details()
    assert list(models_dir.rglob("*")) == []


def test_upload_refuses_a_symlink_out(server, stub_for, models_dir: Path, outside: Path) -> None:
    (models_dir / "escape").symlink_to(outside)
    with pytest.raises(grpc.RpcError) as caught:
        stub_for(server).UploadFile(upload_messages(("escape/secret.txt", b"overwritten"), ("", b"!")))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (outside / "secret.txt").read_text() == "not for clients"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


@pytest.mark.parametrize(
    "messages, detail",
    [
        ([], "first message"),
        ([("", b"chunk")], "first message"),
        ([("a.bin", b"one"), ("b.bin", b"two")], "changed"),
        ([("a.bin", b"12345"), ("", b"678")], "limit of 6 bytes"),
    ],
    ids=["no messages", "unnamed first message", "name changes", "over the size limit"],
)
def test_bad_upload_streams_leave_nothing(server_factory, stub_for, models_dir: Path, messages, detail: str) -> None:
    (models_dir / "a.bin").write_bytes(b"kept")
    server = server_factory(max_upload_bytes=6)
    with pytest.raises(grpc.RpcError) as caught:
        stub_for(server).UploadFile(upload_messages(*messages))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in caught.value.details()
    assert sorted(p.name for p in models_dir.iterdir()) == ["a.bin"]
    assert (models_dir / "a.bin").read_bytes() == b"kept"


def test_upload_cancelled_halfway_leaves_no_trace(server, stub_for, models_dir: Path) -> None:
    (models_dir / "model.bin").write_bytes(b"previous version")
    release = threading.Event()

    def first_half_then_wait() -> Iterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(filename="model.bin", chunk_data=b"x" * 1000)
        yield pb.UploadFileRequest(chunk_data=b"y" * 1000)
        release.wait(10)  # the client cancels before sending the rest

    call = stub_for(server).UploadFile.future(first_half_then_wait())
    try:
        assert wait_until(lambda: any(p.stat().st_size == 2000 for p in temp_files(models_dir)))
        call.cancel()
        assert wait_until(lambda: temp_files(models_dir) == [])
    finally:
        release.set()
    assert call.cancelled()
    assert sorted(p.name for p in models_dir.iterdir()) == ["model.bin"]
    assert (models_dir / "model.bin").read_bytes() == b"previous version"


def test_upload_into_a_folder_name_is_refused(server, stub_for, models_dir: Path) -> None:
    (models_dir / "vae").mkdir()
    with pytest.raises(grpc.RpcError) as caught:
        stub_for(server).UploadFile(upload_messages(("vae", b"x")))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "folder" in caught.value.details()


def test_a_huge_hostile_name_is_refused_with_a_status_that_fits(server, stub_for, models_dir: Path) -> None:
    # The reason quotes the name; cut to size, it still fits the client's trailing-metadata limit.
    with pytest.raises(grpc.RpcError) as caught:
        stub_for(server).UploadFile(upload_messages(("\0" * 10_000, b"x")))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("filename")
    assert list(models_dir.iterdir()) == []
